"""The session engine (turns, KV reuse, sampling, streaming), the batching scheduler and the method registry."""

from .hook import TurnContext, install
from .registry import BoundMethod, describe_methods, method_names, resolve_method
from .sampling import SamplingParams
from .scheduler import Scheduler, Sequence
from .session import ContextLengthError, Engine, Session, TurnResult, TurnStats, TurnStream

__all__ = [
    "BoundMethod",
    "ContextLengthError",
    "Engine",
    "SamplingParams",
    "Scheduler",
    "Sequence",
    "Session",
    "TurnContext",
    "TurnResult",
    "TurnStats",
    "TurnStream",
    "describe_methods",
    "install",
    "method_names",
    "resolve_method",
]
