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
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


NonEmptyStr = Annotated[str, Field(min_length=1)]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Strict):
    """Declared so that it is refused by name (the models served here read text only)."""

    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Strict):
    data: str
    format: str


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FilePart(Strict):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")]


class ChatMessage(Strict):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)  # name, refusal, ...: ignored

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text", "json_object", "json_schema"]


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class ChatCompletionRequest(Strict):
    """POST /v1/chat/completions. Unknown fields are ignored (as OpenAI's SDKs expect);
    fields the server cannot honour are declared and refused with a 400 naming them."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="at most the model's context window")
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens (takes precedence)")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128, description="only 1 is supported")
    presence_penalty: Penalty | None = Field(None, description="only 0 is supported")
    frequency_penalty: Penalty | None = Field(None, description="only 0 is supported")
    logprobs: bool | None = Field(None, description="not supported (only false)")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported (only 0)")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (only empty)")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported (only empty)")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported (only empty)")
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = Field(None, description="only {\"type\": \"text\"} is supported")
    user: str | None = None
    metadata: dict[str, Any] | None = None
    # Extensions
    top_k: int | None = Field(None, ge=-1, description="extension: top-k sampling (0 or -1 disables it)")
    ignore_eos: bool = Field(False, description="extension (as in vLLM): decode exactly max_tokens tokens")
    loopserve: dict[str, Any] | None = Field(None, description="extension: method knobs for this request")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> "ChatCompletionRequest":
        # Raised as APIError (not ValueError), so it leaves pydantic unchanged with its param.
        def unsupported(what: str, param: str, code: str = "unsupported_parameter"):
            raise bad_request(f"{what} is not supported.", param, code)

        for i, m in enumerate(self.messages):
            p = f"messages[{i}]"
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if not isinstance(part, TextPart):
                        raise bad_request(f"{p}.content[{j}]: only text content parts are supported (got {part.type!r}).",
                                          f"{p}.content[{j}]", "unsupported_content")
            if m.tool_calls or m.function_call:
                unsupported(f"{p}: tool calls", f"{p}.tool_calls")
            if m.content is None:
                raise bad_request(f"Missing required parameter: '{p}.content'.", f"{p}.content", "missing_required_parameter")
        if self.n not in (None, 1):
            raise bad_request(f"Invalid value for 'n': {self.n}; only n=1 is supported.", "n", "unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"'{name}' is not supported (only 0).", name, "unsupported_value")
        if self.logprobs or self.top_logprobs:
            unsupported("'logprobs'", "logprobs")
        for name in ("tools", "functions", "logit_bias"):
            if getattr(self, name):
                unsupported(f"'{name}'", name)
        if self.response_format is not None and self.response_format.type != "text":
            raise bad_request("Only response_format {\"type\": \"text\"} is supported.", "response_format", "unsupported_value")
        return self

    def texts(self) -> list[dict]:
        """The messages as the chat template takes them (text parts joined, developer as system)."""
        out = []
        for m in self.messages:
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out


# -- validation errors -> OpenAI 400 bodies ------------------------------------------------------
_PARAM_SKIP = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}

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
    "union_tag_invalid": "unsupported_content",
    "too_short": "empty_array",
}


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
    if kind == "json_invalid":
        message = f"We could not parse the JSON body of your request: {err['msg']}"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "literal_error" and param and param.endswith(".role"):
        code = "invalid_role"
        message = f"Invalid value for '{param}': {err['input']!r}. Supported roles: system, developer, user, assistant."
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
