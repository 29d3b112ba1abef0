"""qwen3 (Qwen3ForCausalLM): Qwen 3 dense models.

Conversion follows convert_hf_to_gguf.py's Qwen3Model, a Qwen2Model (so this record is qwen2's
with changes) without Q/K/V biases: the same NEOX rope and pooling, plus a per-head RMSNorm of
Q and K in every block (attn_q_norm, attn_k_norm) and head_dim defaulting to 128 rather than
hidden_size / heads.  Qwen3 rerankers, which the converter turns into classifiers, are refused.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gguf import MODEL_ARCH, MODEL_TENSOR

from ..errors import ModelError
from . import qwen2
from .base import HParams, TensorSpec as T


def _check(folder: Path, hp: HParams, hf_class: str) -> None:
    """Qwen3Model's reranker detection (README title, folder or model name)."""
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
    hints = [folder.name, str(hp.get("_name_or_path", "")), str(hp.get("model_type", "")), hf_class]
    if "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text or \
            any("qwen3-reranker" in h.lower() or "qwen3-vl-reranker" in h.lower() for h in hints):
        raise ModelError("Qwen3 reranker models are not supported")


# llama-model.cpp's LLM_ARCH_QWEN3 tensors: qwen2's (Q/K/V/output biases optional for every
# arch: create_tensor_qkv's TENSOR_NOT_REQUIRED) plus the per-head Q/K norms every block must
# have, which llama.cpp creates after attn_output
_QK_NORMS = (T(MODEL_TENSOR.ATTN_K_NORM, "head_dim"), T(MODEL_TENSOR.ATTN_Q_NORM, "head_dim"))


def _qwen3_tensors() -> tuple[T, ...]:
    out: list[T] = []
    for t in qwen2.TENSORS:
        out.append(t)
        if t.key == MODEL_TENSOR.ATTN_OUT and t.suffix == "weight":
            out.extend(_QK_NORMS)
    return tuple(out)


TENSORS = _qwen3_tensors()

# Qwen3Config's defaults are Qwen2Config's but for head_dim
ARCH = replace(
    qwen2.ARCH,
    model_arch=MODEL_ARCH.QWEN3,
    hf_classes=("Qwen3ForCausalLM",),
    config_defaults={"qwen3": {**qwen2.ARCH.config_defaults["qwen2"], "head_dim": 128}},
    check=_check,
    tensors=TENSORS,
)
