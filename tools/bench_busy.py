#!/usr/bin/env python3
"""kquant's speed on a quiet CPU and on a busy one (another process spinning on every core),
for thread counts and OpenMP wait policies side by side.

For each setting (an environment such as GOMP_SPINCOUNT=0, and a -t value; "default" is no
-t, what a user gets) it runs, quiet and then busy:
- kquant-generate: greedy tokens/s after the first (`-n` tokens of a short prompt);
- kquant-perplexity: tokens/s of the compute over `--chunks` chunks of 512;
- with --llama-perplexity BIN, llama-perplexity on the same file, chunks and threads.
"Busy" starts one `while True: pass` Python process per CPU before the runs and stops them
after. Every run is repeated `--repeats` times, best kept.

    python tools/bench_busy.py --model smollm2-Q4_K_M.gguf --env GOMP_SPINCOUNT=10000 --env GOMP_SPINCOUNT=0
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_perplexity import DEFAULT_TEXT, run_llama, smollm2_q4_k_m  # noqa: E402


@contextmanager
def busy(n: int):
    """n processes, each spinning on a core, for the duration."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0)
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _env(extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _threads(t: str) -> list[str]:
    return [] if t == "default" else ["-t", t]


def generate(model: Path, t: str, extra: str, n: int) -> float:
    cmd = [sys.executable, "-m", "kquant.cli.generate", "-m", str(model), "-p", "Once upon a time, in a small village,",
           "-n", str(n), "--device", "cpu", *_threads(t)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(extra), timeout=1800)
    m = re.search(r"\(([\d.]+) tokens/s\)", p.stderr + p.stdout)
    if p.returncode or not m:
        sys.exit(f"kquant-generate failed:\n{p.stderr[-2000:]}")
    return float(m[1])


def perplexity(model: Path, text: Path, t: str, extra: str, chunks: int) -> float:
    cmd = [sys.executable, "-m", "kquant.cli.perplexity", "-m", str(model), "-f", str(text), "--chunks", str(chunks),
           "--device", "cpu", "--no-progress", *_threads(t)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(extra), timeout=1800)
    m = re.search(r"tokens in ([\d.]+) s", p.stdout)
    if p.returncode or not m:
        sys.exit(f"kquant-perplexity failed:\n{p.stderr[-2000:]}")
    return chunks * 512 / float(m[1])


def llama(binary: str, model: Path, text: Path, t: str, chunks: int) -> float:
    threads = len(os.sched_getaffinity(0)) if t == "default" else int(t)
    a = argparse.Namespace(ctx=512, batch=2048, chunks=chunks, threads=threads)
    return chunks * 512 / run_llama(binary, model, text, a)["compute"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF model (default: SmolLM2-135M Q4_K_M made by kquant-quantize)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--env", action="append", default=None,
                    help="extra environment, KEY=VALUE[,KEY=VALUE]; repeat for several (default: as is)")
    ap.add_argument("--threads", nargs="+", default=["1", "default"])
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("-n", type=int, default=64, help="tokens to generate")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama-perplexity", default=os.environ.get("KQUANT_LLAMA_PERPLEXITY"))
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kquant" / "bench"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else smollm2_q4_k_m(work, 2)
    text = Path(a.text)
    envs = a.env or [""]
    n_cpu = len(os.sched_getaffinity(0))
    rows = []
    for state in ("quiet", "busy"):
        ctx = busy(n_cpu) if state == "busy" else _quiet()
        with ctx:
            for extra in envs:
                for t in a.threads:
                    g = max(generate(model, t, extra, a.n) for _ in range(a.repeats))
                    p = max(perplexity(model, text, t, extra, a.chunks) for _ in range(a.repeats))
                    rows.append((state, extra or "-", t, "kquant", g, p))
                    print(f"{state:5s} {extra or '-':28s} -t {t:8s} kquant  generate {g:7.1f} tok/s  "
                          f"perplexity {p:7.1f} tok/s", flush=True)
            if a.llama_perplexity:
                for t in a.threads:
                    p = max(llama(a.llama_perplexity, model, text, t, a.chunks) for _ in range(a.repeats))
                    print(f"{state:5s} {'-':28s} -t {t:8s} llama   {'':24s}perplexity {p:7.1f} tok/s", flush=True)
    print(f"model {model.name}, {n_cpu} CPUs, busy = {n_cpu} spinning processes, best of {a.repeats}")
    return 0


@contextmanager
def _quiet():
    yield


if __name__ == "__main__":
    sys.exit(main())
