"""Next-token sampling at the edges of the temperature range."""

import pytest
import torch

from loopserve.engine.sampling import Sampler, SamplingParams


def test_vanishing_temperature_samples_the_argmax():
    # logits / T overflowed float32 for T <= 1e-38 (inf - inf = NaN in the softmax).
    logits = torch.tensor([[3.0, -1.0, 7.5, 7.25, 0.0]])
    history = torch.zeros(1, 1, dtype=torch.long)
    for t in (1e-38, 1e-45, 1e-300, 5e-324):
        for seed in range(5):
            assert Sampler(SamplingParams(temperature=t, seed=seed, top_p=0.9, top_k=3))(logits, history) == 2


def test_ordinary_temperature_still_samples():
    logits = torch.zeros(1, 4)
    history = torch.zeros(1, 1, dtype=torch.long)
    drawn = {Sampler(SamplingParams(temperature=1.0, seed=seed))(logits, history) for seed in range(40)}
    assert drawn == {0, 1, 2, 3}


def test_greedy_takes_the_first_of_tied_maxima_as_argmax_does():
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0, 2.0]])
    assert Sampler(SamplingParams())(logits) == 1
    torch.manual_seed(0)
    for _ in range(20):
        x = torch.randn(1, 4099).round(decimals=1)  # many ties at the top
        assert Sampler(SamplingParams())(x) == int(x.argmax())


def test_the_repetition_penalty_asks_for_the_tokens_so_far():
    sampler = Sampler(SamplingParams(repetition_penalty=1.2))
    assert sampler.uses_history and not Sampler(SamplingParams(temperature=0.7, top_k=3)).uses_history
    with pytest.raises(ValueError, match="tokens so far"):
        sampler(torch.zeros(1, 5))
