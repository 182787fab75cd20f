"""The repetition penalty (chat's guard against loops): greedy and sampled, and its validation."""

import pytest
import torch

from loopserve.engine import SamplingParams
from loopserve.engine.sampling import Sampler


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    seen = torch.tensor([[0, 3]])  # token 0 (the best) already appeared
    assert Sampler(SamplingParams(temperature=0))(logits, seen) == 0
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.1))(logits, seen) == 1
    # A negative logit of a seen token is pushed further down, never up.
    low = torch.tensor([[-1.0, -1.05, -5.0, -5.0]])
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.1))(low, seen) == 1


def test_repetition_penalty_applies_when_sampling():
    logits = torch.tensor([[5.0, 4.0, -20.0, -20.0]])
    seen = torch.tensor([[0]])
    sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=10.0, seed=0))
    assert {sampler(logits, seen) for _ in range(20)} == {1}


@pytest.mark.parametrize("value", [0.5, 0, -1, 11, True, "1.1"])
def test_bad_repetition_penalty_is_rejected(value):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=value).validate()
