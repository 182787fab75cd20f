"""Next-token sampling at the edges of the temperature range."""

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
