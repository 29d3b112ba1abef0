"""kquant.calibration.imatrix_file / kquant.calibration.statistics against llama-imatrix's own files, byte for byte.

The references in tests/data/imatrix_io were made by llama-imatrix (see the README there and
make_reference.py, whose RUNS list of command lines these tests replay); the binary itself
is not needed here.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from kquant.calibration import imatrix_file as imatrix_io
from kquant.calibration.imatrix_file import (Imatrix, ImatrixEntry, accumulate, at_path, load_imatrix,
                               save_imatrix, save_imatrix_legacy,
                               weights_for_quantize)
from kquant.calibration.statistics import (compute_statistics, format_statistics, plot_statistics,
                                  process_tensor_name, statistics_of_file)
from kquant.errors import ModelError

DATA = Path(__file__).parent / "data" / "imatrix_io"


def _load_reference_module():
    spec = importlib.util.spec_from_file_location("imatrix_make_reference",
                                                  DATA / "make_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF = _load_reference_module()


def option(args: list[str], name: str, default=None):
    return args[args.index(name) + 1] if name in args else default


def chunk_size(args: list[str]) -> int:
    """IMatrixCollector's chunk size, n_ctx / n_parallel, as llama-imatrix's main() sets them
    before loading --in-file: n_seq = max(1, n_batch / n_ctx), n_parallel = n_seq,
    n_ctx = n_seq * n_ctx (so it is -c itself). --show-statistics loads before that, with
    -c / -np as given."""
    n_ctx, n_batch = int(option(args, "-c", 512)), int(option(args, "-b", 2048))
    n_parallel = int(option(args, "-np", 1))
    if "--show-statistics" in args:
        return n_ctx // n_parallel
    n_seq = max(1, n_batch // n_ctx)
    return (n_seq * n_ctx) // n_seq


def combine(args: list[str]) -> Imatrix:
    im = Imatrix()
    for i, a in enumerate(args):
        if a == "--in-file":
            accumulate(im, load_imatrix(DATA / args[i + 1]), chunk_size(args))
    return im


def same_bytes(got: Path, want: Path) -> None:
    a, b = got.read_bytes(), want.read_bytes()
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        pytest.fail(f"{got.name} differs from {want.name} at byte {at} "
                    f"({len(a)} vs {len(b)} bytes)")


FILE_RUNS = [(out, args) for out, capture, args in REF.RUNS if capture is None]
STAT_RUNS = [(out, args) for out, capture, args in REF.RUNS if capture == "stderr"]


def test_inputs_reproducible(tmp_path):
    """The synthetic inputs come out of save_imatrix_gguf as committed; a_copy.gguf is
    llama-imatrix's rewrite of a.gguf: kquant's GGUF writer is byte-identical to gguf.cpp."""
    REF.inputs(tmp_path)
    for name in ("a.gguf", "b.gguf", "c.gguf", "d.gguf", "e.gguf"):
        same_bytes(tmp_path / name, DATA / name)
    same_bytes(DATA / "a.gguf", DATA / "a_copy.gguf")


@pytest.mark.parametrize("out,args", FILE_RUNS, ids=[o for o, _ in FILE_RUNS])
def test_combine_and_convert(tmp_path, out, args):
    im = combine(args)
    assert not im.is_legacy and im.chunk_size == chunk_size(args)
    got = save_imatrix(im, tmp_path / out, option(args, "--output-format", "gguf"))
    same_bytes(got, DATA / out)


def test_real_run(tmp_path):
    """llama-imatrix -f text.txt on the tiny model: the GGUF lists the prompt file after the
    loaded datasets, the .dat stores it; kquant writes both from the collected data."""
    raw = load_imatrix(DATA / "run.gguf")
    assert raw.datasets == ["text.txt"] and raw.chunk_size == 128 and raw.chunk_count == 5
    collected = Imatrix()
    accumulate(collected, raw, 128)
    same_bytes(save_imatrix(collected, tmp_path / "same.gguf"), DATA / "run.gguf")
    # as the collector holds it during a run: no --in-file datasets, the prompt file given
    collected.datasets = []
    same_bytes(save_imatrix(collected, tmp_path / "run.gguf", "gguf", prompt_file="text.txt"),
               DATA / "run.gguf")
    same_bytes(save_imatrix(collected, tmp_path / "run.dat", "dat", prompt_file="text.txt"),
               DATA / "run.dat")
    # the dataset of a .dat written without a prompt file is the last loaded one
    collected.datasets = ["x.txt", "text.txt"]
    same_bytes(save_imatrix_legacy(collected, tmp_path / "run2.dat"), DATA / "run.dat")


def test_legacy_file_read_back():
    im = load_imatrix(DATA / "a.dat")
    assert im.is_legacy and im.chunk_count == 3 and im.datasets == ["a.txt"]
    assert "blk.2.ffn_up_exps.weight" not in im.entries  # no data: left out
    assert int(im.entries["blk.0.ffn_up_exps.weight"].counts[0]) == 2  # ceil(700 / 512)
    # the unused expert is stored as 1 * ncall, i.e. weight 1 for quantization
    w = weights_for_quantize(im)["blk.0.ffn_up_exps.weight"].reshape(4, 32)
    assert np.all(w[1] == 1.0)


def test_accumulate_semantics():
    a = load_imatrix(DATA / "a.gguf")
    c = load_imatrix(DATA / "c.gguf")
    im = Imatrix()
    accumulate(im, c, 512)
    accumulate(im, a, 512)
    e = im.entries["blk.0.ffn_up_exps.weight"]
    # c's single count is broadcast over a's 4 experts before adding
    assert list(e.counts) == [1024 + 700, 1024, 1024 + 300, 1024 + 536]
    assert im.datasets == ["c.txt", "a.txt"]
    assert im.chunk_count == (1024 + 1536) // 512 and im.chunk_size == 512
    np.testing.assert_array_equal(
        im.entries["blk.1.attn_q.weight"].sums,
        c.entries["blk.1.attn_q.weight"].sums + a.entries["blk.1.attn_q.weight"].sums)
    # legacy: scaled back by the chunk size, float32
    leg = load_imatrix(DATA / "a_c256.dat")
    im = Imatrix()
    accumulate(im, leg, 128)
    e, le = im.entries["blk.0.attn_q.weight"], leg.entries["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(e.sums, le.sums * np.float32(128))
    assert list(e.counts) == [int(le.counts[0]) * 128]
    assert im.chunk_count == int(max(x.counts.max() for x in im.entries.values())) // 128


@pytest.mark.parametrize("other,message", [
    ("d.gguf", "mismatched sums size for blk.0.attn_q.weight: 32 != 64"),
    ("e.gguf", "mismatched counts size for blk.0.ffn_up_exps.weight: 2 != 4"),
])
def test_mismatched_in_files(other, message):
    im = Imatrix()
    accumulate(im, load_imatrix(DATA / "a.gguf"), 512)
    before = {k: (v.sums.copy(), v.counts.copy()) for k, v in im.entries.items()}
    with pytest.raises(ModelError) as err:
        accumulate(im, load_imatrix(DATA / other), 512)
    assert message in str(err.value) and other in str(err.value)
    # the collector is left as it was
    assert im.datasets == ["a.txt"] and set(im.entries) == set(before)
    for k, (s, c) in before.items():
        np.testing.assert_array_equal(im.entries[k].sums, s)
        np.testing.assert_array_equal(im.entries[k].counts, c)


def test_accumulate_misuse():
    with pytest.raises(ModelError, match="chunk size 0"):
        accumulate(Imatrix(), load_imatrix(DATA / "a.gguf"), 0)
    with pytest.raises(ModelError, match="legacy"):
        accumulate(load_imatrix(DATA / "a.dat"), load_imatrix(DATA / "a.gguf"), 512)
    with pytest.raises(ModelError, match="legacy"):
        save_imatrix(load_imatrix(DATA / "a.dat"), "/nonexistent/x.gguf")
    im = Imatrix()
    accumulate(im, load_imatrix(DATA / "a.gguf"), 512)
    with pytest.raises(ValueError, match="invalid output format"):
        save_imatrix(im, "/nonexistent/x.gguf", "bin")


@pytest.mark.parametrize("name,cut", [("a.gguf", 200), ("a.gguf", 7000), ("a.dat", 100),
                                      ("a.dat", 4000), ("a.dat", 2)])
def test_truncated_files(tmp_path, name, cut):
    data = (DATA / name).read_bytes()
    p = tmp_path / name
    p.write_bytes(data[:cut])
    with pytest.raises(ModelError):
        load_imatrix(p)


def test_dat_trailer_optional(tmp_path):
    """The chunk count and dataset after the entries are optional, as far as they go."""
    data = (DATA / "a.dat").read_bytes()
    trailer = 4 + 4 + len(b"a.txt")
    p = tmp_path / "t.dat"
    p.write_bytes(data[:-trailer])
    im = load_imatrix(p)
    assert im.chunk_count == 0 and im.datasets == []
    p.write_bytes(data[:-2])
    im = load_imatrix(p)
    assert im.chunk_count == 3 and im.datasets == []
    assert len(im.entries) == len(load_imatrix(DATA / "a.dat").entries)


def test_atomic_write(tmp_path, monkeypatch):
    im = Imatrix()
    accumulate(im, load_imatrix(DATA / "a.gguf"), 512)
    for fmt in ("gguf", "dat"):
        target = tmp_path / f"imatrix.{fmt}"
        target.write_bytes(b"earlier")
        calls = []

        def fail_late(a, calls=calls):
            calls.append(1)
            if len(calls) > 3:
                raise KeyboardInterrupt
            return np.ascontiguousarray(a, dtype="<f4").tobytes()

        monkeypatch.setattr(imatrix_io, "_f32_bytes", fail_late)
        with pytest.raises(KeyboardInterrupt):
            save_imatrix(im, target, fmt)
        monkeypatch.undo()
        assert target.read_bytes() == b"earlier"
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]
        # a failing rename leaves it too
        monkeypatch.setattr(imatrix_io.os, "replace", lambda *a: (_ for _ in ()).throw(
            OSError("disk full")))
        with pytest.raises(OSError):
            save_imatrix(im, target, fmt)
        monkeypatch.undo()
        assert target.read_bytes() == b"earlier"
        save_imatrix(im, target, fmt)
        same_bytes(target, DATA / ("a_copy.gguf" if fmt == "gguf" else "a.dat"))
    assert sorted(os.listdir(tmp_path)) == ["imatrix.dat", "imatrix.gguf"]
    with pytest.raises(ModelError, match="does not exist"):
        save_imatrix(im, tmp_path / "no" / "x.gguf")
    # shape errors come before the target is touched
    im.entries["blk.9.bad.weight"] = ImatrixEntry(np.ones(10, np.float32), np.array([1, 2, 3]))
    with pytest.raises(ModelError, match="blk.9.bad.weight"):
        save_imatrix(im, tmp_path / "imatrix.gguf")
    same_bytes(tmp_path / "imatrix.gguf", DATA / "a_copy.gguf")


def test_at_path():
    assert at_path("imatrix.gguf", 20) == "imatrix.gguf.at_20"
    assert at_path(Path("out/x.dat"), 3) == os.path.join("out", "x.dat") + ".at_3"
    assert at_path("imatrix.gguf", 0) == "imatrix.gguf"


@pytest.mark.parametrize("out,args", STAT_RUNS, ids=[o for o, _ in STAT_RUNS])
def test_statistics_text(out, args):
    want = (DATA / out).read_text(encoding="utf-8")
    start = want.index("\nComputing statistics for")
    errors: list[str] = []
    name = option(args, "--in-file")
    stats = statistics_of_file(DATA / name, chunk_size(args), errors)
    assert format_statistics(stats, name) == want[start:]
    # the compute_statistics errors llama-imatrix logs first (after any loader noise)
    assert all(e in want[:start] for e in errors)


def test_statistics_details():
    im = Imatrix()
    accumulate(im, load_imatrix(DATA / "a.gguf"), 512)
    errors: list[str] = []
    stats = compute_statistics(im, errors)
    assert errors == ["compute_statistics: all counts are zero for tensor "
                      "blk.2.ffn_up_exps.weight, skipping statistics computation\n"]
    by = {t.tensor: t for t in stats}
    assert by["blk.0.ffn_up_exps.weight"].elements == 96  # the unused expert left out
    assert by["blk.0.attn_q.weight"].cossim == 0 and by["output.weight"].cossim == 0
    assert by["blk.1.attn_q.weight"].cossim != 0
    assert process_tensor_name("blk.12.ffn_up.weight") == ("12", "ffn_up")
    assert process_tensor_name("token_embd") == ("-", "token_embd")
    assert process_tensor_name("a.weight.") == ("-", "a")


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    stats = statistics_of_file(DATA / "run.gguf")
    out = plot_statistics(stats, tmp_path / "stats.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ModelError, match="--plot needs matplotlib: pip install matplotlib"):
        plot_statistics([], tmp_path / "x.png")
