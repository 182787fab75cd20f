"""One decode-step matrix-vector product per weight shape of SmolLM2-135M, in fp32, weight-only
int8 (`torch._weight_int8pack_mm`, gpt-fast's path) and bf16 (issue 17): can fewer weight bytes
per token make decoding faster on this CPU?

    python benchmarks/gemv_dtypes.py --threads 2

Mean time per call over `--iters` calls after 5 warm-ups, per shape; prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = ((576, 576), (1536, 576), (576, 1536), (49152, 576))  # q/o, gate/up, down, LM head


def per_call_ms(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # this script's only torch work: one budget, set once
    print(f"| weight (out x in), {args.threads} threads | fp32 ms | int8 ms | bf16 ms | int8 rel. error |")
    print("|---|---:|---:|---:|---:|")
    for out_f, in_f in SHAPES:
        w, x = torch.randn(out_f, in_f), torch.randn(1, in_f)
        scales = w.abs().amax(1) / 127
        wq = (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
        wb, xb = w.bfloat16(), x.bfloat16()
        fp32 = per_call_ms(lambda: torch.nn.functional.linear(x, w), args.iters)
        int8 = per_call_ms(lambda: torch._weight_int8pack_mm(x, wq, scales), args.iters)
        bf16 = per_call_ms(lambda: torch.nn.functional.linear(xb, wb), args.iters)
        ref = x @ w.T
        err = float((torch._weight_int8pack_mm(x, wq, scales) - ref).abs().max() / ref.abs().max())
        print(f"| {out_f} x {in_f} | {fp32:.3f} | {int8:.3f} | {bf16:.3f} | {err:.4f} |")


if __name__ == "__main__":
    main()
