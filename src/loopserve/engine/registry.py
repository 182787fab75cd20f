"""The method registry: binds a prefill attention method and a decode KV method by name.

A method name is either a registered prefill or decode method on its own (the other phase
is dense), a combined name such as `loopserve` (both phases), or an explicit pairing
`PREFILL+DECODE`, e.g. `minference+snapkv`. Knobs are routed to whichever phase declares
them; an unknown method or knob is a ValueError that lists what exists.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass

from ..attention.base import PREFILL_METHODS, PrefillMethod
from ..cache.base import DECODE_METHODS, DecodeMethod

# Method modules register themselves on import (kvpress-style: one file per method).
_BUILTIN_MODULES = [
    "loopserve.attention.dense",
    "loopserve.attention.loopserve",
    "loopserve.cache.base",
    "loopserve.cache.loopserve",
    # Baselines (SPEC section 3), one file each.
    "loopserve.attention.ashape",
    "loopserve.attention.trishape",
    "loopserve.attention.minference",
    "loopserve.cache.streamingllm",
    "loopserve.cache.snapkv",
    "loopserve.cache.adakv",
    "loopserve.cache.pyramidkv",
    "loopserve.cache.h2o",
    "loopserve.cache.snapkv_rescored",
]

# Names that bind both phases at once.
COMBINED: dict[str, tuple[str, str]] = {"dense": ("dense", "dense"), "loopserve": ("loopserve", "loopserve")}


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


@dataclass
class BoundMethod:
    name: str
    prefill: PrefillMethod
    decode: DecodeMethod

    def chunkable_turn(self, n_new: int, n_total: int) -> bool:
        """Whether this turn's prefill (``n_new`` new tokens, ``n_total`` keys after it) may
        be split into chunks without changing the result."""
        return self.prefill.chunkable_turn(n_new, n_total) and self.decode.chunkable_turn(n_new, n_total)

    def knobs(self) -> dict:
        return {**dataclasses.asdict(self.prefill), **dataclasses.asdict(self.decode)}


def method_names() -> list[str]:
    _load_builtins()
    return sorted(set(COMBINED) | set(PREFILL_METHODS) | set(DECODE_METHODS))


def describe_methods() -> list[dict]:
    """One entry per name: its phase(s), a one-line description and its knobs with their defaults."""
    _load_builtins()
    rows = []
    for name in method_names():
        knobs = resolve_method(name).knobs()
        if name in COMBINED:
            p, d = COMBINED[name]
            if name == "dense":
                desc = "Full attention in both phases (the reference)."
            else:
                desc = f"{PREFILL_METHODS[p].description} + {DECODE_METHODS[d].description}"
            rows.append({"name": name, "phase": "prefill+decode", "description": desc, "knobs": knobs})
            continue
        for phase, table in (("prefill", PREFILL_METHODS), ("decode", DECODE_METHODS)):
            if name in table:
                rows.append({"name": name, "phase": phase, "description": table[name].description, "knobs": knobs})
    return rows


def parse_knobs(pairs: list[str] | None) -> dict:
    """`["alpha=0.8", "mode=bounded"]` -> `{"alpha": 0.8, "mode": "bounded"}` (values as JSON when they parse)."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--knob expects NAME=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def parse_method_spec(text: str) -> tuple[str, dict]:
    """`"METHOD[:KNOB=VALUE,...]"` -> `(METHOD, knobs)`, e.g. `"loopserve+dense:alpha=0.95"`."""
    name, _, knobs = text.partition(":")
    return name, parse_knobs([k for k in knobs.split(",") if k])


def _split(name: str) -> tuple[str, str]:
    if "+" in name:
        p, _, d = name.partition("+")
        if p not in PREFILL_METHODS:
            raise ValueError(f"unknown prefill method {p!r}; known prefill methods: {sorted(PREFILL_METHODS)}")
        if d not in DECODE_METHODS:
            raise ValueError(f"unknown decode method {d!r}; known decode methods: {sorted(DECODE_METHODS)}")
        return p, d
    if name in COMBINED:
        return COMBINED[name]
    if name in PREFILL_METHODS:
        return name, "dense"
    if name in DECODE_METHODS:
        return "dense", name
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())} (or PREFILL+DECODE)")


def _knob_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def method_knobs(name: str) -> set[str]:
    """The knob names method `name` (or PREFILL+DECODE) accepts."""
    _load_builtins()
    p_name, d_name = _split(name)
    return _knob_names(PREFILL_METHODS[p_name]) | _knob_names(DECODE_METHODS[d_name])


def resolve_method(name: str, knobs: dict | None = None) -> BoundMethod:
    """Fresh method instances for one session (methods may keep per-session state)."""
    _load_builtins()
    if not isinstance(name, str) or not name:
        raise ValueError("method name must be a non-empty string")
    p_name, d_name = _split(name)
    p_cls, d_cls = PREFILL_METHODS[p_name], DECODE_METHODS[d_name]
    knobs = dict(knobs or {})
    p_fields, d_fields = _knob_names(p_cls), _knob_names(d_cls)
    unknown = sorted(set(knobs) - p_fields - d_fields)
    if unknown:
        raise ValueError(
            f"unknown knob(s) {unknown} for method {name!r}; valid knobs: {sorted(p_fields | d_fields) or 'none'}"
        )
    try:
        prefill = p_cls(**{k: v for k, v in knobs.items() if k in p_fields})
        decode = d_cls(**{k: v for k, v in knobs.items() if k in d_fields})
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ValueError(f"invalid knobs for method {name!r}: {e}") from None
    prefill.validate()
    decode.validate()
    return BoundMethod(name, prefill, decode)
