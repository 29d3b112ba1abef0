"""Sensitivity files: the tensors' measured sensitivities, saved once and reused for every type
and budget (`kquant-quantize --sensitivity F`).

Measuring them takes a probe per tensor, on average half a forward pass over the calibration
chunks each (for SmolLM2-135M, 211 probes); the result depends only on the model's weights, the imatrix and the
text, not on the type or the budget. The file is JSON:

    {"format": "kquant.sensitivity", "version": 1,
     "weights": sha256 over the allocated tensors' names and their estimates' digests (their
                sampled rows and imatrix: another model, or another imatrix, gives another one),
     "text": the calibration text's name, "text_sha256": its digest, "ctx": 512, "chunks": 4,
     "tensor": {"blk.0.attn_output.weight": KLD per unit of error, ...}}

A file measured for other weights or another imatrix is refused, and so is one measured on
another text when --calibrate names one. Written to a temporary file and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..files.atomic import write_atomic
from .sensitivity import Sensitivity

FORMAT, VERSION = "kquant.sensitivity", 1


def weights_key(options: list[Any]) -> str:
    """What a sensitivity file is valid for: the allocated tensors' names and estimate digests."""
    h = hashlib.sha256()
    for o in options:
        h.update(f"{o.name}\0{o.digest}\n".encode())
    return h.hexdigest()


def text_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_sensitivity(path: str | Path, s: Sensitivity, weights: str, text: str | Path, ctx: int,
                     chunks: int) -> Path:
    doc = {"format": FORMAT, "version": VERSION, "weights": weights, "text": Path(text).name,
           "text_sha256": text_digest(text), "ctx": ctx, "chunks": chunks,
           "tensor": s.tensor}
    return write_atomic(path, [json.dumps(doc, indent=1).encode() + b"\n"])


def load_sensitivity(path: str | Path, weights: str, text: str | Path | None) -> Sensitivity:
    """The sensitivities of a file measured for these weights (and this text, when given);
    anything else is refused with one clear error."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{p}: not a readable sensitivity file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{p}: not a kquant sensitivity file")
    if doc.get("version") != VERSION:
        raise ModelError(f"{p}: sensitivity file version {doc.get('version')}, this kquant reads {VERSION}")
    if doc.get("weights") != weights:
        raise ModelError(f"{p}: measured for other weights or another imatrix; remove it to measure "
                         f"again, or name another file")
    if text is not None and doc.get("text_sha256") != text_digest(text):
        raise ModelError(f"{p}: measured on another text ({doc.get('text')}), not {Path(text).name}")
    try:
        tensor = {str(k): float(v) for k, v in doc["tensor"].items()}
    except (KeyError, AttributeError, TypeError, ValueError):
        raise ModelError(f"{p}: damaged sensitivity file") from None
    return Sensitivity(tensor)
