"""kquant.files.hf (with kquant.archs) / kquant.files.gguf_write / kquant-convert against llama.cpp's convert_hf_to_gguf.py.

The fixtures (tests/make_hf_fixtures.py) are built into a temporary folder; the reference results
in tests/data/hf_reference/*.json were recorded from llama.cpp's own converter on those exact
folders (tools/hf_reference.py --record): every metadata key (order, type, value), every tensor
(name, shape, type, sha256 of its bytes) and the sha256 of the whole file.
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_hf_fixtures as fixtures  # noqa: E402
from kquant.cli import convert as convert_cli  # noqa: E402
from kquant.files.gguf_write import write_gguf  # noqa: E402
from kquant.files.hf import default_outfile_name, load_hf_model  # noqa: E402
from kquant.files.hf_vocab import bpe_pre_tokenizer_name  # noqa: E402
from kquant.errors import ModelError
from kquant.files.source import ModelSource, SourceTensor  # noqa: E402

REF_DIR = Path(__file__).resolve().parent / "data" / "hf_reference"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    if not fixtures.DEFAULT_TEXT.is_file():
        pytest.skip(f"training text {fixtures.DEFAULT_TEXT} (shared/) not available")
    return fixtures.build(tmp_path_factory.mktemp("hf"))


def _copy(built: dict[str, Path], name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(built[name], dst)
    return dst


def _reference(name: str) -> dict:
    path = REF_DIR / f"{name}.json"
    assert path.is_file(), f"missing reference {path}"
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_fixture_has_a_reference():
    assert sorted(p.stem for p in REF_DIR.glob("*.json")) == sorted(fixtures.FIXTURES)


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("name", list(fixtures.FIXTURES))
def test_matches_convert_hf_to_gguf(built, tmp_path, name, outtype):
    ref = _reference(name)[outtype]
    out = write_gguf(load_hf_model(built[name], outtype), tmp_path / "out.gguf", progress=False)
    got = fixtures.summarize_gguf(out)
    assert [m[0] for m in got["metadata"]] == [m[0] for m in ref["metadata"]]      # keys, in order
    for g, r in zip(got["metadata"], ref["metadata"]):
        assert g == r                                                               # type and value
    assert [t[:3] for t in got["tensors"]] == [t[:3] for t in ref["tensors"]]       # names, shapes, types
    for g, r in zip(got["tensors"], ref["tensors"]):
        assert g[3] == r[3], f"{g[0]}: bytes differ"
    assert got["file_sha256"] == ref["file_sha256"]                                 # the very same file


def test_source_shapes_types_and_lazy_loading(built, monkeypatch):
    calls = []
    real_memmap = np.memmap

    def counting_memmap(*args, **kwargs):
        calls.append(args[0])
        return real_memmap(*args, **kwargs)

    monkeypatch.setattr(np, "memmap", counting_memmap)
    src = load_hf_model(built["tiny-qwen3"], "bf16")
    assert calls == []                                   # nothing read at construction
    assert src.arch == "qwen3" and src.get("general.architecture") == "qwen3"
    by_name = {t.name: t for t in src.tensors}
    q = by_name["blk.0.attn_q.weight"]
    assert q.shape == (256, 512) and q.type.name == "BF16"
    assert by_name["blk.0.attn_q_norm.weight"].type.name == "F32"
    assert "output.weight" in by_name
    data = q.load()
    assert len(calls) == 1
    assert data.dtype == np.uint8 and data.nbytes == q.nbytes == 256 * 512 * 2
    assert src.get("qwen3.attention.key_length") == 128
    # tied embeddings: no output.weight
    assert "output.weight" not in {t.name for t in load_hf_model(built["tiny-qwen2"]).tensors}


def test_llama_qk_permutation(built):
    """blk.N.attn_q/k rows are HF's q_proj/k_proj rows in GGML's interleaved rope order."""
    folder = built["tiny-llama-spm"]
    src = load_hf_model(folder, "f32")
    q = next(t for t in src.tensors if t.name == "blk.0.attn_q.weight").load()
    header_len = struct.unpack("<Q", (folder / "model.safetensors").read_bytes()[:8])[0]
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + header_len])
    meta = header["model.layers.0.self_attn.q_proj.weight"]
    raw = np.frombuffer((folder / "model.safetensors").read_bytes(), dtype="<f4",
                        count=int(np.prod(meta["shape"])), offset=8 + header_len + meta["data_offsets"][0])
    hf = raw.reshape(meta["shape"])
    n_head, hd = 4, 64
    expect = hf.reshape(n_head, 2, hd // 2, -1).swapaxes(1, 2).reshape(hf.shape)
    assert np.array_equal(q, expect) and not np.array_equal(q, hf)


def test_default_outfile_name(built):
    # as convert_hf_to_gguf.py names them (checked against it for these folders)
    assert default_outfile_name(load_hf_model(built["tiny-llama-spm"], "bf16")) == "Tiny-Llama-Spm-1.6M-BF16.gguf"
    assert default_outfile_name(load_hf_model(built["tiny-mistral-spm"], "bf16")) == "Tiny-Mistral-Spm-1.5M-BF16.gguf"
    assert default_outfile_name(load_hf_model(built["tiny-smollm"], "f32")) == "Tiny-Smollm-103K-F32.gguf"


def test_arch_registry():
    """kquant.archs finds each architecture file by GGUF name and by Hugging Face class."""
    from kquant.archs import ARCHS, arch_for_hf_class, get_arch
    assert sorted(ARCHS) == ["gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen2moe", "qwen3", "qwen3moe"]
    assert arch_for_hf_class("MixtralForCausalLM") is get_arch("llama")
    assert arch_for_hf_class("MistralForCausalLM") is arch_for_hf_class("LlamaForCausalLM") is get_arch("llama")
    assert arch_for_hf_class("Qwen3ForCausalLM").name == "qwen3"
    assert arch_for_hf_class("Phi3ForCausalLM").name == "phi3"
    assert arch_for_hf_class("Gemma2ForCausalLM").name == "gemma2"
    assert arch_for_hf_class("Gemma3ForCausalLM") is arch_for_hf_class("Gemma3ForConditionalGeneration") \
        is get_arch("gemma3")
    assert arch_for_hf_class("Qwen3MoeForCausalLM").name == "qwen3moe"
    assert arch_for_hf_class("Qwen2MoeForCausalLM").name == "qwen2moe"
    assert arch_for_hf_class("GPT2LMHeadModel") is None
    assert [get_arch(n).rope_neox for n in ("llama", "qwen2", "qwen3", "phi3", "gemma2")] == [False, True, True, True, True]


def _phi3_with(built, tmp_path, **changes) -> Path:
    d = _copy(built, "tiny-phi3", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("rs_"):  # a field of rope_scaling
            cfg["rope_scaling"][key[3:]] = value
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_phi3_refusals(built, tmp_path):
    """What transformers' Phi3Config and the converter refuse, as one ModelError each."""
    with pytest.raises(ModelError, match="long_factor has 23 values; the 48 rotated dimensions of a head take 24"):
        load_hf_model(_phi3_with(built, tmp_path / "a", rs_long_factor=[1.0] * 23))
    with pytest.raises(ModelError, match="rope_scaling type 'dynamic' is not supported"):
        load_hf_model(_phi3_with(built, tmp_path / "b", rs_type="dynamic"))
    with pytest.raises(ModelError, match="tokenizer_config.json: added token .* has id 643, not one of the 643"):
        load_hf_model(_phi3_with(built, tmp_path / "c", vocab_size=643))


def test_phi3_without_longrope(built, tmp_path):
    """No rope_scaling: no rope factors, no attn_factor; sliding_window absent -> 0."""
    d = _phi3_with(built, tmp_path, rope_scaling=None, sliding_window=None)
    src = load_hf_model(d, "f32")
    assert not any(t.name.startswith("rope_factors") for t in src.tensors)
    assert src.get("phi3.rope.scaling.attn_factor") is None
    assert src.get("phi3.attention.sliding_window") == 0
    assert src.get("phi3.rope.scaling.original_context_length") == 256


def _gemma3_with(built, tmp_path, name="tiny-gemma3", **changes) -> Path:
    """A copy of a gemma3 fixture with config.json's (text_config's, for -vl) keys changed."""
    d = _copy(built, name, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (cfg.get("text_config") or cfg).update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name, changes, message", [
    ("tiny-gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping is set; Gemma 3 has none"),
    ("tiny-gemma3-vl", dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}),
     "rope scaling 'yarn' of the global layers is not supported"),
    ("tiny-gemma3", dict(rope_parameters={"full_attention": {"rope_type": "default"},
                                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "rope scaling 'linear' of the sliding-window layers"),
    ("tiny-gemma3", dict(sliding_window_pattern=2), "layer_types .* differ from llama.cpp's Gemma 3 pattern"),
    ("tiny-gemma3", dict(query_pre_attn_scalar=128), r"query_pre_attn_scalar is 128, .* 1/sqrt\(64\)"),
    ("tiny-gemma3", dict(use_bidirectional_attention=True), "bidirectional attention"),
    ("tiny-gemma3", dict(sliding_window=None), "sliding_window is None"),
    ("tiny-gemma3", dict(model_type="gemma3"), "model_type 'gemma3' .* without a text_config"),
])
def test_gemma3_refusals(built, tmp_path, capsys, name, changes, message):
    """Settings the converter refuses or writes without llama.cpp's gemma3 graph reading them
    (it would compute another model): one `error:` line each."""
    d = _gemma3_with(built, tmp_path, name, **changes)
    with pytest.raises(ModelError, match=message):
        load_hf_model(d)
    assert convert_cli.main([str(d), "--outtype", "f16", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kquant-convert: error: ")


def test_gemma3_configs(built, tmp_path):
    """sliding_window_pattern 1: every layer global, no window written (llama.cpp then has no
    SWA); no tokenizer.model: refused; a text_config only Gemma3ForConditionalGeneration has."""
    src = load_hf_model(_gemma3_with(built, tmp_path / "a", sliding_window_pattern=1), "f32")
    assert src.get("gemma3.attention.sliding_window") is None
    from kquant.runtime.config import read_config
    c = read_config(src)
    assert c.swa_layers == () and c.rope_swa is None
    d = _copy(built, "tiny-gemma3", tmp_path / "b")
    (d / "tokenizer.model").unlink()
    with pytest.raises(ModelError, match="no tokenizer.model"):
        load_hf_model(d)
    d = _copy(built, "tiny-phi3", tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "text_config": {}}))
    with pytest.raises(ModelError, match=r"nested configs \(text_config\) are not supported"):
        load_hf_model(d)


def test_pre_tokenizer_names():
    def split(regex):
        return {"pre_tokenizer": fixtures._split_pre(regex)}

    assert bpe_pre_tokenizer_name(split(fixtures._LLAMA3_RE)) == "llama-bpe"
    assert bpe_pre_tokenizer_name(split(fixtures._QWEN2_RE)) == "qwen2"
    assert bpe_pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                     "use_regex": True}}) == "gpt-2"
    with pytest.raises(ModelError, match="pre-tokenizer not recognized"):
        bpe_pre_tokenizer_name(split("\\s+"))
    with pytest.raises(ModelError, match="pre-tokenizer not recognized"):
        bpe_pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})


# ------------------------------------------------------------------------------------ errors

def test_not_a_directory(tmp_path):
    with pytest.raises(ModelError, match="is not a directory"):
        load_hf_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json"):
        load_hf_model(tmp_path)


def test_unknown_architecture(built, tmp_path):
    d = _copy(built, "tiny-smollm", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"'GPT2LMHeadModel' is not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_hf_model(d)


def test_truncated_safetensors_data(built, tmp_path):
    d = _copy(built, "tiny-smollm", tmp_path)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"model.safetensors: truncated safetensors file: tensor .* ends at byte \d+ of the data section, which holds \d+ bytes"):
        load_hf_model(d)


def test_truncated_safetensors_header(built, tmp_path):
    d = _copy(built, "tiny-smollm", tmp_path)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:50])
    with pytest.raises(ModelError, match=r"truncated safetensors file: header of \d+ bytes"):
        load_hf_model(d)


def test_missing_shard(built, tmp_path):
    d = _copy(built, "tiny-mistral-spm", tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="missing safetensors file model-00002-of-00002.safetensors"):
        load_hf_model(d)


def test_missing_tokenizer(built, tmp_path):
    d = _copy(built, "tiny-qwen2", tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer"):
        load_hf_model(d)


def test_unknown_tensor(built, tmp_path):
    d = _copy(built, "tiny-smollm", tmp_path)
    from kquant.files.safetensors import index_tensors
    tensors = {name: st.load().astype(np.float32) for name, st in index_tensors(d).items()}
    tensors["model.layers.0.mystery.weight"] = np.zeros((4, 4), np.float32)
    fixtures.write_safetensors(d / "model.safetensors", tensors, "F32")
    with pytest.raises(ModelError, match="'model.layers.0.mystery.weight'.* has no GGUF name"):
        load_hf_model(d)


def test_unknown_outtype(built):
    with pytest.raises(ModelError, match="unknown outtype"):
        load_hf_model(built["tiny-smollm"], "q4_k")


# ------------------------------------------------------------------------------------ writing

def _no_partial_files(folder: Path) -> bool:
    return not any(p.name.endswith((".gguf", ".part")) for p in folder.iterdir())


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_write_removes_partial_file(built, tmp_path, exc):
    src = load_hf_model(built["tiny-smollm"], "f16")
    t = src.tensors[3]

    def boom():
        raise exc

    src.tensors[3] = SourceTensor(t.name, t.shape, t.type, boom)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(type(exc)):
        write_gguf(src, out_dir / "m.gguf", progress=False)
    assert list(out_dir.iterdir()) == []


def test_write_refuses_to_overwrite_input(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="is also an input"):
        write_gguf(ModelSource(arch="llama", kv=[], tensors=[], path=str(f)), f, progress=False)
    assert f.read_bytes() == b"GGUF"


# ------------------------------------------------------------------------------------ CLI

def test_cli_convert(built, tmp_path, capsys):
    d = _copy(built, "tiny-smollm", tmp_path)
    assert convert_cli.main([str(d), "--outtype", "bf16", "--no-progress"]) == 0
    out = d / "Tiny-Smollm-103K-BF16.gguf"
    assert fixtures.summarize_gguf(out)["file_sha256"] == _reference("tiny-smollm")["bf16"]["file_sha256"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "20 tensors" in lines[0] and str(out) in lines[0]

    assert convert_cli.main([str(d), "--outtype", "auto", "--outfile", str(tmp_path / "m-{ftype}.gguf")]) == 0
    assert (tmp_path / "m-bf16.gguf").is_file()   # auto: bf16, the weights' dtype


@pytest.mark.parametrize("case", ["no-config", "truncated", "unknown-arch", "no-tokenizer"])
def test_cli_errors(built, tmp_path, capsys, case):
    d = _copy(built, "tiny-smollm", tmp_path)
    if case == "no-config":
        (d / "config.json").unlink()
    elif case == "truncated":
        st = d / "model.safetensors"
        st.write_bytes(st.read_bytes()[:-1])
    elif case == "unknown-arch":
        (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    else:
        (d / "tokenizer.json").unlink()
    rc = convert_cli.main([str(d), "--outtype", "f16", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kquant-convert: error: ") and captured.out == ""
    assert _no_partial_files(d)


def _with_config(built, name: str, tmp_path: Path, **changes) -> Path:
    d = _copy(built, name, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name, changes, message", [
    # llama.cpp renormalizes every qwen3moe's top-k weights, and no qwen2moe's
    ("tiny-qwen3moe", {"norm_topk_prob": False}, "norm_topk_prob false is not supported"),
    ("tiny-qwen2moe", {"norm_topk_prob": True}, "norm_topk_prob true is not supported"),
    # its graphs have experts in every block
    ("tiny-qwen3moe", {"mlp_only_layers": [1]}, r"mlp_only_layers \[1\] .* is not supported"),
    ("tiny-qwen2moe", {"decoder_sparse_step": 2}, "decoder_sparse_step 2 .* is not supported"),
    # the folder holds 8 experts per block: a count of 4 stacks experts 0-3, then finds the
    # next four are not 0-3 (the converter's KeyError); of 16, it never has all of a block's
    ("tiny-mixtral", {"num_local_experts": 4}, "expert tensor .* is missing"),
    ("tiny-qwen3moe", {"num_experts": 16}, "unprocessed expert tensors"),
])
def test_moe_refusals(built, tmp_path, name, changes, message):
    """MoE configurations llama.cpp would compute differently from the checkpoint, or that do
    not match the folder's tensors: one ModelError each, before anything is written."""
    with pytest.raises(ModelError, match=message):
        load_hf_model(_with_config(built, name, tmp_path, **changes))


def test_moe_fused_expert_tensors_refused(built, tmp_path):
    """transformers 5 may save a block's experts as one fused gate_up_proj: refused by name."""
    d = _copy(built, "tiny-qwen3moe", tmp_path)
    st = d / "model.safetensors"
    header_len = struct.unpack("<Q", st.read_bytes()[:8])[0]
    header = json.loads(st.read_bytes()[8:8 + header_len])
    old = "model.layers.0.mlp.experts.0.gate_proj.weight"
    header = {("model.layers.0.mlp.experts.gate_up_proj" if k == old else k): v for k, v in header.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    st.write_bytes(struct.pack("<Q", len(raw)) + raw + st.read_bytes()[8 + header_len:])
    with pytest.raises(ModelError, match="fused or stacked expert tensors are not supported"):
        load_hf_model(d)
