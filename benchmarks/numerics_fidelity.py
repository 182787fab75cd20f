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
import json, sys, time, torch
from loopserve.engine import Engine, SamplingParams
from loopserve.models import load_model
from loopserve.bench.fidelity import fidelity_prompts
from loopserve.bench.report import fidelity
count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
fp32 = Engine(load_model("smollm2"), method="dense", threads=2)  # the thread budget of the whole process
bf = Engine(load_model("smollm2", dtype="bf16-prefill"), method="dense")
prompts = fidelity_prompts(fp32.tokenizer, 4000, count)
sp = SamplingParams(max_new_tokens=64)
def answer(engine, ids, mode):
    s = engine.new_session(method="dense")
    t0 = time.perf_counter()
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s.prefill(ids[:-1])
    elif mode == "threads1":
        torch.set_num_threads(1); s.prefill(ids[:-1]); torch.set_num_threads(2)
    else:
        s.prefill(ids[:-1])
    pre = time.perf_counter() - t0
    st = s.stream_ids(ids, sp)
    for _ in st: pass
    return st.result.text, pre
rows = []
for i, p in enumerate(prompts):
    ids = fp32.encode_messages([{"role": "user", "content": p}])
    ref, tref = answer(fp32, ids, "fp32")
    row = {"prompt": i, "tokens": len(ids), "fp32_prefill_s": tref}
    for name, eng, mode in [("fp32-threads1", fp32, "threads1"), ("autocast-bf16", fp32, "autocast"), ("bf16-prefill", bf, "fp32")]:
        a, t = answer(eng, ids, mode)
        row[name] = {"rouge_l": fidelity(a, ref), "identical": a == ref, "prefill_s": t}
    rows.append(row); print(json.dumps(row), flush=True)
summ = {n: {"rouge_l": sum(r[n]["rouge_l"] for r in rows) / len(rows), "identical": sum(r[n]["identical"] for r in rows)}
        for n in ("fp32-threads1", "autocast-bf16", "bf16-prefill")}
print(json.dumps({"summary": summ, "prompts": len(rows)}))
