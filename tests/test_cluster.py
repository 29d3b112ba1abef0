"""--cluster: kquant-imatrix, -quantize and -perplexity on a Dask LocalCluster (kquant.cluster).

Each command runs in a subprocess, as a user runs it, on the project's tiny model: once in one
process and once on `local:N` worker processes, some with a worker killed mid-run
(KQUANT_CLUSTER_DIE makes the worker running task INDEX exit once). The quantized files are
byte for byte the single-process ones, the imatrix has equal counts and sums within float32
rounding of the single-process ones (and is the same for any number of workers), the
perplexity figures are equal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from kquant.calibration.imatrix_file import load_imatrix  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "tiny-llama"
TEXT = ROOT / "data" / "calibration.txt"


def run(tool: str, *args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = {**os.environ, "KQUANT_CLUSTER_TIMEOUT": "15", **(env or {})}
    p = subprocess.run([sys.executable, "-m", f"kquant.cli.{tool}", *map(str, args)], capture_output=True,
                       text=True, env=full, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def die_at(index: int, marker: Path) -> dict:
    return {"KQUANT_CLUSTER_DIE": f"{index}:{marker}"}


def test_imatrix_on_workers_equals_one_process_even_when_a_worker_dies(tmp_path):
    args = ["-m", MODEL, "-f", TEXT, "-c", "128", "-b", "256", "--chunks", "24"]
    one = run("imatrix", *args, "-o", tmp_path / "one.gguf")
    marker = tmp_path / "died"
    two = run("imatrix", *args, "-o", tmp_path / "two.gguf", "--cluster", "local:2", env=die_at(3, marker))
    run("imatrix", *args, "-o", tmp_path / "single.gguf", "--cluster", "local:1")
    assert marker.exists()  # a worker did die, and its batch was redone
    assert "cluster: 2 local worker processes" in two.stderr
    # the per-chunk perplexities and the final estimate: the same digits
    assert two.stdout.splitlines()[:2] == one.stdout.splitlines()[:2]
    # any number of workers, any order of completion: the same file
    assert (tmp_path / "two.gguf").read_bytes() == (tmp_path / "single.gguf").read_bytes()
    a, b = load_imatrix(tmp_path / "one.gguf"), load_imatrix(tmp_path / "two.gguf")
    assert a.entries.keys() == b.entries.keys() and len(a.entries) == 28
    assert (a.chunk_count, a.chunk_size, a.datasets) == (b.chunk_count, b.chunk_size, b.datasets)
    for name, e in a.entries.items():
        assert np.array_equal(e.counts, b.entries[name].counts), name
        # llama-imatrix's float32 running sums against float64 sums of per-batch float32 partials
        rel = np.abs(e.sums.astype(np.float64) - b.entries[name].sums) / e.sums
        assert rel.max() < 1e-4, (name, rel.max())


def test_quantize_on_workers_is_byte_identical_even_when_a_worker_dies(tmp_path):
    imatrix = tmp_path / "im.gguf"
    run("imatrix", "-m", MODEL, "-f", TEXT, "-c", "128", "--chunks", "8", "-o", imatrix)
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    run("quantize", "--imatrix", imatrix, MODEL, one, "Q4_K_M")
    marker = tmp_path / "died"
    p = run("quantize", "--cluster", "local:2", "--imatrix", imatrix, MODEL, two, "Q4_K_M",
            env=die_at(5, marker))
    assert marker.exists()
    assert "quant size = 3.19 MiB" in p.stdout
    assert one.read_bytes() == two.read_bytes()
    assert not [f for f in tmp_path.iterdir() if f.name not in ("im.gguf", "one.gguf", "two.gguf", "died")]


def test_perplexity_on_workers_prints_the_same_figures(tmp_path, tiny_llama_quant):
    model = tiny_llama_quant("Q4_K_M")
    args = ["-m", model, "-f", TEXT, "-c", "128", "-b", "256", "--chunks", "10"]
    one = run("perplexity", *args)
    two = run("perplexity", *args, "--cluster", "local:2")
    figures = [line for line in one.stdout.splitlines() if not line.startswith("kquant-perplexity:")]
    assert figures and figures == [line for line in two.stdout.splitlines()
                                   if not line.startswith("kquant-perplexity:")]
    assert "Final estimate: PPL = " in two.stdout


@pytest.mark.slow
def test_gptq_on_workers_is_the_same_for_any_worker_count(tmp_path):
    """--method gptq's calibration pass (imatrix and Hessians) and its sweeps on the workers:
    one worker or two, the same file; from saved Hessians, the single-process file."""
    common = ["--method", "gptq", "--gptq-one-shot", "--calibrate", TEXT, "-c", "128", "--chunks", "12"]
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    p = run("quantize", *common, "--cluster", "local:1", MODEL, one, "Q4_K_M")
    run("quantize", *common, "--cluster", "local:2", MODEL, two, "Q4_K_M")
    assert "gptq: " in p.stderr and "matrices swept" in p.stderr
    assert one.read_bytes() == two.read_bytes()
    hess = tmp_path / "h.safetensors"
    run("imatrix", "-m", MODEL, "-f", TEXT, "-c", "128", "--chunks", "12", "--no-ppl", "-o", tmp_path / "im.gguf",
        "--hessian-out", hess)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    run("quantize", "--method", "gptq", "--hessian", hess, MODEL, a, "Q4_K_M")
    run("quantize", "--method", "gptq", "--hessian", hess, "--cluster", "local:2", MODEL, b, "Q4_K_M")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("tool,args", [
    ("imatrix", ["-m", MODEL, "-f", TEXT, "-o", "OUT"]),
    ("quantize", [MODEL, "OUT", "Q4_K_M"]),
    ("perplexity", ["-m", MODEL, "-f", TEXT]),
])
def test_a_scheduler_that_cannot_be_reached_is_one_error(tmp_path, tool, args):
    out = tmp_path / "out.gguf"
    p = run(tool, *[out if a == "OUT" else a for a in args], "--cluster", "tcp://127.0.0.1:9",
            env={"KQUANT_CLUSTER_TIMEOUT": "2"}, check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith(f"kquant-{tool}: error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_cluster_arguments_are_one_error(tmp_path):
    p = run("imatrix", "-m", MODEL, "-f", TEXT, "-o", tmp_path / "o.gguf", "--cluster", "local:0", check=False)
    assert p.returncode == 1 and "error: --cluster local:0: local:N needs a number of workers N >= 1" in p.stderr
    p = run("perplexity", "-m", MODEL, "--kl-divergence", "--kl-divergence-base", tmp_path / "x.kld",
            "--cluster", "local:2", check=False)
    assert p.returncode == 1 and "--cluster runs llama-perplexity's default mode only" in p.stderr
    # without Dask installed: what to install
    code = ("import sys; sys.modules['distributed'] = None; from kquant.cli.imatrix import main; "
            f"sys.exit(main(['-m', {str(MODEL)!r}, '-f', {str(TEXT)!r}, '-o', {str(tmp_path / 'o.gguf')!r}, "
            "'--cluster', 'local:2']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert "error: --cluster needs Dask: pip install 'kquant[dist]'" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_cancels_the_work_and_leaves_nothing(tmp_path):
    """SIGINT while the workers compute: the interrupt line, exit 130, no output, no scratch
    folder, no worker process left."""
    import psutil

    long_text = tmp_path / "long.txt"
    long_text.write_text(TEXT.read_text(encoding="utf-8") * 20, encoding="utf-8")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "im.gguf"
    p = subprocess.Popen([sys.executable, "-m", "kquant.cli.imatrix", "-m", str(MODEL), "-f", str(long_text),
                          "-c", "64", "-b", "64", "-ofreq", "100000", "-o", str(out), "--cluster", "local:2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "TMPDIR": str(scratch)},
                         # as in a terminal: a test run in the background (nohup ... &, as CI may
                         # be) ignores SIGINT, and a child would inherit that
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while "computing over" not in seen and time.monotonic() < deadline:
            seen += p.stderr.readline()
        assert "computing over" in seen, seen
        time.sleep(2)
        workers = psutil.Process(p.pid).children(recursive=True)
        assert len(workers) >= 2
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "kquant-imatrix: interrupted" in err and "Traceback" not in err
    assert not out.exists() and list(scratch.iterdir()) == []
    time.sleep(1)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
