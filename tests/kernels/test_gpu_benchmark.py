"""benchmarks/gpu_kernels.py --smoke: the device benchmark's script runs end to end on CPU
tensors under Triton's interpreter and writes its JSON (its times mean nothing there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.kernels.conftest import need_triton
from tests.kernels.test_vertical_slash import BF16_TARGET

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_the_report(tmp_path):
    need_triton()
    out = tmp_path / "gpu.json"
    path = os.pathsep.join(p for p in [str(ROOT / "src"), os.environ.get("PYTHONPATH")] if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--smoke", "--out", str(out)], check=True, env=env, cwd=ROOT)
    report = json.loads(out.read_text())
    assert report["smoke"] and report["dtype"] == "bf16" and "Triton interpreter" in report["device"]
    assert [(r["n"], r["N"]) for r in report["prefill"]] == [(256, 256), (64, 256)]
    for row in report["prefill"]:
        assert 0 < row["density"] < 1 and row["triton_ms"] > 0 and row["sdpa_ms"] > 0
        assert row["max_abs_err_fp32_out_vs_fp64"] <= BF16_TARGET
    (decode,) = report["decode"]
    assert decode["view_keys"] == 48 and decode["max_abs_err_vs_sdpa_view"] < 1e-2
    assert decode["scoring_triton_ms"] > 0 and decode["scoring_max_abs_err"] < 1e-5
