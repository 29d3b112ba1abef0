"""kquant-perplexity --exact and kquant-imatrix --exact against the real llama-perplexity and
llama-imatrix, run in the same test (tests/test_exact.py compares with outputs committed once;
these follow whatever llama.cpp build they are given).

Needs the binaries: $KQUANT_LLAMA_PERPLEXITY / $KQUANT_LLAMA_IMATRIX, else on PATH, else (for
llama-imatrix) next to the llama-perplexity found; skipped without them. --exact mirrors the x86
AVX2 build (tests/data/perplexity_ref/README.md), so a build that reports no AVX2, or AVX512, is
skipped too. Their shared libraries are looked up next to the binary (LD_LIBRARY_PATH).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"
PG84 = ROOT.parent / "shared" / "text" / "calibration" / "pg84.txt"

PPL_PATTERN = r"\[\d+\][\d.]+,|Final estimate: PPL = [\d.]+ \+/- [\d.]+"


def _binary(env: str, name: str, beside: Path | None = None) -> Path | None:
    exe = os.environ.get(env)
    if exe:
        return Path(exe) if Path(exe).is_file() else None
    exe = shutil.which(name)
    if exe:
        return Path(exe)
    if beside is not None and (beside.parent / name).is_file():
        return beside.parent / name
    return None


def _llama_perplexity() -> Path | None:
    return _binary("KQUANT_LLAMA_PERPLEXITY", "llama-perplexity")


def _llama_imatrix() -> Path | None:
    return _binary("KQUANT_LLAMA_IMATRIX", "llama-imatrix", beside=_llama_perplexity())


def _run_llama(exe: Path, args: list[str], complete) -> str:
    """The binary's stdout and stderr together. llama.cpp's log is asynchronous and sometimes
    loses its last lines at exit: rerun (up to 3 times) until `complete(output)`, else skip."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(exe.parent) + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))
    for _ in range(3):
        done = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout + "\n" + done.stderr
        info = re.search(r"system_info:.*", out)
        if info and ("AVX2 = 1" not in info.group() or re.search(r"AVX512\w* = 1", info.group())):
            pytest.skip(f"{exe.name} is not llama.cpp's x86 AVX2 build, which --exact mirrors: "
                        f"{info.group()}")
        if complete(out):
            return out
    pytest.skip(f"{exe.name}'s output was cut short 3 times (llama.cpp's asynchronous log)")


def _ppl_values(text: str) -> list[str]:
    return re.findall(PPL_PATTERN, text)


def _complete(n_chunks: int):
    def check(out: str) -> bool:
        found = _ppl_values(out)
        return len(found) == n_chunks + 1 and found[-1].startswith("Final estimate")
    return check


# --- perplexity ------------------------------------------------------------------------------

# (type, arguments): -c 128 --chunks 5 runs the 5 chunks as one batch of sequences (llama.cpp's
# equal split: 5 x 102 tokens per physical batch); -c 256 -b 128 splits each chunk into two
# batches through the KV cache.
C128 = ["-c", "128", "--chunks", "5"]
PPL_CASES = [pytest.param(t, C128, id=t) for t in
             ("F32", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")] + \
            [pytest.param("Q4_K_M", ["-c", "256", "-b", "128", "--chunks", "3"], id="Q4_K_M-c256-b128")]


@pytest.mark.parametrize("ftype, args", PPL_CASES)
def test_exact_perplexity_prints_llama_perplexitys_digits(capsys, tmp_path, tiny_llama_f32, ftype, args):
    """The tiny model quantized by kquant-quantize (llama-quantize's bytes): kquant-perplexity
    --exact and llama-perplexity, each with -t 1 and -t 2, print the same per-chunk values and
    final estimate, all four."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.cli.perplexity import main

    exe = _llama_perplexity()
    if exe is None:
        pytest.skip("llama-perplexity not found (set KQUANT_LLAMA_PERPLEXITY)")
    if not WIKI.is_file():
        pytest.skip(f"evaluation text ({WIKI}) not available")
    model = tiny_llama_f32
    if ftype != "F32":
        model = tmp_path / f"tiny-{ftype}.gguf"
        quantize_model(tiny_llama_f32, model, ftype, QuantizeOptions(), progress=False)
    n_chunks = int(args[args.index("--chunks") + 1])
    outputs = {}
    for t in ("1", "2"):
        assert main(["-m", str(model), "-f", str(WIKI), *args, "--exact", "-t", t, "--no-progress"]) == 0
        outputs[f"kquant -t {t}"] = _ppl_values(capsys.readouterr().out)
        theirs = _run_llama(exe, ["-m", str(model), "-f", str(WIKI), *args, "-t", t], _complete(n_chunks))
        outputs[f"llama-perplexity -t {t}"] = _ppl_values(theirs)
    want = outputs["llama-perplexity -t 1"]
    assert len(want) == n_chunks + 1
    for name, got in outputs.items():
        assert got == want, name


# --- imatrix ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ftype", ["F32", "Q4_K_M"])
def test_exact_imatrix_is_llama_imatrixs(capsys, tmp_path, tiny_llama_f32, ftype):
    """kquant-imatrix --exact and llama-imatrix (-t 1 and -t 2) with test_exact's settings
    (pg84.txt, -c 128 --chunks 6 --process-output: 6 sequences in one batch): the same entries,
    the same counts, every sum equal (checked within 1e-6 relative first, then to the bit), and
    the same printed chunk perplexities."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.calibration.imatrix_file import load_imatrix
    from kquant.cli.imatrix import main

    exe = _llama_imatrix()
    if exe is None:
        pytest.skip("llama-imatrix not found (set KQUANT_LLAMA_IMATRIX or KQUANT_LLAMA_PERPLEXITY)")
    if not PG84.is_file():
        pytest.skip("calibration texts not available")
    model = tiny_llama_f32
    if ftype != "F32":
        model = tmp_path / f"tiny-{ftype}.gguf"
        quantize_model(tiny_llama_f32, model, ftype, QuantizeOptions(), progress=False)
    args = ["-m", str(model), "-f", str(PG84), "-c", "128", "--chunks", "6", "--process-output"]
    ours = tmp_path / "kquant.gguf"
    assert main([*args, "-o", str(ours), "-t", "2", "--device", "cpu", "--exact", "--no-progress"]) == 0
    printed = _ppl_values(capsys.readouterr().out)
    assert len(printed) == 7
    mine = load_imatrix(ours)
    for t in ("1", "2"):
        path = tmp_path / f"llama-t{t}.gguf"
        out = _run_llama(exe, [*args, "-o", str(path), "-t", t],
                         lambda o: len(_ppl_values(o)) == 7 and path.is_file())
        assert _ppl_values(out) == printed, f"-t {t}"
        ref = load_imatrix(path)
        assert sorted(mine.entries) == sorted(ref.entries)
        assert (mine.chunk_count, mine.chunk_size, mine.datasets) == \
            (ref.chunk_count, ref.chunk_size, ref.datasets)
        for name, e in ref.entries.items():
            np.testing.assert_array_equal(mine.entries[name].counts, e.counts, err_msg=f"{name} -t {t}")
            np.testing.assert_allclose(mine.entries[name].sums, e.sums, rtol=1e-6, atol=0,
                                       err_msg=f"{name} -t {t}")
            np.testing.assert_array_equal(mine.entries[name].sums.view(np.uint32), e.sums.view(np.uint32),
                                          err_msg=f"{name} -t {t}")
