"""The prefill-method hook: how a method computes attention for the new tokens of a turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

PREFILL_METHODS: dict[str, type["PrefillMethod"]] = {}


def register_prefill(cls: type["PrefillMethod"]) -> type["PrefillMethod"]:
    """Class decorator: make a prefill method available by its `name`."""
    PREFILL_METHODS[cls.name] = cls
    return cls


@dataclass
class PrefillMethod:
    """Computes attention of a turn's new query rows over all cached keys.

    `attend` receives post-RoPE `q` (1, H, n, D) of the n new tokens and `k`, `v`
    (1, H_kv, N, D): every resident key, the n new ones last. It returns (1, H, n, D).
    `ctx` is the engine's per-forward `TurnContext` (layer state, stats, positions).
    """

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # True when prefilling a turn in several chunks gives the same result as in one forward
    # (the scheduler then splits long turns; a selection that depends on the whole turn's
    # queries, as sparse patterns do, is prefilled in one piece).
    chunkable: ClassVar[bool] = False

    def chunkable_turn(self, n_new: int, n_total: int) -> bool:
        """Whether a turn of ``n_new`` new tokens (``n_total`` keys once prefilled) may be
        prefilled in chunks; a method whose selection only some turns need (a dense
        fallback for short inputs) says yes for the others."""
        return self.chunkable

    def validate(self) -> None:
        """Raise ValueError naming the bad knob."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer_idx: int, scaling: float, ctx) -> torch.Tensor:
        raise NotImplementedError
