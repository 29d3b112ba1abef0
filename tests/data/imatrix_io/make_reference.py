"""Regenerate the reference files in this folder (see README.md).

    PYTHONPATH=. python tests/data/imatrix_io/make_reference.py [path/to/llama-imatrix]

Step 1 writes the synthetic inputs with kquant's own GGUF writer (whose bytes the tests check
against llama-imatrix's); step 2 runs llama-imatrix on them and keeps its outputs. The binary
is only needed here, never by the tests.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from kquant.calibration.imatrix_file import Imatrix, ImatrixEntry, save_imatrix_gguf

HERE = Path(__file__).resolve().parent
BINARY = Path("/work/cache/llama-build/bin/llama-imatrix")  # or the first argument


def sums(rng, n, count, scale):
    """Heavy-tailed sums of squared activations, some columns exactly zero or tiny."""
    v = rng.exponential(1.0, n) ** 2 * count * scale
    v[rng.integers(0, n, 3)] = 0.0
    v[rng.integers(0, n, 2)] *= 1e-7
    return v.astype(np.float32)


def model_imatrix(seed, count, chunk_size, dataset, expert_counts, *, attn=64, extra=False):
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=[dataset], chunk_count=count // chunk_size, chunk_size=chunk_size,
                 has_metadata=True)
    scales = {"attn_q": 1.0, "ffn_down": 300.0, "ffn_gate": 0.01}
    for b in range(3):
        for kind, n in (("attn_q", attn), ("ffn_down", 128), ("ffn_gate", 64)):
            im.entries[f"blk.{b}.{kind}.weight"] = ImatrixEntry(
                sums(rng, n, count, scales[kind] * (1 + b)), np.array([count]))
    im.entries["output.weight"] = ImatrixEntry(sums(rng, 64, count, 0.5), np.array([count]))
    ec = np.array(expert_counts, np.int64)
    ex = np.concatenate([sums(rng, 32, max(int(c), 1), 2.0) * (c > 0) for c in ec])
    im.entries["blk.0.ffn_up_exps.weight"] = ImatrixEntry(ex, ec)
    im.entries["blk.1.ffn_up_exps.weight"] = ImatrixEntry(
        np.concatenate([sums(rng, 32, int(c) + 1, 2.0) for c in ec]), ec * 0 + 1)
    # an entry whose experts all counted nothing: .dat leaves it out, statistics skip it
    im.entries["blk.2.ffn_up_exps.weight"] = ImatrixEntry(np.zeros(32 * 4, np.float32),
                                                          np.zeros(4, np.int64))
    if extra:
        im.entries["blk.3.attn_k.weight"] = ImatrixEntry(sums(rng, 64, count, 1e-4),
                                                         np.array([count]))
    return im


def inputs(dest: Path = HERE):
    """The synthetic input files a..e (GGUF, written by kquant) into `dest`."""
    # a: 3 chunks of 512, experts 700/0/300/536 tokens (one unused expert)
    save_imatrix_gguf(model_imatrix(1, 1536, 512, "a.txt", [700, 0, 300, 536]), dest / "a.gguf")
    # b: 5 chunks of 256, an extra tensor, all experts used
    save_imatrix_gguf(model_imatrix(2, 1280, 256, "b.txt", [400, 100, 500, 280], extra=True),
                      dest / "b.gguf")
    # c: an older imatrix with one count for the 4 experts (broadcast when merged with a)
    c = model_imatrix(3, 1024, 512, "c.txt", [1024])
    c.entries["blk.0.ffn_up_exps.weight"].sums = np.concatenate(
        [c.entries["blk.0.ffn_up_exps.weight"].sums] * 4)
    c.entries["blk.1.ffn_up_exps.weight"].sums = np.concatenate(
        [c.entries["blk.1.ffn_up_exps.weight"].sums] * 4)
    c.entries["blk.1.ffn_up_exps.weight"].counts = np.array([1024])
    c.entries["blk.2.ffn_up_exps.weight"].counts = np.array([0])
    save_imatrix_gguf(c, dest / "c.gguf")
    # d: another model (attn_q of 32 columns): merging it with a fails
    save_imatrix_gguf(model_imatrix(4, 512, 512, "d.txt", [1, 2, 3, 4], attn=32), dest / "d.gguf")
    # e: same sizes as a but the experts counted as 2 groups of 64: counts size mismatch
    e = model_imatrix(5, 512, 512, "e.txt", [10, 20, 30, 40])
    for k in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_up_exps.weight"):
        e.entries[k].counts = np.array([7, 9])
    save_imatrix_gguf(e, dest / "e.gguf")


# (output, stdout/stderr capture or None, llama-imatrix arguments)
RUNS = [
    # gguf -> dat and gguf -> gguf (the inputs' own chunk sizes are ignored: -c rules)
    ("a.dat", None, ["--in-file", "a.gguf", "-o", "a.dat", "--output-format", "dat"]),
    ("a_c256.dat", None, ["--in-file", "a.gguf", "-c", "256", "-o", "a_c256.dat",
                          "--output-format", "dat"]),
    ("a_copy.gguf", None, ["--in-file", "a.gguf", "-o", "a_copy.gguf"]),
    # combine two GGUF
    ("ab.gguf", None, ["--in-file", "a.gguf", "--in-file", "b.gguf", "-o", "ab.gguf"]),
    ("ab.dat", None, ["--in-file", "a.gguf", "--in-file", "b.gguf", "-o", "ab.dat",
                      "--output-format", "dat"]),
    ("ab_c300.gguf", None, ["--in-file", "a.gguf", "--in-file", "b.gguf", "-c", "300",
                            "-o", "ab_c300.gguf"]),
    ("ba_c1024_b512.gguf", None, ["--in-file", "b.gguf", "--in-file", "a.gguf", "-c", "1024",
                                  "-b", "512", "-o", "ba_c1024_b512.gguf"]),
    # dat -> gguf, legacy + legacy, mixed legacy and GGUF
    ("a_from_dat.gguf", None, ["--in-file", "a.dat", "-o", "a_from_dat.gguf"]),
    ("a_c256_from_dat_c128.gguf", None, ["--in-file", "a_c256.dat", "-c", "128",
                                         "-o", "a_c256_from_dat_c128.gguf"]),
    ("aa_dat.dat", None, ["--in-file", "a.dat", "--in-file", "a_c256.dat", "-o", "aa_dat.dat",
                          "--output-format", "dat"]),
    ("mixed.gguf", None, ["--in-file", "a.dat", "--in-file", "b.gguf", "-c", "128",
                          "-o", "mixed.gguf"]),
    ("mixed.dat", None, ["--in-file", "b.gguf", "--in-file", "a.dat", "-o", "mixed.dat",
                         "--output-format", "dat"]),
    # one count broadcast over 4 experts
    ("ca.gguf", None, ["--in-file", "c.gguf", "--in-file", "a.gguf", "-o", "ca.gguf"]),
    # statistics (printed to stderr; --no-log-prefix/timestamps for the bare text)
    ("stats_a.txt", "stderr", ["--show-statistics", "--in-file", "a.gguf"]),
    ("stats_ab.txt", "stderr", ["--show-statistics", "--in-file", "ab.gguf"]),
    ("stats_mixed.txt", "stderr", ["--show-statistics", "--in-file", "mixed.gguf"]),
    ("stats_a_dat.txt", "stderr", ["--show-statistics", "--in-file", "a.dat"]),
    ("stats_a_dat_c100_np2.txt", "stderr", ["--show-statistics", "--in-file", "a.dat",
                                            "-c", "100", "-np", "2"]),
    ("stats_run.txt", "stderr", ["--show-statistics", "--in-file", "run.gguf"]),
]
# failures (rc 1; not kept, the tests check kquant's errors): merging a with d
# ("load_imatrix: mismatched sums size for blk.0.attn_q.weight: 32 != 64") and a with e
# ("load_imatrix: mismatched counts size for blk.0.ffn_up_exps.weight: 2 != 4")
FAILING = [["--in-file", "a.gguf", "--in-file", "d.gguf", "-o", "ad.gguf"],
           ["--in-file", "a.gguf", "--in-file", "e.gguf", "-o", "ae.gguf"]]


def command(args, model="none.gguf"):
    return [str(BINARY), "-m", model, "--no-log-prefix", "--no-log-timestamps", *args]


def env():
    return dict(os.environ, LD_LIBRARY_PATH=str(BINARY.parent))


def real_run():
    """A real llama-imatrix run on the project's tiny model (converted to an F32 GGUF by
    kquant-convert), text from its README: run.gguf and run.dat, whose dataset is the prompt
    file (text.txt)."""
    repo = HERE.parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "kquant.cli.convert", "--outtype", "f32",
                        "--outfile", f"{tmp}/tiny.gguf", "--no-progress",
                        str(repo / "data" / "tiny-llama")], check=True)
        (Path(tmp) / "text.txt").write_text((repo / "data" / "tiny-llama" / "README.md")
                                            .read_text() * 3)
        for out, extra in (("run.gguf", []), ("run.dat", ["--output-format", "dat"])):
            args = ["-f", "text.txt", "-c", "128", "--chunks", "5", "-t", "2", "-o", out, *extra]
            subprocess.run(command(args, "tiny.gguf"), cwd=tmp, env=env(), check=True,
                           capture_output=True)
            shutil.copy(Path(tmp) / out, HERE / out)
            print(f"llama-imatrix -m tiny.gguf {' '.join(args)}")


def run_all():
    for args in FAILING:
        r = subprocess.run(command(args), cwd=HERE, env=env(), capture_output=True)
        assert r.returncode == 1, args
    for out, capture, args in RUNS:
        for _ in range(10):
            r = subprocess.run(command(args), cwd=HERE, env=env(), capture_output=True,
                               text=True)
            # llama.cpp's logger writes from a thread and sometimes loses the end at exit
            if not capture or "per layer" in r.stderr and r.stderr.endswith("\n\n"):
                break
        else:
            sys.exit(f"{out}: incomplete output from llama-imatrix")
        if capture:
            text = getattr(r, capture)
            (HERE / out).write_text(text if r.returncode == 0 else f"rc={r.returncode}\n{text}")
        elif r.returncode:
            sys.exit(f"{out}: llama-imatrix failed:\n{r.stderr}")
        print(f"llama-imatrix {' '.join(args)}  -> rc {r.returncode}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        BINARY = Path(sys.argv[1]).resolve()
    inputs()
    real_run()
    run_all()
