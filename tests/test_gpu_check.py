"""tools/gpu_check.sh, in the mode it takes without a GPU: Numba's CUDA simulator on the CPU."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_simulator_mode():
    """`--sim` runs the simulator tests and the benchmarks' simulator / CPU modes (~90 s on
    2 cores) and ends with one table, every row ok."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--sim"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    table = out[out.index("## kquant GPU check: mode sim"):].splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| check")]
    checks = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows}
    for step in ("pytest simulator: runtime", "pytest simulator: kernels", "bench_matvec_cuda --small",
                 "bench_runtime_devices (cpu)", "matvec Q4_K", "perplexity tiny-llama-Q4_K_M.gguf"):
        assert checks.get(step) == "ok", (step, table)
    assert all(result == "ok" for result in checks.values()), table


def test_gpu_check_refuses_unknown_arguments():
    r = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--bogus"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage:" in r.stderr
