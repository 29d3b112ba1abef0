"""Bad input, tried as a new user would, across the commands: each case must end with one
`error:` line naming the cause, a non-zero exit, no traceback, nothing left behind in the
working folder and every input byte-identical.

Every case runs a command's `main(argv)` in this process (a traceback is an exception escaping
it) with the working folder a fresh tmp_path, where a case's own damaged inputs are made. The
shared, well-formed materials (the tiny model as GGUF and as its HF folder, a text, an imatrix)
are hashed before and after each case too.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from conftest import TINY_LLAMA

TEXT = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"


@dataclass
class Materials:
    root: Path
    gguf: Path  # tiny-llama as F32 GGUF
    hf: Path  # a copy of the tiny-llama HF folder
    text: Path
    imatrix: Path  # an imatrix (GGUF) of the tiny model


@pytest.fixture(scope="module")
def m(tmp_path_factory) -> Materials:
    from kquant.calibration.imatrix_file import Imatrix, ImatrixEntry, save_imatrix_gguf
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    root = tmp_path_factory.mktemp("materials")
    hf = root / "tiny-llama"
    shutil.copytree(TINY_LLAMA, hf)
    gguf_path = root / "tiny.gguf"
    source = load_hf_model(hf, "f32")
    write_gguf(source, gguf_path, progress=False)
    im = Imatrix(chunk_count=2, chunk_size=64, datasets=["text.txt"])
    for t in source.tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            im.entries[t.name] = ImatrixEntry(np.linspace(0.5, 2, t.shape[0], dtype=np.float32) * 128,
                                              np.array([128], np.int64))
    imatrix = root / "imatrix.gguf"
    save_imatrix_gguf(im, imatrix)
    text = root / "text.txt"
    shutil.copy(TEXT, text)
    return Materials(root, gguf_path, hf, text, imatrix)


# --- making damaged inputs ------------------------------------------------------------------

def _tensor_info_at(data: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor `name`'s info in a GGUF file's bytes."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.find(key)
    assert pos > 0, name
    return pos + len(key)


def patch_tensor_info(src: Path, dst: Path, name: str, *, shape=None, qtype=None, offset_delta=0) -> Path:
    """A copy of a GGUF whose tensor `name` declares another shape (same dims), type or offset."""
    data = bytearray(src.read_bytes())
    at = _tensor_info_at(data, name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    if shape is not None:
        assert len(shape) == n_dims
        struct.pack_into(f"<{n_dims}Q", data, at + 4, *shape)
    at_type = at + 4 + 8 * n_dims
    if qtype is not None:
        struct.pack_into("<I", data, at_type, int(qtype))
    (offset,) = struct.unpack_from("<Q", data, at_type + 4)
    struct.pack_into("<Q", data, at_type + 4, offset + offset_delta)
    dst.write_bytes(bytes(data))
    return dst


def patch_kv_type(src: Path, dst: Path, key: str, vtype: int) -> Path:
    """A copy of a GGUF whose metadata `key` has its value-type field replaced (one flipped field)."""
    data = bytearray(src.read_bytes())
    k = struct.pack("<Q", len(key)) + key.encode()
    at = data.find(k) + len(k)
    struct.pack_into("<I", data, at, vtype)
    dst.write_bytes(bytes(data))
    return dst


def rewrite_gguf(src: Path, dst: Path, kv: dict | None = None, drop: tuple[str, ...] = (),
                 arch: str | None = None) -> Path:
    """A well-formed GGUF with changed metadata (key -> (value, type)) or tensors left out."""
    from kquant.files.gguf_read import load_gguf
    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import KV

    s = load_gguf(src)
    kv = dict(kv or {})
    if arch is not None:
        old = s.arch
        s.kv = [KV(k.key.replace(f"{old}.", f"{arch}.", 1), k.value, k.type, k.sub_type) for k in s.kv]
        kv["general.architecture"] = (arch, V.STRING)
        s.arch = arch
    for key, (value, vtype) in kv.items():
        s.kv = [k for k in s.kv if k.key != key] + [KV(key, value, vtype)]
    s.tensors = [t for t in s.tensors if t.name not in drop]
    s.path = ""
    write_gguf(s, dst, progress=False)
    return dst


def hf_copy(m: Materials, d: Path, config: dict | None = None, drop_config: tuple[str, ...] = (),
            drop_tensor: str | None = None, name: str = "hf") -> Path:
    """A copy of the tiny model's HF folder with config.json changed or a tensor left out."""
    out = d / name
    shutil.copytree(m.hf, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(config or {})
    for k in drop_config:
        cfg.pop(k, None)
    (out / "config.json").write_text(json.dumps(cfg))
    if drop_tensor is not None:
        _drop_safetensor(out / "model.safetensors", drop_tensor)
    return out


def _drop_safetensor(path: Path, name: str) -> None:
    """Rewrite a safetensors file without one tensor (the others' bytes moved up)."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    del header[name]
    out, pos = b"", 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        a, b = info["data_offsets"]
        info["data_offsets"] = [pos, pos + b - a]
        out += body[a:b]
        pos += b - a
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + out)


def imatrix_with(m: Materials, d: Path, change: Callable[[dict], None], name: str = "bad.gguf") -> Path:
    from kquant.calibration.imatrix_file import load_imatrix, save_imatrix_gguf

    im = load_imatrix(m.imatrix)
    change(im.entries)
    im.path = ""
    save_imatrix_gguf(im, d / name)
    return d / name


def _scale_first(entries: dict, f: Callable[[np.ndarray], np.ndarray]) -> None:
    e = entries["blk.0.attn_q.weight"]
    e.sums = f(e.sums).astype(np.float32)


# --- the cases ------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    command: str  # the module under kquant.cli
    argv: Callable[[Materials, Path], list[str]]
    expect: str  # a regex the error line must match (case-insensitive)


Q, CV, IM, PPL, GEN, CMP = "quantize", "convert", "imatrix", "perplexity", "generate", "compare"
G = lambda m, d: str(m.gguf)  # noqa: E731


def _link(target: Path, link: Path, hard: bool) -> Path:
    (os.link if hard else os.symlink)(target, link)
    return link


CASES = [
    # kquant-quantize: the command line
    Case("q-no-input", Q, lambda m, d: ["missing.gguf", "out.gguf", "Q4_K_M"], "missing.gguf: no such file"),
    Case("q-text-input", Q, lambda m, d: [str(m.text), "out.gguf", "Q4_K_M"], "neither a GGUF"),
    Case("q-unknown-type", Q, lambda m, d: [G(m, d), "out.gguf", "Q9_K"], "Q9_K"),
    Case("q-missing-type", Q, lambda m, d: [G(m, d), "out.gguf"], "TYPE"),
    Case("q-bad-nthreads", Q, lambda m, d: [G(m, d), "out.gguf", "Q4_K_M", "four"], "nthread"),
    Case("q-extra-args", Q, lambda m, d: [G(m, d), "out.gguf", "Q4_K_M", "2", "x"], "unexpected"),
    Case("q-out-is-input", Q, lambda m, d: [G(m, d), G(m, d), "Q4_K_M"], "also an input"),
    Case("q-out-hard-link", Q, lambda m, d: [G(m, d), str(_link(m.gguf, d / "h.gguf", True)), "Q4_K_M"],
         "also an input"),
    Case("q-out-symlink", Q, lambda m, d: [G(m, d), str(_link(m.gguf, d / "s.gguf", False)), "Q4_K_M"],
         "also an input"),
    Case("q-out-is-imatrix", Q, lambda m, d: ["--imatrix", str(m.imatrix), G(m, d), str(m.imatrix), "Q4_K_M"],
         "also an input"),
    Case("q-out-in-hf-folder", Q, lambda m, d: [str(m.hf), str(m.hf / "model.safetensors"), "Q4_K_M"],
         "would overwrite .*model.safetensors"),
    Case("q-out-folder-missing", Q, lambda m, d: [G(m, d), "nowhere/out.gguf", "Q4_K_M"], "nowhere.*does not exist"),
    Case("q-out-is-folder", Q, lambda m, d: [G(m, d), str(d), "Q4_K_M"], "is a directory"),
    Case("q-bad-regex", Q, lambda m, d: ["--tensor-type", "blk.(=q4_k", G(m, d), "out.gguf", "Q4_K_M"],
         r"--tensor-type.*blk\.\("),
    Case("q-bad-tensor-type", Q, lambda m, d: ["--tensor-type", "attn_q=Q9", G(m, d), "out.gguf", "Q4_K_M"], "Q9"),
    Case("q-tensor-type-no-eq", Q, lambda m, d: ["--tensor-type", "attn_q", G(m, d), "out.gguf", "Q4_K_M"],
         "NAME=TYPE"),
    Case("q-tensor-type-file-missing", Q, lambda m, d: ["--tensor-type-file", "none.txt", G(m, d), "out.gguf",
                                                        "Q4_K_M"], "none.txt"),
    Case("q-bad-output-type", Q, lambda m, d: ["--output-tensor-type", "Q7", G(m, d), "out.gguf", "Q4_K_M"], "Q7"),
    Case("q-bad-prune", Q, lambda m, d: ["--prune-layers", "1,x", G(m, d), "out.gguf", "Q4_K_M"], "prune-layers"),
    Case("q-bad-override", Q, lambda m, d: ["--override-kv", "general.name", G(m, d), "out.gguf", "Q4_K_M"],
         "override"),
    Case("q-target-bpw-zero", Q, lambda m, d: ["--target-bpw", "0", G(m, d), "out.gguf", "Q4_K_M"], "target-bpw"),
    Case("q-gptq-asym", Q, lambda m, d: ["--gptq-asym", "2", G(m, d), "out.gguf", "Q4_K_M"], "gptq-asym"),
    Case("q-gptq-no-text", Q, lambda m, d: ["--method", "gptq", G(m, d), "out.gguf", "Q4_K_M"], "calibrat"),
    Case("q-gptq-iq3", Q, lambda m, d: ["--method", "gptq", "--calibrate", str(m.text), G(m, d), "out.gguf",
                                        "IQ3_S"], "does not support IQ3_S"),
    Case("q-iq-without-codec", Q, lambda m, d: ["--imatrix", str(m.imatrix), G(m, d), "out.gguf", "TQ1_0"],
         "rules choose TQ1_0, which kquant does not produce"),
    # IQ3_XXS puts attn_q / attn_k in IQ2_S (llama_tensor_get_type): without an imatrix llama-quantize
    # refuses (tensor_requires_imatrix) before anything else, and so does kquant (with one, both write the
    # file: test_quantize_model.py)
    Case("q-iq3-xxs-without-imatrix", Q, lambda m, d: [G(m, d), "out.gguf", "IQ3_XXS"],
         "blk.0.attn_k.weight: type IQ2_S needs an importance matrix"),
    Case("q-requantize", Q, lambda m, d: [str(_quantized(m, d)), "out.gguf", "Q4_K_M"], "requantize"),
    # kquant-quantize: the imatrix
    Case("q-imatrix-missing", Q, lambda m, d: ["--imatrix", "none.dat", G(m, d), "out.gguf", "Q4_K_M"], "none.dat"),
    Case("q-imatrix-text", Q, lambda m, d: ["--imatrix", str(m.text), G(m, d), "out.gguf", "Q4_K_M"], "imatrix"),
    Case("q-imatrix-is-model", Q, lambda m, d: ["--imatrix", G(m, d), G(m, d), "out.gguf", "Q4_K_M"],
         "not an imatrix"),
    Case("q-imatrix-truncated", Q, lambda m, d: ["--imatrix", str(_truncated(m.imatrix, d / "t.gguf", 0.6)), G(m, d),
                                                 "out.gguf", "Q4_K_M"], "t.gguf"),
    Case("q-imatrix-string-made-array", Q, lambda m, d: [
        "--imatrix", str(patch_kv_type(m.imatrix, d / "a.gguf", "general.type", int(V.ARRAY))), G(m, d),
        "out.gguf", "Q4_K_M"], "a.gguf"),
    Case("q-imatrix-negative", Q, lambda m, d: [
        "--imatrix", str(imatrix_with(m, d, lambda e: _scale_first(e, lambda s: -s))), G(m, d), "out.gguf",
        "Q4_K_M"], "blk.0.attn_q.weight.*negative"),
    Case("q-imatrix-nan", Q, lambda m, d: [
        "--imatrix", str(imatrix_with(m, d, lambda e: _scale_first(e, lambda s: s * np.nan))), G(m, d),
        "out.gguf", "Q4_K_M"], "blk.0.attn_q.weight.*(nan|finite)"),
    Case("q-imatrix-all-zero", Q, lambda m, d: [
        "--imatrix", str(imatrix_with(m, d, lambda e: _scale_first(e, lambda s: s * 0))), G(m, d),
        "out.gguf", "Q4_K_M"], "blk.0.attn_q.weight.*zero"),
    Case("q-imatrix-wrong-size", Q, lambda m, d: [
        "--imatrix", str(imatrix_with(m, d, lambda e: _scale_first(e, lambda s: s[:-32]))), G(m, d),
        "out.gguf", "Q4_K_M"], "blk.0.attn_q.weight"),
    # kquant-quantize: damaged or inconsistent GGUF models
    Case("q-truncated", Q, lambda m, d: [str(_truncated(m.gguf, d / "t.gguf", 0.5)), "out.gguf", "Q4_K_M"],
         "truncated"),
    Case("q-header-cut", Q, lambda m, d: [str(_truncated(m.gguf, d / "t.gguf", 0.001)), "out.gguf", "Q4_K_M"],
         "t.gguf"),
    Case("q-bad-version", Q, lambda m, d: [str(_patched(m.gguf, d / "v.gguf", 4, b"\x09\0\0\0")), "out.gguf",
                                           "Q4_K_M"], "version"),
    Case("q-misaligned-offset", Q, lambda m, d: [str(patch_tensor_info(
        m.gguf, d / "o.gguf", "blk.0.attn_k.weight", offset_delta=4)), "out.gguf", "Q4_K_M"], "blk.0.attn_k.weight"),
    Case("q-overlapping-offset", Q, lambda m, d: [str(patch_tensor_info(
        m.gguf, d / "o.gguf", "blk.1.attn_k.weight", offset_delta=-4096)), "out.gguf", "Q4_K_M"],
        "blk.1.attn_k.weight"),
    Case("q-f16-declared-f32", Q, lambda m, d: [str(patch_tensor_info(
        m.gguf, d / "t.gguf", "blk.0.attn_q.weight", qtype=T.F16)), "out.gguf", "Q4_K_M"], "blk.0"),
    Case("q-zero-dim", Q, lambda m, d: [str(patch_tensor_info(
        m.gguf, d / "z.gguf", "blk.0.attn_norm.weight", shape=(0,))), "out.gguf", "Q4_K_M"], "blk.0.attn_norm"),
    Case("q-overflowing-dims", Q, lambda m, d: [str(patch_tensor_info(
        m.gguf, d / "z.gguf", "blk.0.ffn_up.weight", shape=(1 << 40, 1 << 40))), "out.gguf", "Q4_K_M"],
        "blk.0.ffn_up"),
    Case("q-unknown-tensor-type", Q, lambda m, d: [str(patch_tensor_info(
        m.gguf, d / "z.gguf", "blk.0.ffn_up.weight", qtype=99)), "out.gguf", "Q4_K_M"], "blk.0.ffn_up"),
    Case("q-unknown-arch", Q, lambda m, d: [str(rewrite_gguf(m.gguf, d / "u.gguf", arch="nosucharch")),
                                            "out.gguf", "Q4_K_M"], "nosucharch"),
    Case("q-no-arch", Q, lambda m, d: [str(_without_key(m.gguf, d / "u.gguf", "general.architecture")),
                                       "out.gguf", "Q4_K_M"], "architecture"),
    Case("q-split-part-missing", Q, lambda m, d: [str(_split_first(m, d)), "out.gguf", "Q4_K_M"], "missing"),
    Case("q-keep-split-over-input", Q, lambda m, d: ["--keep-split", str(_split_pair(m, d)), str(d / "tiny.gguf"),
                                                      "Q8_0"], "also an input"),
    Case("q-nan-weights", Q, lambda m, d: [str(_nan_weights(m, d)), "out.gguf", "Q4_K_M"], "nan|inf"),
    # kquant-quantize / kquant-convert: Hugging Face folders
    Case("q-hf-no-hidden-size", Q, lambda m, d: [str(hf_copy(m, d, drop_config=("hidden_size",))), "out.gguf",
                                                 "Q4_K_M"], "hidden_size"),
    Case("q-hf-no-heads", Q, lambda m, d: [str(hf_copy(m, d, drop_config=("num_attention_heads",))), "out.gguf",
                                           "Q4_K_M"], "num_attention_heads"),
    Case("cv-hf-hidden-size-wrong", CV, lambda m, d: [str(hf_copy(m, d, config={"hidden_size": 96})),
                                                      "--outfile", "out.gguf"], "shape|hidden"),
    Case("cv-hf-tensor-missing", CV, lambda m, d: [str(hf_copy(m, d, drop_tensor="model.layers.1.self_attn.k_proj.weight")),
                                                   "--outfile", "out.gguf"], "blk.1.attn_k.weight|k_proj"),
    Case("cv-hf-config-not-json", CV, lambda m, d: [str(_write(hf_copy(m, d) / "config.json", b"{oops")),
                                                    "--outfile", "out.gguf"], "config.json"),
    Case("cv-hf-truncated-weights", CV, lambda m, d: [str(_truncated(hf_copy(m, d) / "model.safetensors",
                                                                     None, 0.5).parent), "--outfile", "out.gguf"],
         "model.safetensors"),
    Case("cv-hf-unknown-model-type", CV, lambda m, d: [str(hf_copy(m, d, config={"model_type": "nosuch",
                                                                               "architectures": ["NoSuchForCausalLM"]})),
                                                       "--outfile", "out.gguf"], "NoSuch|nosuch"),
    Case("cv-hf-no-architectures", CV, lambda m, d: [str(hf_copy(m, d, drop_config=("architectures",))),
                                                     "--outfile", "out.gguf"], "architectures"),
    Case("cv-overwrite-checkpoint", CV, lambda m, d: [str(m.hf), "--outfile", str(m.hf / "model.safetensors")],
         "would overwrite"),
    Case("cv-overwrite-config", CV, lambda m, d: [str(m.hf), "--outfile", str(m.hf / "config.json")],
         "would overwrite"),
    Case("cv-overwrite-linked-checkpoint", CV, lambda m, d: [
        str(m.hf), "--outfile", str(_link(m.hf / "model.safetensors", d / "x.gguf", True))], "would overwrite"),
    Case("cv-no-folder", CV, lambda m, d: ["nofolder", "--outfile", "out.gguf"], "nofolder"),
    Case("cv-empty-folder", CV, lambda m, d: [str(_mkdir(d / "empty")), "--outfile", "out.gguf"], "config.json"),
    Case("cv-bad-outtype", CV, lambda m, d: [str(m.hf), "--outtype", "q5"], "outtype"),
    # kquant-imatrix
    Case("im-hf-dropped-rope", IM, lambda m, d: ["-m", str(hf_copy(m, d, config={
        "rope_scaling": {"rope_type": "nosuch"}})), "-f", str(m.text), "-c", "64"],
        r"rope_scaling type 'nosuch' .*does not implement it"),
    Case("im-batch-zero", IM, lambda m, d: ["-m", G(m, d), "-f", str(m.text), "-b", "0"], "-b"),
    Case("im-ctx-zero", IM, lambda m, d: ["-m", G(m, d), "-f", str(m.text), "-c", "0"], "-c"),
    Case("im-chunks-zero", IM, lambda m, d: ["-m", G(m, d), "-f", str(m.text), "--chunks", "0"], "chunks"),
    Case("im-no-text-file", IM, lambda m, d: ["-m", G(m, d), "-f", "none.txt"], "none.txt"),
    Case("im-text-too-short", IM, lambda m, d: ["-m", G(m, d), "-f", str(_write(d / "s.txt", b"Hello"))],
         "tokens"),
    Case("im-no-model", IM, lambda m, d: ["-f", str(m.text)], "model"),
    Case("im-out-is-model", IM, lambda m, d: ["-m", G(m, d), "-f", str(m.text), "-o", G(m, d)], "also an input"),
    Case("im-out-is-text", IM, lambda m, d: ["-m", G(m, d), "-f", str(m.text), "-o", str(m.text)], "also an input"),
    Case("im-in-file-corrupt", IM, lambda m, d: ["--in-file", str(_write(d / "c.dat", b"\x05\0\0\0\xff\xff")),
                                                 "-o", "out.gguf"], "c.dat"),
    Case("im-in-file-empty-name", IM, lambda m, d: ["--in-file", str(_legacy_empty_name(d)), "-o", "out.gguf"],
         "e.dat.*(empty|name)"),
    Case("im-in-file-is-model", IM, lambda m, d: ["--in-file", G(m, d), "-o", "out.gguf"], "not an imatrix"),
    Case("im-stats-two-files", IM, lambda m, d: ["--show-statistics", "--in-file", str(m.imatrix),
                                                 "--in-file", str(m.imatrix)], "single"),
    Case("im-head-count-zero", IM, lambda m, d: [
        "-m", str(rewrite_gguf(m.gguf, d / "h.gguf", {"llama.attention.head_count": (0, V.UINT32)})),
        "-f", str(m.text), "--chunks", "1", "-c", "64"], "head_count"),
    Case("im-nan-eps", IM, lambda m, d: [
        "-m", str(rewrite_gguf(m.gguf, d / "e.gguf", {"llama.attention.layer_norm_rms_epsilon": (float("nan"),
                                                                                                V.FLOAT32)})),
        "-f", str(m.text), "--chunks", "1", "-c", "64"], "epsilon"),
    # kquant-perplexity
    Case("ppl-no-model", PPL, lambda m, d: ["-m", "none.gguf", "-f", str(m.text)], "none.gguf"),
    Case("ppl-no-text", PPL, lambda m, d: ["-m", G(m, d), "-f", "none.txt"], "none.txt"),
    Case("ppl-batch-zero", PPL, lambda m, d: ["-m", G(m, d), "-f", str(m.text), "-b", "0"], "-b"),
    Case("ppl-ctx-zero", PPL, lambda m, d: ["-m", G(m, d), "-f", str(m.text), "-c", "0"], "-c"),
    Case("ppl-text-too-short", PPL, lambda m, d: ["-m", G(m, d), "-f", str(_write(d / "s.txt", b"Hi")), "-c", "64"],
         "tokens"),
    # a rope_scaling type the converter drops: llama.cpp runs such a model unscaled, kquant refuses
    Case("ppl-hf-dropped-rope", PPL, lambda m, d: ["-m", str(hf_copy(m, d, config={
        "rope_scaling": {"type": "dynamic", "factor": 2.0}})), "-f", str(m.text), "-c", "64"],
        r"rope_scaling type 'dynamic' is dropped by convert_hf_to_gguf.py"),
    Case("ppl-kld-no-base", PPL, lambda m, d: ["-m", G(m, d), "--kl-divergence"], "kl-divergence-base"),
    Case("ppl-kld-base-corrupt", PPL, lambda m, d: ["-m", G(m, d), "--kl-divergence", "--kl-divergence-base",
                                                    str(_write(d / "b.kld", b"_logits_" + b"\0" * 7))], "b.kld"),
    Case("ppl-base-out-is-model", PPL, lambda m, d: ["-m", G(m, d), "-f", str(m.text), "--kl-divergence-base",
                                                     G(m, d)], "also an input"),
    Case("ppl-iq-tensor", PPL, lambda m, d: ["-m", str(_iq_model(m, d)), "-f", str(m.text), "-c", "64"],
         "TQ1_0"),
    Case("ppl-wrong-shape", PPL, lambda m, d: ["-m", str(patch_tensor_info(
        m.gguf, d / "w.gguf", "blk.0.attn_q.weight", shape=(128, 32))), "-f", str(m.text), "-c", "64"],
        "blk.0"),
    Case("ppl-missing-tensor", PPL, lambda m, d: [
        "-m", str(rewrite_gguf(m.gguf, d / "w.gguf", drop=("blk.1.ffn_up.weight",))), "-f", str(m.text),
        "-c", "64"], "blk.1.ffn_up.weight"),
    Case("ppl-arch-not-run", PPL, lambda m, d: ["-m", str(rewrite_gguf(m.gguf, d / "g.gguf", arch="gpt2")),
                                                "-f", str(m.text), "-c", "64"], "gpt2"),
    # kquant-generate
    Case("gen-temp-nan", GEN, lambda m, d: ["-m", G(m, d), "-p", "Hi", "--temp", "nan"], "temp"),
    Case("gen-top-p", GEN, lambda m, d: ["-m", G(m, d), "-p", "Hi", "--temp", "0.8", "--top-p", "2"], "top-p"),
    Case("gen-ctx-below-prompt", GEN, lambda m, d: ["-m", G(m, d), "-p", "Once upon a time " * 8, "-c", "4"],
         "context|-c"),
    Case("gen-bad-utf8-prompt", GEN, lambda m, d: ["-m", G(m, d), "-p", "caf\udce9"], "UTF-8"),
    Case("gen-no-model", GEN, lambda m, d: ["-m", "none.gguf", "-p", "Hi"], "none.gguf"),
    Case("gen-prompt-and-file", GEN, lambda m, d: ["-m", G(m, d), "-p", "Hi", "-f", str(m.text)], "not both"),
    Case("gen-no-prompt", GEN, lambda m, d: ["-m", G(m, d)], "no prompt"),
    Case("gen-prompt-file-missing", GEN, lambda m, d: ["-m", G(m, d), "-f", str(d / "none.txt")], "none.txt"),
    Case("gen-bad-chat-template", GEN, lambda m, d: ["-m", G(m, d), "-cnv", "-p", "Hi", "--chat-template-file",
                                                     _text_file(d / "bad.jinja", "{% if %}")], "template"),
    Case("gen-repeat-penalty-zero", GEN, lambda m, d: ["-m", G(m, d), "-p", "Hi", "--repeat-penalty", "0"],
         "repeat-penalty"),
    Case("gen-seed-out-of-range", GEN, lambda m, d: ["-m", G(m, d), "-p", "Hi", "--seed", "-2"], "seed"),
    Case("gen-iq-tensor", GEN, lambda m, d: ["-m", str(_iq_model(m, d)), "-p", "Hi"], "TQ1_0"),
    # kquant-compare
    Case("cmp-no-quants", CMP, lambda m, d: [G(m, d), "-f", str(m.text)], "QUANT|quant"),
    Case("cmp-quant-missing", CMP, lambda m, d: [G(m, d), "none.gguf", "-f", str(m.text)], "none.gguf"),
    Case("cmp-plot-is-input", CMP, lambda m, d: [G(m, d), G(m, d), "-f", str(m.text), "--plot", str(m.text)],
         "also an input"),
]


# --- the helpers the table uses -------------------------------------------------------------

def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _truncated(src: Path, dst: Path | None, fraction: float) -> Path:
    data = src.read_bytes()
    dst = dst or src
    dst.write_bytes(data[:max(8, int(len(data) * fraction))])
    return dst


def _patched(src: Path, dst: Path, at: int, raw: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[at:at + len(raw)] = raw
    dst.write_bytes(bytes(data))
    return dst


def _without_key(src: Path, dst: Path, key: str) -> Path:
    """The key renamed to one of the same length, so nothing else moves."""
    data = src.read_bytes()
    k = key.encode()
    return _write(dst, data.replace(struct.pack("<Q", len(k)) + k,
                                    struct.pack("<Q", len(k)) + b"x" * len(k), 1))


def _split_first(m: Materials, d: Path) -> Path:
    first = d / "tiny-00001-of-00002.gguf"
    shutil.copy(m.gguf, first)
    return first


def _split_pair(m: Materials, d: Path) -> Path:
    """The tiny model as two split files, tiny-00001-of-00002.gguf and -00002-."""
    from kquant.files.gguf_read import load_gguf
    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import KV, ModelSource

    s = load_gguf(m.gguf)
    half = len(s.tensors) // 2
    parts = [s.tensors[:half], s.tensors[half:]]
    for i, tensors in enumerate(parts):
        kv = (s.kv if i == 0 else [k for k in s.kv if k.key in ("general.architecture", "general.alignment")])
        kv = kv + [KV("split.no", i, V.UINT16), KV("split.count", 2, V.UINT16),
                   KV("split.tensors.count", len(s.tensors), V.INT32)]
        write_gguf(ModelSource(s.arch, kv, tensors), d / f"tiny-{i + 1:05d}-of-00002.gguf", progress=False)
    return d / "tiny-00001-of-00002.gguf"


def _quantized(m: Materials, d: Path) -> Path:
    return _one_matrix_as(m, d / "q8.gguf", "Q8_0", T.Q8_0)


def _text_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _iq_model(m: Materials, d: Path) -> Path:
    """The tiny model with one matrix declared TQ1_0 (zero bytes), a type kquant neither writes
    nor runs (IQ4_NL, then IQ3_S, then IQ2_XS, which it once was, are now written and run)."""
    return _one_matrix_as(m, d / "iq.gguf", None, T.TQ1_0)


def _one_matrix_as(m: Materials, out: Path, codec: str | None, declared: T) -> Path:
    """The tiny model with blk.0.ffn_up.weight quantized by `codec` (None: zero bytes of
    `declared`'s size), declared `declared`."""
    from gguf import GGML_QUANT_SIZES

    from kquant.codecs.api import quantize
    from kquant.files.gguf_read import load_gguf
    from kquant.files.gguf_write import write_gguf

    s = load_gguf(m.gguf)
    t = next(t for t in s.tensors if t.name == "blk.0.ffn_up.weight")
    if codec is None:
        block, size = GGML_QUANT_SIZES[declared]
        data = np.zeros(t.shape[0] * t.shape[1] // block * size, np.uint8)
    else:
        data = quantize(np.asarray(t.load()).view(np.float32).reshape(t.shape[1], t.shape[0]), codec)
    t.type, t.load = declared, (lambda data=data: data.reshape(-1))
    s.path = ""
    return write_gguf(s, out, progress=False)


def _nan_weights(m: Materials, d: Path) -> Path:
    from kquant.files.gguf_read import load_gguf
    from kquant.files.gguf_write import write_gguf

    s = load_gguf(m.gguf)
    t = next(t for t in s.tensors if t.name == "blk.1.attn_v.weight")
    data = np.array(t.load()).view(np.float32)
    data[5] = np.nan
    t.load = lambda data=data: data
    s.path = ""
    return write_gguf(s, d / "nan.gguf", progress=False)


def _legacy_empty_name(d: Path) -> Path:
    entry = struct.pack("<i", 0) + struct.pack("<ii", 1, 2) + np.ones(2, np.float32).tobytes()
    return _write(d / "e.dat", struct.pack("<i", 1) + entry)


# --- the check ------------------------------------------------------------------------------

def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def run_cli(command: str, argv: list[str], capsys) -> tuple[int, str, str]:
    main = importlib.import_module(f"kquant.cli.{command}").main
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_enough_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, m: Materials, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = case.argv(m, tmp_path)
    capsys.readouterr()
    materials, made = _digest(m.root), _digest(tmp_path)
    rc, out, err = run_cli(case.command, argv, capsys)
    assert rc not in (0, None), (out, err)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert re.search(case.expect, lines[0], re.I), lines[0]
    assert "Traceback" not in err
    assert _digest(m.root) == materials, "an input changed"
    assert _digest(tmp_path) == made, "something was left behind"


# --- signals: Ctrl-C, SIGTERM and SIGHUP leave nothing behind --------------------------------

# Runs a command's console entry point with a signal sent to itself at a chosen moment: while
# numpy loads ("import"), or at the first call of a function the run goes through ("module:attr";
# for a generator, when the item after its first is asked for: one chunk is done by then).
_SIGNALLED = r'''
import importlib, inspect, os, signal, sys
# as in a terminal: a parent run in the background (nohup ... &, as CI may be) ignores SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)
sig, when, command, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
if when == "import":
    class _Hook:
        def find_spec(self, name, path=None, target=None):
            if name == "numpy":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), sig)
            return None
    sys.meta_path.insert(0, _Hook())
entry = getattr(importlib.import_module("kquant.cli"), f"{command}_entry")
if when != "import":
    module, attr = when.split(":")
    target = importlib.import_module(module)
    real = getattr(target, attr)
    if inspect.isgeneratorfunction(real):
        def wrapped(*a, **k):
            for item in real(*a, **k):
                yield item
                os.kill(os.getpid(), sig)
    else:
        def wrapped(*a, **k):
            os.kill(os.getpid(), sig)
            return real(*a, **k)
    setattr(target, attr, wrapped)
sys.argv = [f"kquant-{command}", *argv]
sys.exit(entry())
'''

_QUANTIZE = "kquant.quantization.pipeline:quantize"


@pytest.mark.parametrize("sig,when", [("SIGINT", "import"), ("SIGTERM", "import"), ("SIGINT", _QUANTIZE),
                                      ("SIGTERM", _QUANTIZE), ("SIGHUP", _QUANTIZE)])
def test_signal_leaves_nothing(m: Materials, tmp_path, sig: str, when: str):
    p, word = _signalled(sig, when, "quantize", [str(m.gguf), str(tmp_path / "out.gguf"), "Q4_K_M"], tmp_path)
    assert p.stderr.strip().splitlines()[-1] == f"kquant-quantize: {word}" + (
        "; no output written" if when != "import" else ""), p.stderr
    assert list(tmp_path.iterdir()) == []


def test_signal_keeps_the_imatrix_saved_before(m: Materials, tmp_path):
    """SIGTERM after the first chunk of kquant-imatrix -ofreq 1: the imatrix saved after it is
    whole (one chunk), and no temporary file is left."""
    from kquant.calibration.imatrix_file import load_imatrix

    out = tmp_path / "im.gguf"
    p, word = _signalled("SIGTERM", "kquant.calibration.imatrix:run_chunks", "imatrix",
                         ["-m", str(m.gguf), "-f", str(m.text), "-c", "64", "-b", "64", "--chunks", "4",
                          "-ofreq", "1", "-o", str(out), "--no-progress"], tmp_path)
    assert p.stderr.strip().splitlines()[-1] == f"kquant-imatrix: {word}; files saved before this point are intact"
    assert list(tmp_path.iterdir()) == [out] and load_imatrix(out).chunk_count == 1


def test_signal_leaves_no_logits_file(m: Materials, tmp_path):
    p, word = _signalled("SIGHUP", "kquant.validation.perplexity:run_chunks", "perplexity",
                         ["-m", str(m.gguf), "-f", str(m.text), "-c", "64", "-b", "64", "--chunks", "4",
                          "--kl-divergence-base", str(tmp_path / "base.kld"), "--no-progress"], tmp_path)
    assert p.stderr.strip().splitlines()[-1] == f"kquant-perplexity: {word}; no logits file written"
    assert list(tmp_path.iterdir()) == []


def _signalled(sig: str, when: str, command: str, argv: list[str], cwd: Path):
    """Run the command with the signal; check the exit code and that no traceback was printed."""
    import signal
    import subprocess
    import sys

    signum = int(getattr(signal, sig))
    p = subprocess.run([sys.executable, "-c", _SIGNALLED, str(signum), when, command, *argv],
                       capture_output=True, text=True, cwd=cwd, timeout=600)
    assert p.returncode == 128 + signum and "Traceback" not in p.stderr, p.stderr
    return p, ("interrupted" if sig == "SIGINT" else f"stopped by {sig}")


# --- full disks, streamed output, the context -----------------------------------------------

def test_statistics_of_all_zero_entries(tmp_path, capsys):
    """llama-imatrix prints nan for the cosine similarity of all-zero entries (0 / 0 in C++);
    kquant did so with a ZeroDivisionError traceback."""
    from kquant.calibration.imatrix_file import Imatrix, ImatrixEntry, save_imatrix_gguf

    im = Imatrix(chunk_count=2, chunk_size=64, datasets=["t"])
    for layer in range(3):
        im.entries[f"blk.{layer}.attn_q.weight"] = ImatrixEntry(np.zeros(64, np.float32), np.array([10]))
    save_imatrix_gguf(im, tmp_path / "zero.gguf")
    rc, out, err = run_cli(IM, ["--show-statistics", "--in-file", str(tmp_path / "zero.gguf")], capsys)
    assert rc == 0 and "nan" in err.splitlines()[-2], err


def test_disk_full_names_the_cause(m: Materials, tmp_path, monkeypatch, capsys):
    """A write that runs out of space (numpy's short-write message, no errno) is one line that
    says so, with the output named, and no temporary file is left."""
    import errno

    import kquant.files.gguf_write as gw

    real = gw.GGUFWriter.write_tensor_data

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gw.GGUFWriter, "write_tensor_data", full)
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(Q, [str(m.gguf), "out.gguf", "Q8_0"], capsys)
    assert rc == 1 and "Traceback" not in err
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and "no space left" in line[0] and "out.gguf" in line[0], err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(gw.GGUFWriter, "write_tensor_data", real)


def test_not_enough_space_before_writing(m: Materials, tmp_path, monkeypatch, capsys):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(Q, [str(m.gguf), "out.gguf", "Q8_0"], capsys)
    assert rc == 1 and "not enough space for out.gguf" in err and "1000 bytes free" in err, err
    assert list(tmp_path.iterdir()) == []


def test_error_after_streamed_text_starts_a_line(m: Materials, monkeypatch, capsys):
    """kquant-generate streams text without a newline: an error then must not be glued to it."""
    import kquant.validation.generate as gen
    from kquant.errors import ModelError

    real = gen.Sampler.__call__
    calls = []

    def failing(self, logits):
        calls.append(1)
        if len(calls) == 3:
            raise ModelError("the sampler failed")
        return real(self, logits)

    monkeypatch.setattr(gen.Sampler, "__call__", failing)
    rc, out, err = run_cli(GEN, ["-m", str(m.gguf), "-p", "Once upon a time", "-n", "8", "--temp", "0"], capsys)
    assert rc == 1 and out.endswith("\n") and err.startswith("kquant-generate: error: the sampler failed")


def test_generation_stops_at_the_context(m: Materials, capsys):
    """-n beyond -c: generation stops when the context is full, and says so."""
    rc, out, err = run_cli(GEN, ["-m", str(m.gguf), "-p", "Once upon a time", "-n", "100", "-c", "12"], capsys)
    assert rc == 0, err
    assert "kquant-generate: stopped: the context is full (12 tokens, -c)" in err, err


@pytest.mark.parametrize("argv", [["-n", "0"], ["-n", "3", "--seed", "-1", "--temp", "1"]],
                         ids=["no-tokens", "random-seed"])
def test_generate_takes_llama_cli_values(m: Materials, argv, capsys):
    """-n 0 (the prompt alone) and --seed -1 (random, llama.cpp's default) are ordinary runs."""
    rc, out, err = run_cli(GEN, ["-m", str(m.gguf), "-p", "Hi", *argv], capsys)
    assert rc == 0 and "Traceback" not in err and "kquant-generate: prompt eval time" in err, err


def test_names_that_are_not_utf8_print_as_bytes(m: Materials, tmp_path):
    """A tensor name with a byte that is not UTF-8 is kept (llama.cpp keeps bytes) and printed
    back as that byte by --dry-run, under a strict UTF-8 stdout, not a UnicodeEncodeError."""
    import subprocess
    import sys

    data = m.gguf.read_bytes()
    name = b"blk.0.ffn_up.weight"
    bad = tmp_path / "bytes.gguf"
    bad.write_bytes(data.replace(struct.pack("<Q", len(name)) + name,
                                 struct.pack("<Q", len(name)) + name[:-1] + b"\xff", 1))
    p = subprocess.run([sys.executable, "-m", "kquant.cli.quantize", "--dry-run", str(bad), "Q8_0"],
                       capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"}, timeout=300)
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr
    assert b"blk.0.ffn_up.weigh\xff" in p.stdout
