"""Per-phase numerics (``--dtype``): ``bf16-prefill`` runs prefill forwards on a bfloat16 copy
of the weights and decode steps on the float32 weights, with the KV cache in float32;
``auto`` is float32 on a CPU and bfloat16 on CUDA."""

from __future__ import annotations

import pytest
import torch

from loopserve.cli_options import DTYPE_CHOICES as CLI_DTYPE_CHOICES
from loopserve.engine import Engine, SamplingParams
from loopserve.engine.scheduler import Scheduler
from loopserve.models import DTYPE_CHOICES, load_model, resolve_dtype

PROMPT = "The keeper of the lighthouse counted ships every night and wrote their names in a ledger."


@pytest.fixture(scope="module")
def mixed():
    return load_model("tiny-llama", dtype="bf16-prefill")


def test_dtype_choices_are_the_same_everywhere():
    assert CLI_DTYPE_CHOICES == DTYPE_CHOICES


def test_auto_follows_the_cpu_and_bad_names_are_refused():
    assert resolve_dtype("auto") == "float32"  # bf16-prefill is opt-in on CPUs (answers drift)
    assert resolve_dtype(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="unsupported dtype 'float16'.*bf16-prefill"):
        load_model("tiny-llama", dtype="float16")


def test_bf16_prefill_loads_two_copies_of_the_same_weights(mixed):
    assert mixed.dtype == "bf16-prefill"
    assert mixed.model.dtype == torch.float32 and mixed.prefill_model.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(mixed.model.named_parameters(), mixed.prefill_model.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    ref = mixed.as_float32()
    assert ref.dtype == "float32" and ref.model is mixed.model  # shared, not copied


def test_prefill_runs_the_bf16_weights_decode_the_fp32_weights(mixed):
    engine = Engine(mixed)
    calls = {"prefill": [], "decode": []}
    hooks = [m.register_forward_hook(lambda mod, args, kw, out, key=key: calls[key].append(kw["input_ids"].shape[1]), with_kwargs=True)
             for key, m in (("prefill", engine.prefill_model), ("decode", engine.model))]
    try:
        session = engine.new_session()
        result = session.chat(PROMPT, SamplingParams(max_new_tokens=5, ignore_eos=True))
    finally:
        for h in hooks:
            h.remove()
    assert calls["prefill"] == [result.stats.prefill_tokens]
    assert calls["decode"] == [1] * 4  # the last sampled token is never fed
    assert all(layer.keys.dtype == torch.float32 for layer in session.cache.layers)
    assert engine.dtype == "bf16-prefill"


def test_bf16_prefill_logits_stay_close_to_fp32(mixed):
    fp32 = Engine(mixed.as_float32())
    ids = fp32.encode_messages([{"role": "user", "content": PROMPT}])
    a = fp32.new_session().prefill(ids).logits
    b = Engine(mixed).new_session().prefill(ids).logits
    assert not torch.equal(a, b)  # the bf16 weights really ran
    assert torch.allclose(a, b, atol=0.1 * a.abs().max().item())


def test_bf16_prefill_batched_equals_alone(mixed):
    """Chunked prefill packed with other turns' decode steps: every chunk still runs the
    prefill weights (even a one-token chunk), decode tokens the decode weights."""
    engine = Engine(mixed)
    texts = [PROMPT * 2, "Hi there.", "A storm came from the north; the keeper lit the lamp early."]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    alone = [engine.new_session().chat(t, params).token_ids for t in texts]
    sched = Scheduler(engine, chunk_tokens=len(engine.encode_messages([{"role": "user", "content": PROMPT * 2}])) - 1)
    seqs = []
    for t in texts:
        messages = [{"role": "user", "content": t}]
        seqs.append(sched.submit(engine.new_session(), engine.encode_messages(messages), params, messages=messages))
    sched.run()
    assert [s.result.token_ids for s in seqs] == alone
    assert sched.stats.max_batch > 1


def test_device_choices_and_errors():
    from loopserve.cli_options import DEVICE_CHOICES as CLI_DEVICE_CHOICES
    from loopserve.models import DEVICE_CHOICES, resolve_device

    assert CLI_DEVICE_CHOICES == DEVICE_CHOICES
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            load_model("tiny-llama", device="cuda")
        assert resolve_dtype("auto", "cpu") == resolve_dtype("auto")


def test_engine_follows_the_model_device():
    engine = Engine(load_model("tiny-llama", device="cpu"))
    assert engine.device == torch.device("cpu")
    session = engine.new_session()
    session.chat(PROMPT, SamplingParams(max_new_tokens=2))
    assert all(layer.keys.device == engine.device for layer in session.cache.layers)
