#!/usr/bin/env python3
"""Write tests/data/golden*.npz: inputs and the bytes llama.cpp's libggml makes of them.

The golden-vector tests (tests/test_golden.py) check kquant against these bytes on machines
without llama-cpp-python, so exactness is tested everywhere. Each input row set is every
case of tests/cases.py plus a slice of real SmolLM2-135M weights; each type is quantized
without an imatrix and, where ggml uses one, with the two imatrix kinds (positive, and with
zeros in it).

    python tools/make_golden.py            # needs llama-cpp-python==0.3.36 (or KQUANT_LIBGGML)
    python tools/make_golden.py golden_iq  # one file only (the others stay as committed)

One file per group of types, the same inputs in each: golden.npz (the K-quants, the legacy
and float types), golden_iq.npz (IQ4_NL, IQ4_XS), golden_iq3.npz (IQ3_XXS, IQ3_S),
golden_iq2.npz (IQ2_XXS, IQ2_XS, IQ2_S) and golden_iq1.npz (IQ1_S, IQ1_M), so adding a family
adds a file and leaves the committed bytes of the others alone.

ggml aborts (GGML_ASSERT) on some rows of the IQ3 / IQ2 types (inf / NaN values) and of IQ1_M
without an imatrix: their rows are quantized one at a time in forked children, and the rows
whose child died are listed in meta's `aborted_rows` (by key) and left as zero bytes. IQ2_XXS,
IQ2_XS and IQ1_S have no `-none` set (ggml requires an imatrix for them); their decoding
digests are of `-random`.

Keys: `x` (rows, 512) float32, `case` (rows,) the case of each row, `imatrix_<mode>`
float32 (512,), `<TYPE>-<mode>` uint8 (rows, row_bytes), and `meta` (a JSON string: the
llama.cpp build the bytes came from, and the sha256 of ggml's dequantization of each
`<TYPE>-none`, or `<TYPE>-random` for the types without one).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf import GGMLQuantizationType as T  # noqa: E402

from cases import CASES, IMATRIX_MODES, make_case, make_imatrix  # noqa: E402
import kquant  # noqa: E402
from kquant.reference.libggml import GGML  # noqa: E402

TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
         T.Q8_0, T.F16, T.BF16, T.F32]
IQ_TYPES = [T.IQ4_NL, T.IQ4_XS]
IQ3_TYPES = [T.IQ3_XXS, T.IQ3_S]
IQ2_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S]
IQ1_TYPES = [T.IQ1_S, T.IQ1_M]
#: tests/data/<name>.npz and the types it holds
FILES = {"golden": TYPES, "golden_iq": IQ_TYPES, "golden_iq3": IQ3_TYPES,
         "golden_iq2": IQ2_TYPES, "golden_iq1": IQ1_TYPES}
#: the types ggml_quantize_chunk may abort on (quantized row by row in forked children)
ABORTING = set(IQ3_TYPES) | set(IQ2_TYPES) | set(IQ1_TYPES)
WIDTH = 512
ROWS_PER_CASE = 4
DATA = ROOT / "tests" / "data"


def real_rows() -> np.ndarray | None:
    """Eight rows of SmolLM2's blk.0.ffn_down (dequantized from its Q4_1), if the model is
    at hand: the conftest fixture's cache, ~/.cache/kquant."""
    path = Path.home() / ".cache" / "kquant" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        return None
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    return np.ascontiguousarray(dequantize(t.data, t.tensor_type)[:8, :WIDTH], np.float32)


def main() -> int:
    files = sys.argv[1:] or list(FILES)
    unknown = [f for f in files if f not in FILES]
    if unknown:
        print(f"unknown golden file {unknown[0]!r}; choose from {', '.join(FILES)}",
              file=sys.stderr)
        return 2
    ggml = GGML()
    blocks, names_of_rows = [], []
    for i, case in enumerate(CASES):
        rows = make_case(case, ROWS_PER_CASE, WIDTH, seed=9000 + i)
        blocks.append(rows)
        names_of_rows += [case] * rows.shape[0]
    real = real_rows()
    if real is None:
        print("SmolLM2 model not in ~/.cache/kquant: run the parity tests once to fetch it",
              file=sys.stderr)
        return 1
    blocks.append(real)
    names_of_rows += ["smollm2_ffn_down"] * real.shape[0]
    x = np.concatenate(blocks)
    for name in files:
        write(ggml, x, names_of_rows, FILES[name], DATA / f"{name}.npz")
    return 0


def quantize_rows_apart(ggml: GGML, x: np.ndarray, qtype: T, w) -> tuple[np.ndarray, list[int]]:
    """ggml's bytes of each row, each in a forked child (a GGML_ASSERT kills only the
    child); the rows whose child died stay zero and are returned."""
    import os

    row_bytes = ggml.quantize(np.zeros((1, x.shape[1]), np.float32), qtype, w).shape[1]
    out = np.zeros((x.shape[0], row_bytes), np.uint8)
    aborted = []
    for r in range(x.shape[0]):
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: quantize, send the bytes, leave without cleanup
            os.close(rd)
            os.environ["GGML_NO_BACKTRACE"] = "1"  # an abort would attach gdb (seconds)
            try:
                with np.errstate(all="ignore"):
                    os.write(wr, ggml.quantize(x[r:r + 1], qtype, w).tobytes())
            finally:
                os._exit(0)
        os.close(wr)
        with os.fdopen(rd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0 and len(data) == row_bytes:
            out[r] = np.frombuffer(data, np.uint8)
        else:
            aborted.append(r)
    return out, aborted


def decoded_key(arrays, qtype: T) -> str:
    """The set whose decoding meta's dequantize_sha256 digests: `-none`, else `-random`."""
    key = f"{qtype.name}-none"
    return key if key in arrays else f"{qtype.name}-random"


def write(ggml: GGML, x: np.ndarray, names: list[str], types: list[T], out: Path) -> None:
    arrays = {"x": x, "case": np.array(names)}
    aborted_rows = {}
    for mode in IMATRIX_MODES:
        w = make_imatrix(mode, WIDTH, seed=42)
        if w is not None:
            arrays[f"imatrix_{mode}"] = w
        for qtype in types:
            if w is not None and not kquant.get_codec(qtype).uses_imatrix:
                continue  # ggml ignores the imatrix for Q8_0, Q8_K and the float types
            if w is None and kquant.get_codec(qtype).requires_imatrix:
                continue  # ggml asserts one (IQ2_XXS, IQ2_XS, IQ1_S)
            key = f"{qtype.name}-{mode}"
            if qtype in ABORTING:
                arrays[key], aborted = quantize_rows_apart(ggml, x, qtype, w)
                if aborted:
                    aborted_rows[key] = aborted
                continue
            with np.errstate(all="ignore"):
                arrays[key] = ggml.quantize(x, qtype, w)
    import hashlib
    import importlib.metadata as md

    # ggml's decoding of the no-imatrix bytes (where ggml needs one: the random imatrix's), as a digest of
    # the float bits (NaNs included)
    decoded = {qtype.name: hashlib.sha256(ggml.dequantize(arrays[decoded_key(arrays, qtype)],
                                                          qtype)
                                          .view(np.uint32).tobytes()).hexdigest()
               for qtype in types}
    arrays["meta"] = np.array(json.dumps({
        "llama_cpp_python": md.version("llama-cpp-python"),
        "dequantize_sha256": decoded,
        **({"aborted_rows": aborted_rows} if aborted_rows else {}),
        "library": ggml.path.name,
        "generator": "tools/make_golden.py",
    }))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    n_sets = sum("-" in k for k in arrays)
    print(f"{out.relative_to(ROOT)}: {x.shape[0]} rows x {WIDTH}, {n_sets} (type, imatrix) "
          f"sets, {out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
