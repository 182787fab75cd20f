"""Sampling parameters and next-token sampling (transformers' public logits warpers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class SamplingParams:
    """temperature 0 means greedy; seed makes sampling reproducible.

    repetition_penalty > 1 divides the logits of tokens already in the prompt or the answer
    (CTRL / transformers' rule; 1 disables it), in greedy decoding too.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Decode past end-of-sequence tokens up to max_new_tokens (fixed-length answers for
    # load tests and benchmarks; vLLM's `ignore_eos`).
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        def bad(name, why):
            raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not (0.0 <= float(self.temperature) <= 100.0):
            bad("temperature", "must be a number in [0, 100]")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < float(self.top_p) <= 1.0):
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables it)")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not (1.0 <= float(rp) <= 10.0):
            bad("repetition_penalty", "must be a number in [1, 10] (1 disables it)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "must be an integer or None")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a boolean")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings")
        return self


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.greedy = params.temperature == 0
        # The penalty acts on the raw logits (its rule depends on their sign), before any warper.
        self.penalty = (RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))
                        if params.repetition_penalty != 1.0 else None)
        warpers = []
        if not self.greedy:
            warpers.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(float(params.top_p)))
        self.warpers = LogitsProcessorList(warpers)
        # Only the repetition penalty reads the tokens so far (the warpers take the logits
        # alone): without it, callers need not build that tensor at every step.
        self.uses_history = self.penalty is not None
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> int:
        """logits: (1, V) for the next position (on any device: sampling runs on the CPU, where
        the seeded generator lives); input_ids: (1, n) the tokens so far, needed where
        `uses_history`."""
        if input_ids is None:
            if self.uses_history:
                raise ValueError("the repetition penalty needs the tokens so far (input_ids)")
            input_ids = torch.empty(1, 0, dtype=torch.long)
        logits, input_ids = logits.float().cpu(), input_ids.cpu()
        if self.penalty is not None:
            logits = self.penalty(input_ids, logits)
        if self.greedy:
            # max's index is argmax's (the first maximum), and max runs several times faster.
            return int(logits.max(dim=-1).indices)
        # Shifted so the best logit is 0, in float64: logits / T then stays finite or -inf
        # for any T > 0 (a T of 1e-38 overflowed float32 to inf - inf = NaN), and becomes
        # greedy in the limit, as it should.
        logits = logits.double() - logits.max(dim=-1, keepdim=True).values.double()
        scores = self.warpers(input_ids, logits)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
