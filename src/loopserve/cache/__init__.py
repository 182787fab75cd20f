"""Session KV cache, Phase 2 progressive selection and the KV baselines."""

from .base import DECODE_METHODS, DecodeMethod, register_decode
from .session_cache import SessionCache, SessionLayer

__all__ = ["DECODE_METHODS", "DecodeMethod", "SessionCache", "SessionLayer", "register_decode"]
