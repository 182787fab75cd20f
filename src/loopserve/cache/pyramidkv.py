"""PyramidKV baseline: SnapKV selection with a budget that shrinks linearly with depth.

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (arXiv 2406.02069).

Lower layers attend broadly and get more KV, upper layers attend to few tokens and get less.
With b = budget - window selectable tokens per layer on average, the top layer keeps
b / beta and the bottom layer 2b - b / beta, linearly in between, so the **mean over layers is
exactly `budget`** (integer rounding is distributed so the sum is exact). As in the
authors' code, when the input is shorter than the bottom layer's share, the bottom layer
keeps everything and the top layer takes the rest of the 2b spread. Selection within a layer
is SnapKV's (observation window, max-pooling, top-k per KV head, window always kept).

Multi-turn: like SnapKV, it evicts after every turn's prefill, each layer down to its own
budget. Layer budgets are computed from the conversation's input length (`ctx.input_end`),
the same for every layer, so the pyramid keeps its shape across turns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import register_decode
from ..knobs import check_int_knob as _check_int
from .snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, num_layers: int, n_input: int, beta: int) -> list[int]:
    """Per-layer token budgets (window included), non-increasing with depth, mean = budget."""
    b = budget - window
    if num_layers <= 1 or b <= 0:
        return [budget] * num_layers
    min_num = b / beta
    max_num = 2 * b - min_num
    avail = n_input - window
    if max_num >= avail:  # short input: the bottom layer keeps everything
        max_num = max(avail, 0)
        min_num = 2 * b - max_num
    if not max_num >= min_num >= 0:
        return [budget] * num_layers  # no room for a pyramid: plain SnapKV
    steps = (max_num - min_num) / (num_layers - 1)
    targets = [max_num - layer * steps for layer in range(num_layers)]
    base = [math.floor(t) for t in targets]
    # Hand out the rounding remainder to the largest fractional parts: the sum is exact and
    # the sequence stays non-increasing (equal floors imply the upper layer's fraction is smaller).
    extra = b * num_layers - sum(base)
    order = sorted(range(num_layers), key=lambda i: (-(targets[i] - base[i]), i))
    for i in order[: max(extra, 0)]:
        base[i] += 1
    return [x + window for x in base]


@register_decode
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., arXiv 2406.02069): SnapKV with a per-layer budget decreasing linearly with depth."""

    name = "pyramidkv"
    description = "PyramidKV: SnapKV selection with a per-layer budget shrinking linearly with depth (mean = `budget`)."
    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., arXiv 2406.02069)"

    beta: int = 20  # top layer keeps (budget - window) / beta

    def validate(self) -> None:
        super().validate()
        _check_int(self, "beta", 1)

    def layer_budgets(self, num_layers: int, n_input: int) -> list[int]:
        return pyramid_budgets(self.budget, self.window, num_layers, n_input, self.beta)

    def layer_budget(self, ctx, layer_idx: int) -> int:
        return self.layer_budgets(ctx.num_layers, ctx.input_end)[layer_idx]
