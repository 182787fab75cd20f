"""Greedy answers of other prefill numerics against fp32's, dense attention (issue 17).

On `bench fidelity`'s L-Eval prompts (~3.6k tokens, question after the document, 64-token
greedy answers), each prompt is answered with fp32 prefill and then with:

- `fp32-threads1`: fp32 with 1 thread instead of 2 (does a change of summation order alone
  flip answers? It did not: the noise floor is 1.0);
- `autocast-bf16`: the fp32 weights under `torch.autocast("cpu", bfloat16)` (bf16 inside the
  matmuls; fp32 residual stream, norms and KV);
- `bf16-prefill`: `--dtype bf16-prefill` (a bf16 weight copy for prefill).

All but the last prompt token are prefilled under the variant; the last token and the
answer run in fp32. One JSON line per prompt (ROUGE-L against the fp32 answer, identical or
not, prefill seconds), then a summary line:

    python benchmarks/numerics_fidelity.py 10 > runs/numerics-fidelity.jsonl
"""
from __future__ import annotations

import json
import sys
import time

import torch

from loopserve.bench.fidelity import fidelity_prompts
from loopserve.bench.report import fidelity
from loopserve.engine import Engine, SamplingParams
from loopserve.models import load_model
from loopserve.threads import intra_op_threads

VARIANTS = ("fp32-threads1", "autocast-bf16", "bf16-prefill")


def answer(engine: Engine, ids: list[int], mode: str, sampling: SamplingParams) -> tuple[str, float]:
    """Greedy answer after `ids`, all but the last token prefilled under `mode`; prefill seconds."""
    s = engine.new_session(method="dense")
    t0 = time.perf_counter()
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s.prefill(ids[:-1])
    elif mode == "threads1":
        with intra_op_threads(1):
            s.prefill(ids[:-1])
    else:
        s.prefill(ids[:-1])
    pre = time.perf_counter() - t0
    stream = s.stream_ids(ids, sampling)
    for _ in stream:
        pass
    return stream.result.text, pre


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    fp32 = Engine(load_model("smollm2"), method="dense", threads=2)  # the thread budget of the whole process
    bf = Engine(load_model("smollm2", dtype="bf16-prefill"), method="dense")
    sampling = SamplingParams(max_new_tokens=64)
    rows = []
    for i, prompt in enumerate(fidelity_prompts(fp32.tokenizer, 4000, count)):
        ids = fp32.encode_messages([{"role": "user", "content": prompt}])
        ref, t_ref = answer(fp32, ids, "fp32", sampling)
        row = {"prompt": i, "tokens": len(ids), "fp32_prefill_s": t_ref}
        for name, engine, mode in zip(VARIANTS, (fp32, fp32, bf), ("threads1", "autocast", "fp32")):
            text, t = answer(engine, ids, mode, sampling)
            row[name] = {"rouge_l": fidelity(text, ref), "identical": text == ref, "prefill_s": t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {n: {"rouge_l": sum(r[n]["rouge_l"] for r in rows) / len(rows), "identical": sum(r[n]["identical"] for r in rows)}
               for n in VARIANTS}
    print(json.dumps({"summary": summary, "prompts": len(rows)}))


if __name__ == "__main__":
    main()
