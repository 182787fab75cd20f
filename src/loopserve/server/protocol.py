"""The wire protocol: OpenAI chat-completions request and response models, the error body,
and the server-sent-event chunk builders (shared by the app and the Ray ingress).

The request model follows OpenAI's published schema for what the server supports (text
content parts, `stop`, `seed`, `stream_options`, ...), declares what it refuses (image or
audio parts, tools, logprobs, penalties, n > 1) so the refusal is a clear 400 rather than a
silent drop, and ignores other unknown fields as OpenAI's SDKs expect. `parse_chat_request`
turns validation failures into OpenAI-style 400 bodies whose `param` names the field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# -- errors -------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error the server sends: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error answered with an OpenAI-style body and `status` (raised anywhere in a request)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")


def replica_unavailable(exc: BaseException) -> APIError:
    return APIError(503, f"The replica serving this conversation became unavailable ({type(exc).__name__}); "
                         "retry: the conversation continues on a healthy replica.",
                    type="server_error", code="replica_unavailable", headers={"Retry-After": "1"})


# -- the request ----------------------------------------------------------------------------------
class Strict(BaseModel):
    """Request parts: JSON types as declared ("10" is not a number, 1 is not true), finite numbers."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


def _integral(v):
    """JSON Schema's integers include 1.0; pydantic's strict ints do not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def Int(**bounds):  # noqa: N802 - a type
    """An integer field type with bounds (inside the Annotated, so the schema keeps them)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


NonEmptyStr = Annotated[str, Field(min_length=1)]
# What the server cannot honour is declared with the only value it accepts (so the schema
# says what a request may contain); anything else is a 400 `unsupported_*` naming it.
Unsupported = Annotated[list[dict[str, Any]], Field(max_length=0, description="not supported (only empty)")]


class TextPart(Strict):
    """The only content part the served models read (image, audio and file parts are refused)."""

    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    model_config = ConfigDict(extra="allow")  # name, refusal, ...: accepted and ignored

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    tool_calls: Unsupported | None = None
    function_call: None = Field(None, description="not supported")


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"] = Field(description="only text is supported")


class ChatCompletionRequest(Strict):
    """POST /v1/chat/completions. Unknown fields are ignored (as OpenAI's SDKs expect);
    fields the server cannot honour are declared with the one value it accepts and
    refused otherwise with a 400 naming them."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int(ge=1) | None = Field(None, description="at most the model's context window")
    max_completion_tokens: Int(ge=1) | None = Field(None, description="as max_tokens (and takes precedence)")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Int(ge=INT64_MIN, le=INT64_MAX) | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Int(ge=1, le=1) | None = Field(None, description="only 1 is supported")
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0 is supported")
    logprobs: Literal[False] | None = Field(None, description="not supported (only false)")
    top_logprobs: Int(ge=0, le=0) | None = Field(None, description="not supported (only 0)")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="not supported")
    tools: Unsupported | None = None
    functions: Unsupported | None = None
    tool_choice: Literal["none", "auto"] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    # Extensions
    top_k: Int(ge=-1) | None = Field(None, description="extension: top-k sampling (0 or -1 disables it)")
    ignore_eos: bool = Field(False, description="extension (as in vLLM): decode exactly max_tokens tokens")
    loopserve: dict[str, Any] | None = Field(None, description="extension: method knobs for this request")

    def texts(self) -> list[dict]:
        """The messages as the chat template takes them (text parts joined, developer as system)."""
        out = []
        for m in self.messages:
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out


# -- validation errors -> OpenAI 400 bodies ------------------------------------------------------
_PARAM_SKIP = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before", "literal"}

_CODE_BY_TYPE = {
    "missing": "missing_required_parameter",
    "json_invalid": "invalid_json",
    "model_type": "invalid_type",
    "model_attributes_type": "invalid_type",
    "dict_type": "invalid_type",
    "list_type": "invalid_type",
    "string_type": "invalid_type",
    "int_type": "invalid_type",
    "float_type": "invalid_type",
    "bool_type": "invalid_type",
    "too_short": "empty_array",
}
# Declared but refused beyond the one accepted value (see ChatCompletionRequest).
_UNSUPPORTED = {"n": "unsupported_value", "presence_penalty": "unsupported_value", "frequency_penalty": "unsupported_value",
                "response_format.type": "unsupported_value", "logprobs": "unsupported_parameter",
                "top_logprobs": "unsupported_parameter", "logit_bias": "unsupported_parameter",
                "tools": "unsupported_parameter", "functions": "unsupported_parameter",
                "tool_choice": "unsupported_parameter", "tool_calls": "unsupported_parameter",
                "function_call": "unsupported_parameter"}
_CONTENT_PART_TYPE = re.compile(r"^(messages\[\d+\]\.content\[\d+\])\.type$")


def _param(loc: tuple) -> str | None:
    """`('messages', 0, 'content')` -> `messages[0].content`; union branch tags (type and
    class names) are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _PARAM_SKIP or not part.isidentifier() or part[:1].isupper():
            continue
        else:
            out += ("." if out else "") + part
    return out or None


def validation_error(exc: ValidationError) -> APIError:
    """The first error of a pydantic validation, as an OpenAI-style 400."""
    errors = exc.errors(include_url=False)
    # The most specific error (deepest location) of the first field that failed.
    first = errors[0]["loc"][:1]
    err = max((e for e in errors if e["loc"][:1] == first), key=lambda e: len(_param(e["loc"]) or ""))
    kind, param = err["type"], _param(err["loc"])
    code = _CODE_BY_TYPE.get(kind, "invalid_value")
    tail = param.split("].")[-1] if param else None
    part = _CONTENT_PART_TYPE.match(param or "")
    if kind == "json_invalid":
        message = f"We could not parse the JSON body of your request: {err['msg']}"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "literal_error" and param and param.endswith(".role"):
        code = "invalid_role"
        message = f"Invalid value for '{param}': {err['input']!r}. Supported roles: system, developer, user, assistant."
    elif part:
        param, code = part.group(1), "unsupported_content"
        message = f"{param}: only text content parts are supported (got type {err['input']!r})."
    elif tail in _UNSUPPORTED and kind not in _CODE_BY_TYPE:
        code = _UNSUPPORTED[tail]
        message = f"'{param}' is not supported here ({err['msg'].lower()})."
    elif param is None:
        message = f"The request body must be a JSON object ({err['msg']})."
    else:
        message = f"Invalid value for '{param}': {err['msg']}."
    return bad_request(message, param, code)


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """Validate a request body; every failure is an APIError (400) naming the field."""
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None


# -- responses ------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None = None


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """A whole answer; `loopserve` (extension) holds the session and timing details."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    loopserve: dict[str, Any]


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a stream (then `data: [DONE]`); an error event is an ErrorBody."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    loopserve: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    loopserve: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["ok"]
    model: str
    method: str


def usage(info: dict) -> dict:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]}}


def extension(info: dict) -> dict:
    """The `loopserve` object of a response: the worker's report without the text."""
    return {k: v for k, v in info.items() if k != "text"}


# -- server-sent events -----------------------------------------------------------------------------
DONE = "data: [DONE]\n\n"


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class ChunkWriter:
    """The SSE events of one streamed answer (ids and header fields fixed per request)."""

    def __init__(self, cid: str, created: int, model: str, fingerprint: str, include_usage: bool):
        self.head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": fingerprint}
        self.include_usage = include_usage

    def chunk(self, delta: dict, finish: str | None = None, **more) -> str:
        body = {**self.head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        body.update(more)
        return sse(body)

    def usage_chunk(self, info: dict) -> str:
        return sse({**self.head, "choices": [], "usage": usage(info)})


def completion(cid: str, created: int, model: str, fingerprint: str, info: dict) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": info["text"], "refusal": None},
                     "logprobs": None, "finish_reason": info["finish_reason"]}],
        "usage": usage(info),
        "loopserve": extension(info),
    }
