"""Hessian files: a calibration's Hessians and imatrix, saved once and reused per type.

`kquant-imatrix ... --hessian-out F` writes one, `kquant-quantize --method gptq --hessian F`
reads it instead of calibrating again. The format is safetensors (readable by any safetensors
library):

    hessian.<first matrix name>   F64 (k, k)   sum of x x^T over the calibration tokens
    imatrix.<matrix name>         F32 (k,)     the imatrix sums of that matrix (kquant-imatrix's)
    __metadata__ (strings): format "kquant.hessians", version "1", model (its block count and
        width, "llama 30x576"), dataset (the calibration text), chunks, and JSON maps
        "counts" {first name: tokens} and "shared" {matrix name: first name of its input}

Files are written to a temporary file and renamed when complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..files.atomic import write_atomic
from ..files.safetensors import read_header
from .hessian import Hessians
from .imatrix_file import Imatrix, ImatrixEntry

FORMAT, VERSION = "kquant.hessians", "1"


def save_hessians(path: str | Path, hessians: Hessians, imatrix: Imatrix, model: str, dataset: str,
                  n_chunks: int) -> Path:
    arrays = {f"hessian.{k}": np.ascontiguousarray(h, "<f8") for k, h in hessians.sums.items()}
    arrays.update({f"imatrix.{n}": np.ascontiguousarray(e.sums, "<f4") for n, e in imatrix.entries.items()})
    meta = {"format": FORMAT, "version": VERSION, "model": model, "dataset": dataset,
            "chunks": str(n_chunks), "counts": json.dumps(hessians.counts),
            "shared": json.dumps(hessians.shared)}
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, a in arrays.items():
        header[name] = {"dtype": "F64" if a.dtype == np.float64 else "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)

    def chunks():
        yield len(head).to_bytes(8, "little") + head
        for a in arrays.values():
            yield a.tobytes()

    return write_atomic(path, chunks())


def load_hessians(path: str | Path, model: str) -> tuple[Hessians, Imatrix, str, int]:
    """The Hessians, imatrix, dataset and chunk count of a file saved for `model` (refused, with
    one clear error, when it is of another model, not a Hessian file, or damaged)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such Hessian file")
    meta: dict = {}
    tensors = read_header(p, ("F64", "F32"), meta)
    if meta.get("format") != FORMAT:
        raise ModelError(f"{p}: not a kquant Hessian file")
    if meta.get("model") != model:
        raise ModelError(f"{p}: Hessians of another model ({meta.get('model')}, this one is {model})")
    try:
        counts = {k: int(v) for k, v in json.loads(meta["counts"]).items()}
        shared = {k: str(v) for k, v in json.loads(meta["shared"]).items()}
        n_chunks = int(meta["chunks"])
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError, RecursionError):
        raise ModelError(f"{p}: damaged Hessian file metadata") from None
    hessians = Hessians(shared=shared, counts=counts)
    imatrix = Imatrix(datasets=[meta.get("dataset", "")], chunk_count=n_chunks)
    for name, t in tensors.items():
        kind, _, key = name.partition(".")
        a = np.array(t.raw())
        if kind == "hessian" and a.ndim == 2 and a.shape[0] == a.shape[1] and key in counts:
            hessians.sums[key] = a
        elif kind == "imatrix" and a.ndim == 1 and key in shared:
            imatrix.entries[key] = ImatrixEntry(a.astype(np.float32), np.array([counts[shared[key]]], np.int64))
        else:
            raise ModelError(f"{p}: unexpected tensor {name} {list(a.shape)}")
    if set(hessians.sums) != set(counts) or set(imatrix.entries) != set(shared):
        raise ModelError(f"{p}: damaged Hessian file (tensors missing)")
    for key, h in hessians.sums.items():
        if not np.isfinite(h).all():
            raise ModelError(f"{p}: Hessian {key} holds NaN or Inf")
    return hessians, imatrix, meta.get("dataset", ""), n_chunks
