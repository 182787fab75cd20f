"""Device benchmark of the Triton kernels (issue 16) against SDPA / FlashAttention on CUDA.

Prefill: the vertical-slash kernel (:mod:`loopserve.kernels.vertical_slash`, index
preparation included) vs ``F.scaled_dot_product_attention`` (causal, bottom-right aligned
when the rows have history; FlashAttention's backend in bf16) and, when the
``flash_attn`` package is installed, ``flash_attn_func``. Shapes: Llama-3-8B's attention
(32 query heads, 8 KV heads, head dim 128), N keys with n = N (first turn) or n < N new
rows (a later turn over cached history). Patterns: LoopServe's selection at ``--alpha``
on attention-shaped synthetic inputs (``synthetic_qkv`` of
``prefill_attention_kernel.py``), selected on the CPU from ``--probe`` random rows plus
the last 8 (selection is not timed here). Accuracy: the kernel's output on 32 sampled rows
against the fp64 masked softmax over the same cells, in the input dtype and with an fp32
output (the kernel's own error, without the output's rounding).

Decode: one query row per head over a Phase 2 view of ``--budget`` keys per KV head:
the Triton gather-and-attend kernel (:mod:`loopserve.kernels.view_decode`) vs SDPA over
the pre-gathered compact view (what the engine runs per step today) and dense SDPA over
all N keys. Scoring: Phase 2's re-scoring of all N keys by 16 buffered queries, the
Triton kernel (:mod:`loopserve.kernels.key_scores`) vs the torch path.

Times are CUDA-event medians of ``--repeat`` runs after a warm-up; everything is written
as one JSON object (``--out``, else stdout) naming the device. ``benchmarks/gpu.sh``
runs it; ``--smoke`` runs tiny shapes on CPU tensors under Triton's interpreter (no GPU:
checks that the script works, its times mean nothing).

Usage::

    bash benchmarks/gpu.sh                                   # 32k and 128k keys, JSON in docs/results/
    python benchmarks/gpu_kernels.py --N 32768 --n 32768 4096 --repeat 10 --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

if "--smoke" in sys.argv:  # Triton reads it when the kernels are defined: before any import of them
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from loopserve.attention import pattern_density, pattern_mask, select_lines
from loopserve.kernels.key_scores import key_attention_mass
from loopserve.kernels.vertical_slash import vertical_slash_attention
from loopserve.kernels.view_decode import view_decode_attention
from prefill_attention_kernel import REGIMES, synthetic_qkv  # benchmarks/ is this script's folder

try:  # optional: the reference FlashAttention implementation
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def timed_ms(fn, repeat: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa_prefill(q, k, v):
    """Dense causal SDPA of the n new rows over N keys (rows aligned to the last keys)."""
    n, N = q.shape[1], k.shape[1]
    if n == N:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(n, N)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]


def reference_rows(q, k, v, pattern, rows):
    """fp64 masked softmax over the pattern's cells for the given new rows (CPU)."""
    H, _, D = q.shape
    G = H // k.shape[0]
    out = torch.empty(H, len(rows), D, dtype=torch.float64)
    for h in range(H):
        mask = pattern_mask(pattern, h // G, rows)
        s = (q[h, rows].double() @ k[h // G].double().T) * D**-0.5
        out[h] = torch.softmax(s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0) @ v[h // G].double()
    return out


def bench_prefill(args, n: int, N: int, device: torch.device, dtype: torch.dtype) -> dict:
    q, k, v = synthetic_qkv(args.heads, args.kv_heads, n, N, args.head_dim, **REGIMES[args.regime])
    t0 = time.perf_counter()
    pattern = select_lines(q, k, alpha=args.alpha, n_probe=args.probe)
    select_s = time.perf_counter() - t0
    qd, kd, vd = (x.to(device, dtype) for x in (q, k, v))
    sparse = lambda: vertical_slash_attention(qd, kd, vd, pattern.vertical, pattern.slash)  # noqa: E731
    result = {
        "n": n,
        "N": N,
        "density": pattern_density(pattern),
        "probe_mass": pattern.probe_mass.mean().item(),
        "lines_per_head": pattern.num_lines().float().mean().item(),
        "select_cpu_s": select_s,
        "triton_ms": timed_ms(sparse, args.repeat, device),
        "sdpa_ms": timed_ms(lambda: sdpa_prefill(qd, kd, vd), args.repeat, device),
    }
    if flash_attn_func is not None and device.type == "cuda":
        # (batch, rows, heads, D); causal aligns the rows to the last keys, as here.
        qf, kf, vf = (x.transpose(0, 1)[None].contiguous() for x in (qd, kd, vd))
        result["flash_attn_ms"] = timed_ms(lambda: flash_attn_func(qf, kf, vf, causal=True), args.repeat, device)
    result["speedup_vs_sdpa"] = result["sdpa_ms"] / result["triton_ms"]
    rows = torch.linspace(0, n - 1, min(32, n)).long().unique()
    ref = reference_rows(qd.cpu().float(), kd.cpu().float(), vd.cpu().float(), pattern, rows)
    # In the input dtype (with its output rounding), and the kernel's own error (fp32 output).
    for key, out_dtype in (("max_abs_err_vs_fp64", None), ("max_abs_err_fp32_out_vs_fp64", torch.float32)):
        out = vertical_slash_attention(qd, kd, vd, pattern.vertical, pattern.slash, out_dtype=out_dtype)[0]
        result[key] = (out[:, rows].double().cpu() - ref).abs().max().item()
    return result


def bench_decode(args, N: int, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(N)
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    q = torch.randn(H, 1, D, generator=g).to(device, dtype)
    k = torch.randn(Hkv, N, D, generator=g).to(device, dtype)
    v = torch.randn(Hkv, N, D, generator=g).to(device, dtype)
    L = min(args.budget, N)
    idx = torch.stack([torch.randperm(N, generator=g)[:L].sort().values for _ in range(Hkv)]).to(device)
    gather = idx[..., None].expand(Hkv, L, D)
    k_view, v_view = torch.gather(k, 1, gather), torch.gather(v, 1, gather)

    def sdpa(kk, vv):
        return F.scaled_dot_product_attention(q[None], kk[None], vv[None], enable_gqa=True)[0]

    result = {
        "N": N,
        "view_keys": L,
        "triton_view_ms": timed_ms(lambda: view_decode_attention(q, k, v, idx), args.repeat, device),
        "sdpa_compact_view_ms": timed_ms(lambda: sdpa(k_view, v_view), args.repeat, device),
        "sdpa_full_ms": timed_ms(lambda: sdpa(k, v), args.repeat, device),
    }
    out = view_decode_attention(q, k, v, idx)[0].float()
    result["max_abs_err_vs_sdpa_view"] = (out - sdpa(k_view, v_view).float()).abs().max().item()

    # Phase 2's re-scoring of every input key by the last n_d = 16 generated queries.
    q_buf = torch.randn(H, 16, D, generator=g).to(device, dtype)
    scale = D**-0.5

    def torch_scores():  # the torch path of loopserve.cache.scoring.attention_scores
        logits = (q_buf.float() * scale).reshape(Hkv, -1, D) @ k.float().transpose(-1, -2)
        return torch.softmax(logits, dim=-1).sum(dim=1)

    result["scoring_triton_ms"] = timed_ms(lambda: key_attention_mass(q_buf, k, scale), args.repeat, device)
    result["scoring_torch_ms"] = timed_ms(torch_scores, args.repeat, device)
    result["scoring_max_abs_err"] = (key_attention_mass(q_buf, k, scale) - torch_scores()).abs().max().item()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, nargs="*", default=[32768, 131072], help="total keys")
    ap.add_argument("--n", type=int, nargs="*", default=None, help="new rows (default: N and 8192)")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--probe", type=int, default=64, help="random probe rows of the selection")
    ap.add_argument("--regime", default="banded", choices=list(REGIMES))
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--budget", type=int, default=1024 + 36, help="decode view keys per KV head (B + sinks + recent)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON file (default: stdout)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU tensors under Triton's interpreter (no GPU)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.N, args.n, args.heads, args.kv_heads, args.head_dim, args.budget, args.repeat = [256], [256, 64], 4, 2, 64, 48, 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU (or --smoke for a CPU check of the script)")
    else:
        device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    import triton

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}), Triton interpreter",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "alpha": args.alpha,
        "regime": args.regime,
        "repeat": args.repeat,
        "smoke": args.smoke,
        "prefill": [],
        "decode": [],
    }
    for N in args.N:
        for n in args.n or [N, 8192]:
            if n <= N:
                report["prefill"].append(bench_prefill(args, n, N, device, dtype))
                print(json.dumps(report["prefill"][-1]), file=sys.stderr, flush=True)
        report["decode"].append(bench_decode(args, N, device, dtype))
        print(json.dumps(report["decode"][-1]), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return report


if __name__ == "__main__":
    main()
