"""A bad model is one clear error naming the cause, never a silent wrong file or a traceback.

- a Hugging Face folder whose config.json lacks a size, or holds one of the wrong type or value,
  is refused before transformers' Llama-7B defaults could stand in for it (kquant.files.hf);
- a folder or GGUF whose metadata and tensors disagree (a size, a missing or extra tensor) is
  refused with llama.cpp's loader's words (kquant.archs.checks, from each arch's tensor table);
- a GGUF given to the runtime with impossible metadata (0 heads, a NaN epsilon, a string for a
  number) or a tensor type the runtime cannot run is refused by read_config, before any work;
- metadata strings that are not UTF-8 keep their bytes in a GGUF (as in llama.cpp) and are
  refused, naming the key, where an HF folder's JSON would put them into one.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TINY_LLAMA  # noqa: E402
from kquant.errors import ModelError  # noqa: E402
from kquant.files.gguf_read import load_gguf  # noqa: E402
from kquant.files.gguf_write import write_gguf  # noqa: E402
from kquant.files.hf import load_hf_model  # noqa: E402
from kquant.files.source import KV, ModelSource, SourceTensor  # noqa: E402
from kquant.runtime.config import read_config  # noqa: E402


# --- helpers -------------------------------------------------------------------------------

def hf_copy(tmp_path: Path, edit: Callable[[dict], Any] | None = None, files: bool = False) -> Path:
    """The tiny model's folder with config.json edited; the other files are links (copies with
    `files`, for tests that rewrite one)."""
    d = tmp_path / "tiny-llama"
    d.mkdir()
    for f in TINY_LLAMA.iterdir():
        if f.name != "config.json":
            shutil.copy(f, d / f.name) if files else (d / f.name).symlink_to(f)
    config = json.loads((TINY_LLAMA / "config.json").read_text())
    if edit is not None:
        edit(config)
    (d / "config.json").write_text(json.dumps(config))  # NaN / Infinity as Python's json writes them
    return d


def _set(**values: Any) -> Callable[[dict], None]:
    return lambda c: c.update(values)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda c: c.pop(key)


def variant(src: ModelSource, path: Path, kv: dict[str, tuple | None] | None = None,
            drop: tuple[str, ...] = (), add: tuple[SourceTensor, ...] = (),
            retype: dict[str, Q] | None = None) -> ModelSource:
    """`src` written as a GGUF with metadata keys set ((value, type[, sub_type]); None: removed),
    tensors dropped, added or given another type (zero bytes), and read back: the file a user
    would run."""
    kv = kv or {}
    pairs = [k for k in src.kv if k.key not in kv]
    pairs += [KV(key, *v) for key, v in kv.items() if v is not None]
    tensors = [_retyped(t, (retype or {}).get(t.name)) for t in src.tensors if t.name not in drop]
    write_gguf(ModelSource(src.arch, pairs, tensors + list(add)), path, progress=False)
    return load_gguf(path)


def _retyped(t: SourceTensor, qtype: Q | None) -> SourceTensor:
    if qtype is None:
        return t
    block, size = GGML_QUANT_SIZES[qtype]
    n = t.n_elements // block * size
    return SourceTensor(t.name, t.shape, qtype, lambda: np.zeros(n, np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelSource:
    """The tiny model as an F32 GGUF, read back."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama-f32.gguf"
    write_gguf(load_hf_model(TINY_LLAMA, "f32"), path, progress=False)
    return load_gguf(path)


# --- 1. config.json: missing sizes, wrong types, impossible values ---------------------------

# case -> (change to config.json, the error expected)
BAD_CONFIGS = {
    "no-hidden_size": (_drop("hidden_size"), r"config\.json: no hidden_size$"),
    "no-heads": (_drop("num_attention_heads"), r"config\.json: no num_attention_heads$"),
    "no-layers": (_drop("num_hidden_layers"), r"config\.json: no num_hidden_layers$"),
    "no-ff": (_drop("intermediate_size"), r"config\.json: no intermediate_size$"),
    "no-vocab": (_drop("vocab_size"), r"config\.json: no vocab_size$"),
    "null-hidden_size": (_set(hidden_size=None), r"config\.json: no hidden_size$"),
    "zero-heads": (_set(num_attention_heads=0), r"num_attention_heads is 0; it must be at least 1"),
    "negative-ff": (_set(intermediate_size=-768), r"intermediate_size is -768; it must be at least 1"),
    "kv-heads-do-not-divide": (_set(num_key_value_heads=3),
                               r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "zero-kv-heads": (_set(num_key_value_heads=0), r"num_key_value_heads is 0"),
    "string-size": (_set(hidden_size="256"), r'hidden_size is "256", not an integer'),
    "float-size": (_set(hidden_size=256.0), r"hidden_size is 256\.0, not an integer"),
    "bool-size": (_set(num_hidden_layers=True), r"num_hidden_layers is true, not an integer"),
    "list-size": (_set(head_dim=[64]), r"head_dim is \[64\], not an integer"),
    "nan-eps": (_set(rms_norm_eps=float("nan")), r"rms_norm_eps is nan; it must be a finite number > 0"),
    "zero-eps": (_set(rms_norm_eps=0), r"rms_norm_eps is 0; it must be a finite number > 0"),
    "string-eps": (_set(rms_norm_eps="1e-5"), r'rms_norm_eps is "1e-5", not a number'),
    "inf-rope-theta": (_set(rope_parameters={"rope_theta": float("inf"), "rope_type": "default"}),
                       r"rope_theta is inf"),
    "negative-rope-theta": (_set(rope_parameters={"rope_theta": -1.0, "rope_type": "default"}),
                            r"rope_theta is -1\.0"),
    "no-architectures": (_drop("architectures"), r"config\.json: no architectures"),
}


@pytest.mark.parametrize("edit, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS)
def test_bad_config_is_refused(tmp_path, edit, message):
    folder = hf_copy(tmp_path, edit)
    with pytest.raises(ModelError, match=message) as e:
        load_hf_model(folder, "f32")
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


# --- 2. the converted model's tensors against its config (llama.cpp's loader's checks) -------

# case -> (change to config.json, the error expected)
CONFIGS_NOT_FITTING = {
    "hidden_size": (_set(hidden_size=128),
                    r"tensor 'token_embd\.weight' has wrong shape; expected 128, 4096, got 256, 4096"),
    "vocab_size": (_set(vocab_size=5000),
                   r"tensor 'token_embd\.weight' has wrong shape; expected 256, 5000, got 256, 4096"),
    "intermediate_size": (_set(intermediate_size=512),
                          r"tensor 'blk\.0\.ffn_gate\.weight' has wrong shape; expected 256, 512, got 256, 768"),
    "heads": (_set(num_attention_heads=2, num_key_value_heads=1),
              r"tensor 'blk\.0\.attn_q\.weight' has wrong shape; expected 256, 128, got 256, 256"),
    "kv-heads": (_set(num_key_value_heads=4),
                 r"tensor 'blk\.0\.attn_k\.weight' has wrong shape; expected 256, 256, got 256, 128"),
    "head_dim": (_set(head_dim=32),
                 r"tensor 'blk\.0\.attn_q\.weight' has wrong shape; expected 256, 128, got 256, 256"),
    "more-layers": (_set(num_hidden_layers=5), r"missing tensor 'blk\.4\.attn_norm\.weight'"),
    "fewer-layers": (_set(num_hidden_layers=3), r"'model\.layers\.3\.\S+' \(model\.safetensors\) is of block 3, "
                                                r"but config\.json's num_hidden_layers is 3"),
}


@pytest.mark.parametrize("edit, message", CONFIGS_NOT_FITTING.values(), ids=CONFIGS_NOT_FITTING)
def test_config_that_does_not_fit_the_tensors_is_refused(tmp_path, edit, message):
    with pytest.raises(ModelError, match=message):
        load_hf_model(hf_copy(tmp_path, edit), "f32")


def test_tensor_missing_from_the_safetensors_is_refused(tmp_path):
    import make_hf_fixtures as fixtures
    from kquant.files.safetensors import index_tensors

    folder = hf_copy(tmp_path, files=True)
    tensors = {name: st.load() for name, st in index_tensors(folder).items()
               if name != "model.layers.1.self_attn.k_proj.weight"}
    fixtures.write_safetensors(folder / "model.safetensors", tensors, "F32")
    with pytest.raises(ModelError, match=rf"^{folder}: missing tensor 'blk\.1\.attn_k\.weight'$"):
        load_hf_model(folder, "f32")


def test_unexpected_tensor_is_the_wrong_number_of_tensors(tiny):
    from kquant.archs import check_tensors

    extra = SourceTensor("blk.0.attn_gate.weight", (256,), Q.F32, lambda: np.zeros(256, np.float32))
    source = ModelSource(tiny.arch, tiny.kv, tiny.tensors + [extra], "m.gguf")
    with pytest.raises(ModelError, match=r"^m\.gguf: wrong number of tensors; expected 40, got 39: "
                                         r"'blk\.0\.attn_gate\.weight' is not a tensor of a 4-block llama model$"):
        check_tensors(source)


def test_every_supported_architecture_passes_its_own_check(tiny):
    from kquant.archs import check_tensors

    check_tensors(tiny)
    check_tensors(tiny, runtime=True)


# --- 2 and 3. the runtime: a GGUF's metadata checked, then its tensors, before any work -------

EPS = "llama.attention.layer_norm_rms_epsilon"

# case -> (metadata set (None: removed), the error expected)
BAD_METADATA = {
    # impossible values (before: a ZeroDivisionError traceback, or PPL 4096 for a NaN epsilon)
    "zero-heads": ({"llama.attention.head_count": (0, V.UINT32)},
                   r"llama\.attention\.head_count is 0; it must be at least 1"),
    "zero-kv-heads": ({"llama.attention.head_count_kv": (0, V.UINT32)}, r"llama\.attention\.head_count_kv is 0"),
    "kv-heads-do-not-divide": ({"llama.attention.head_count_kv": (3, V.UINT32)},
                               r"llama\.attention\.head_count 4 is not a multiple of "
                               r"llama\.attention\.head_count_kv 3"),
    "zero-blocks": ({"llama.block_count": (0, V.UINT32)}, r"llama\.block_count is 0"),
    "zero-embd": ({"llama.embedding_length": (0, V.UINT32)}, r"llama\.embedding_length is 0"),
    "zero-key-length": ({"llama.attention.key_length": (0, V.UINT32)}, r"llama\.attention\.key_length is 0"),
    "zero-context": ({"llama.context_length": (0, V.UINT32)}, r"llama\.context_length is 0"),
    "nan-eps": ({EPS: (math.nan, V.FLOAT32)},
                r"llama\.attention\.layer_norm_rms_epsilon is nan; it must be a finite number > 0"),
    "inf-eps": ({EPS: (math.inf, V.FLOAT32)}, r"layer_norm_rms_epsilon is inf"),
    "zero-eps": ({EPS: (0.0, V.FLOAT32)}, r"layer_norm_rms_epsilon is 0\.0"),
    "negative-eps": ({EPS: (-1.0, V.FLOAT32)}, r"layer_norm_rms_epsilon is -1\.0"),
    "nan-rope-base": ({"llama.rope.freq_base": (math.nan, V.FLOAT32)}, r"llama\.rope\.freq_base is nan"),
    "odd-rope-dims": ({"llama.rope.dimension_count": (65, V.UINT32)},
                      r"llama\.rope\.dimension_count 65 is not an even number"),
    "nan-rope-scale": ({"llama.rope.scaling.type": ("linear", V.STRING),
                        "llama.rope.scaling.factor": (math.nan, V.FLOAT32)}, r"llama\.rope\.scaling\.factor is nan"),
    "value-heads-not-key-heads": ({"llama.attention.value_length": (32, V.UINT32)},
                                  r"llama\.attention\.value_length 32 differs from llama\.attention\.key_length 64"),
    # values of the wrong type
    "string-for-int": ({"llama.embedding_length": ("256", V.STRING)},
                       r"llama\.embedding_length is '256', not an integer"),
    "bool-for-int": ({"llama.attention.head_count": (True, V.BOOL)},
                     r"llama\.attention\.head_count is True, not an integer"),
    "string-for-float": ({EPS: ("x", V.STRING)}, r"llama\.attention\.layer_norm_rms_epsilon is 'x', not a number"),
    # a missing key, in llama.cpp's words
    "no-block-count": ({"llama.block_count": None}, r"key not found in model: llama\.block_count"),
    # metadata that does not fit the tensors
    "embd-not-tensors": ({"llama.embedding_length": (128, V.UINT32)},
                         r"tensor 'token_embd\.weight' has wrong shape; expected 128, 4096, got 256, 4096"),
    "ff-not-tensors": ({"llama.feed_forward_length": (512, V.UINT32)},
                       r"tensor 'blk\.0\.ffn_gate\.weight' has wrong shape; expected 256, 512, got 256, 768"),
    "more-blocks": ({"llama.block_count": (5, V.UINT32)}, r"missing tensor 'blk\.4\.attn_norm\.weight'"),
    "fewer-blocks": ({"llama.block_count": (3, V.UINT32)},
                     r"wrong number of tensors; expected 39, got 30: 'blk\.3\."),
}


@pytest.mark.parametrize("kv, message", BAD_METADATA.values(), ids=BAD_METADATA)
def test_bad_metadata_is_refused_by_read_config(tiny, tmp_path, kv, message):
    source = variant(tiny, tmp_path / "bad.gguf", kv)
    with pytest.raises(ModelError, match=message) as e:
        read_config(source)
    assert str(e.value).startswith(f"{tmp_path / 'bad.gguf'}: ") and "\n" not in str(e.value)


def test_missing_and_extra_tensors_are_refused_by_read_config(tiny, tmp_path):
    with pytest.raises(ModelError, match=r"missing tensor 'blk\.1\.attn_k\.weight'$"):
        read_config(variant(tiny, tmp_path / "a.gguf", drop=("blk.1.attn_k.weight",)))
    extra = SourceTensor("blk.0.mystery.weight", (4,), Q.F32, lambda: np.zeros(4, np.float32))
    with pytest.raises(ModelError, match=r"wrong number of tensors; expected 40, got 39: 'blk\.0\.mystery\.weight'"):
        read_config(variant(tiny, tmp_path / "b.gguf", add=(extra,)))


def test_tensor_llama_cpp_runs_but_kquant_does_not_is_refused(tiny, tmp_path):
    from kquant.archs import check_tensors

    bias = SourceTensor("blk.0.ffn_up.bias", (768,), Q.F32, lambda: np.zeros(768, np.float32))
    source = variant(tiny, tmp_path / "b.gguf", add=(bias,))
    check_tensors(source)  # llama.cpp takes it (an optional tensor)
    with pytest.raises(ModelError, match=r"tensor 'blk\.0\.ffn_up\.bias': kquant's runtime does not compute "
                                         r"with ffn_up\.bias tensors yet"):
        read_config(source)


def test_good_models_keep_their_config(tiny):
    c = read_config(tiny)
    sizes = (c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim, c.n_rot, c.n_vocab)
    assert sizes == (4, 256, 768, 4, 2, 64, 64, 4096)
    assert c.rms_eps == pytest.approx(1e-5) and c.rope_base == 10000.0


# --- 4. tensor types the runtime cannot run --------------------------------------------------

TERNARY = r"ternary quants \(TQ1_0, TQ2_0\)"


@pytest.mark.parametrize("qtype, family", [
    (Q.TQ1_0, TERNARY), (Q.TQ2_0, TERNARY), (Q.MXFP4, "MXFP4 tensors"),
], ids=lambda v: v.name if isinstance(v, Q) else "")
def test_tensor_type_the_runtime_cannot_run_is_refused_before_any_work(tiny, tmp_path, qtype, family):
    source = variant(tiny, tmp_path / "iq.gguf", retype={"blk.0.attn_q.weight": qtype})
    loaded: list[str] = []
    # nothing may be read before the refusal: every tensor's load() records itself
    source.tensors = [SourceTensor(t.name, t.shape, t.type, lambda t=t: loaded.append(t.name) or t.load())
                      for t in source.tensors]
    from kquant.runtime import Transformer

    with pytest.raises(ModelError, match=rf"tensor blk\.0\.attn_q\.weight is {qtype.name}: kquant's runtime "
                                         rf"does not run {family} yet \(it runs .*Q4_K.*\)$"):
        Transformer(source, progress=False)
    assert loaded == []


def test_the_runtime_refuses_exactly_the_types_kquant_matmul_cannot_multiply():
    from kquant.matmul.cpu import WEIGHT_TYPES
    from kquant.runtime.config import check_runnable_types

    for qtype in Q:
        if qtype not in GGML_QUANT_SIZES or GGML_QUANT_SIZES[qtype][0] == 0:
            continue
        source = ModelSource("llama", [], [SourceTensor("w", (256, 2), qtype, lambda: None)], "m.gguf")
        if qtype in WEIGHT_TYPES:
            check_runnable_types(source)
        else:
            with pytest.raises(ModelError, match=f"tensor w is {qtype.name}: "):
                check_runnable_types(source)


# --- 5. metadata strings that are not UTF-8 --------------------------------------------------

def test_invalid_utf8_in_a_gguf_is_kept_as_bytes(tiny, tmp_path):
    """llama.cpp takes a GGUF's strings as bytes: the tokenizer loads, tokenizes and detokenizes
    with tokens that are not UTF-8 (their bytes as they are), and general.name round-trips."""
    from kquant.tokenizer import Tokenizer

    tokens = list(tiny.get("tokenizer.ggml.tokens"))
    tokens[300], tokens[301] = "\udcff\udcfe", "caf\udcc3"  # bytes ff fe; "caf" + a cut-off é
    source = variant(tiny, tmp_path / "bytes.gguf", {
        "general.name": ("tiny \udce9", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING)})
    assert source.get("general.name").encode("utf-8", "surrogateescape") == b"tiny \xe9"
    tok = Tokenizer.from_source(source)
    ids = tok.tokenize("Once upon a time, café", add_special=False)
    assert tok.detokenize(ids) == "Once upon a time, café"
    assert tok.detokenize_bytes([300, 301]).endswith(b"caf\xc3")
    read_config(source)


@pytest.mark.parametrize("escape", ["\\udcff", "\\ud800"], ids=["udcff", "ud800"])
def test_lone_surrogate_in_an_hf_folder_is_refused(tmp_path, escape):
    """JSON can spell text no UTF-8 file holds; the converter dies on it with a traceback (and
    kquant's writer would have written \\udcff as a stray byte): one error naming the key."""
    folder = hf_copy(tmp_path)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["chat_template"] = "@@"
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(tc).replace("@@", f"a{escape}b"))
    with pytest.raises(ModelError, match=rf"^{folder}: tokenizer\.chat_template is not valid UTF-8 text: it holds "
                                         rf"the lone surrogate U\+{escape[2:].upper()}"):
        load_hf_model(folder, "f32")


# --- rope scaling the converter drops -------------------------------------------------------

@pytest.mark.parametrize("rope, runs", [
    ({"rope_type": "linear", "factor": 2.0}, True),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, True),  # llama: rope_freqs
    ({"type": "dynamic", "factor": 2.0}, False),
    ({"rope_type": "nosuch"}, False),
])
def test_dropped_rope_scaling_is_refused_at_run_time(tmp_path: Path, rope: dict, runs: bool) -> None:
    """convert_hf_to_gguf.py drops a rope_scaling type it does not know (llama.cpp then runs the
    model unscaled): kquant converts the same bytes, warns, and its runtime refuses the folder."""
    folder = hf_copy(tmp_path, lambda c: c.update(rope_scaling=rope))
    source = load_hf_model(folder, "f32")
    assert bool(source.not_runnable) != runs
    if runs:
        read_config(source)
        return
    with pytest.raises(ModelError, match=r"rope_scaling type .* is dropped by convert_hf_to_gguf.py"):
        read_config(source)


def test_dropped_rope_scaling_warns_on_convert(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from kquant.cli.convert import main as convert

    folder = hf_copy(tmp_path, lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert convert([str(folder), "--outfile", str(tmp_path / "out.gguf"), "--outtype", "f32"]) == 0
    err = capfd.readouterr().err
    assert "kquant-convert: warning: config.json's rope_scaling type 'dynamic' is dropped" in err
    assert (tmp_path / "out.gguf").is_file()


def test_llama3_rope_on_qwen2_is_dropped(tmp_path: Path) -> None:
    """Only LlamaModel turns llama3 scaling into rope_freqs: on any other class it is dropped."""
    from kquant.archs import get_arch
    from kquant.files.hf import _dropped_rope

    assert _dropped_rope(get_arch("llama"), {"rope_type": "llama3"}) == ""
    assert "'llama3' is dropped" in _dropped_rope(get_arch("qwen2"), {"rope_type": "llama3"})
