"""A Hugging Face model folder as a `ModelSource`: what llama.cpp's convert_hf_to_gguf.py writes.

`load_hf_model(folder, outtype)` reads config.json, the tokenizer files and the safetensors
headers of a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM folder
and returns the metadata pairs and tensors that `convert_hf_to_gguf.py --outtype OUTTYPE` would
write, in the same order, with the same value types and the same tensor bytes.  Nothing is loaded
at construction: each tensor's `load()` memory-maps only its own bytes.

What the converter does, reproduced here without torch or transformers:

* hyper-parameters come from `AutoConfig.from_pretrained(folder).to_dict()` in the converter; the
  defaults that transformers (5.x) fills in for the four supported model types (head_dim,
  rope_parameters with rope_theta, num_key_value_heads, max_position_embeddings, ...) are filled
  in the same way by `_hparams`.
* general.* metadata: gguf's `Metadata.load` (model card, config.json, generation_config.json);
  the name falls back to the folder's name, the size label comes from the parameter count.
* tokenizer: SentencePiece `tokenizer.model` (tokens, scores, token types, added tokens from
  added_tokens.json and tokenizer_config.json's added_tokens_decoder), or a byte-level BPE
  `tokenizer.json` (tokens, types, merges).  The converter names the BPE pre-tokenizer from the
  sha256 of the token ids a HF tokenizer gives for a fixed text; kquant names it from the
  pre_tokenizer section of tokenizer.json instead (the regex and the byte-level step that select
  llama.cpp's pre-tokenizer types), see `BPE_PRE_TOKENIZERS`.  Special token ids, add_bos/add_eos
  and the chat template follow gguf's `SpecialVocab` as shipped with llama.cpp's converter.
* tensors: names through gguf's tensor name map, llama/mistral Q and K rows permuted back to
  the GGML rope layout, 1-D tensors, norms and biases in F32, the rest in the outtype; f16 is
  numpy's float32 -> float16 cast (round to nearest even), bf16 is gguf.quants' BF16 rounding,
  q8_0 is gguf.quants' Q8_0 (rows whose length is not a multiple of 32 fall back to F16 as in
  the converter).

Everything kquant cannot use raises `ModelError` with one message for the user.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import gguf
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType, MODEL_ARCH, MODEL_TENSOR

from ..errors import ModelError
from .source import KV, ModelSource, SourceTensor

__all__ = [
    "load_hf_model", "default_outfile_name", "SUPPORTED_ARCHITECTURES", "OUTTYPES",
    "BPE_PRE_TOKENIZERS", "bpe_pre_tokenizer_name", "guess_outtype",
]

# HF architecture -> (GGUF arch, undo the llama Q/K permutation)
SUPPORTED_ARCHITECTURES: dict[str, tuple[MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": (MODEL_ARCH.QWEN3, False),
}

OUTTYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}

_FTYPE_QTYPE = {
    LlamaFileType.ALL_F32: GGMLQuantizationType.F32,
    LlamaFileType.MOSTLY_F16: GGMLQuantizationType.F16,
    LlamaFileType.MOSTLY_BF16: GGMLQuantizationType.BF16,
    LlamaFileType.MOSTLY_Q8_0: GGMLQuantizationType.Q8_0,
}

# ---------------------------------------------------------------------------------------------
# config.json -> hparams, as transformers' AutoConfig(...).to_dict() gives them to the converter
# ---------------------------------------------------------------------------------------------

# the defaults of transformers 5.x's LlamaConfig / MistralConfig / Qwen2Config / Qwen3Config for
# the fields the converter reads (None: computed in __post_init__)
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None,
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
}
_DEFAULT_THETA = 10_000.0


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{what} {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ModelError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as AutoConfig(...).to_dict() returns it (transformers 5.x) for the supported
    model types; any other model_type is used as it is (the converter's own fallback)."""
    model_type = config.get("model_type")
    defaults = _CONFIG_DEFAULTS.get(model_type) if isinstance(model_type, str) else None
    if defaults is None:
        return dict(config)
    hp = dict(defaults)
    hp.update(config)
    if model_type in ("llama", "mistral") and hp.get("head_dim") is None:
        hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
    if hp.get("num_key_value_heads") is None:
        hp["num_key_value_heads"] = hp["num_attention_heads"]
    # rope: rope_scaling / rope_theta move into rope_parameters
    rope = hp.pop("rope_scaling", None) or hp.get("rope_parameters") or {}
    rope = dict(rope) if isinstance(rope, dict) else {}
    theta = hp.pop("rope_theta", _DEFAULT_THETA)
    rope.setdefault("rope_theta", theta)
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in hp:
            rope["original_max_position_embeddings"] = hp["original_max_position_embeddings"]
        else:
            rope.setdefault("original_max_position_embeddings", hp.get("max_position_embeddings"))
    hp["rope_parameters"] = rope
    return hp


def _find(hp: dict[str, Any], keys: Iterable[str]) -> Any:
    return next((hp[k] for k in keys if k in hp), None)


# ---------------------------------------------------------------------------------------------
# safetensors, read by hand
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class _StTensor:
    __slots__ = ("path", "dtype", "shape", "offset", "nbytes")

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int):
        self.path, self.dtype, self.shape, self.offset, self.nbytes = path, dtype, shape, offset, nbytes

    def raw(self) -> np.ndarray:
        """The stored values, memory-mapped (bf16 as uint16 bit patterns)."""
        dt = _ST_DTYPES[self.dtype]
        n = int(np.prod(self.shape, dtype=np.int64))
        if n == 0:
            return np.empty(self.shape, dtype=dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=(n,)).reshape(self.shape)

    def load(self) -> np.ndarray:
        """The tensor as float32 or float16 (bf16 widened to float32, as the converter does)."""
        arr = self.raw()
        if self.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def _read_safetensors_header(path: Path) -> dict[str, _StTensor]:
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                raise ModelError(f"{path.name}: truncated safetensors file: header of {n} bytes "
                                 f"does not fit in the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path.name}: bad safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path.name}: bad safetensors header")
    data_start = 8 + n
    tensors: dict[str, _StTensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path.name}: bad safetensors header entry for {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise ModelError(f"{path.name}: tensor {name!r} has dtype {dtype}; kquant reads F32, F16 and BF16")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dtype].itemsize
        if end - begin != nbytes or begin < 0:
            raise ModelError(f"{path.name}: tensor {name!r}: data_offsets {begin}..{end} do not match "
                             f"shape {list(shape)} {dtype}")
        if data_start + end > size:
            raise ModelError(f"{path.name}: truncated safetensors file: tensor {name!r} ends at byte "
                             f"{data_start + end}, past the end of the file ({size} bytes)")
        tensors[name] = _StTensor(path, dtype, shape, data_start + begin, nbytes)
    # the converter (gguf.utility.SafetensorsLocal) orders the tensors of a file by name
    return dict(sorted(tensors.items(), key=lambda t: t[0]))


def _index_tensors(folder: Path) -> dict[str, _StTensor]:
    """All tensors, in the converter's order: parts sorted by file name, tensors by name."""
    names = sorted(os.listdir(folder))
    parts = [n for n in names if n.startswith("model") and n.endswith(".safetensors")]
    index_file = folder / "model.safetensors.index.json"
    from_index: set[str] = set()
    weight_map: dict[str, str] = {}
    if index_file.is_file():
        index = _read_json(index_file, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index_file.name} has no 'weight_map'")
        from_index = set(weight_map)
        parts = sorted(dict.fromkeys(weight_map.values()))
    if not parts:
        if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
            raise ModelError(f"{folder}: only pytorch_model*.bin weights; kquant reads safetensors only")
        raise ModelError(f"{folder}: no model*.safetensors weights")
    tensors: dict[str, _StTensor] = {}
    for part in parts:
        p = folder / part
        if not p.is_file():
            raise ModelError(f"{folder}: missing safetensors file {part} (listed in {index_file.name})")
        tensors.update(_read_safetensors_header(p))
    if from_index and from_index != set(tensors):
        missing = sorted(from_index - set(tensors))
        extra = sorted(set(tensors) - from_index)
        raise ModelError(f"{index_file.name} does not match the safetensors files: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"extra {extra[:5]}{'...' if len(extra) > 5 else ''}")
    return tensors


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------

_SKIP_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                  "sound_projection.", "speech_embeddings.")
_SKIP_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
               "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
               "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")

# tensors the converter always keeps in F32 (when present in the architecture)
_F32_TENSORS = ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES", "SSM_CONV1D", "SHORTCONV_CONV",
                "TIME_MIX_FIRST", "TIME_MIX_W1", "TIME_MIX_W2", "TIME_MIX_DECAY_W1", "TIME_MIX_DECAY_W2",
                "TIME_MIX_LERP_FUSED", "POSNET_NORM1", "POSNET_NORM2", "V_ENC_EMBD_POS", "A_ENC_EMBD_POS",
                "ALTUP_CORRECT_COEF", "ALTUP_PREDICT_COEF", "SSM_CONV1D_Q", "SSM_CONV1D_K", "SSM_CONV1D_V",
                "INDEXER_PROJ")


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """LlamaModel.permute: HF's rotate-half Q/K rows back to GGML's interleaved rope layout."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _tensor_name(arch: MODEL_ARCH, key: MODEL_TENSOR, bid: int | None) -> str | None:
    if key not in gguf.MODEL_TENSORS[arch]:
        return None
    name = gguf.TENSOR_NAMES[key]
    if "{bid}" in name:
        if bid is None:
            return None
        name = name.format(bid=bid)
    elif bid is not None:
        return None
    return name + ".weight"


def _pick_qtype(arch: MODEL_ARCH, new_name: str, bid: int | None, n_dims: int,
                ftype: LlamaFileType) -> GGMLQuantizationType:
    if n_dims <= 1 or new_name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    keys = [getattr(MODEL_TENSOR, k) for k in _F32_TENSORS if hasattr(MODEL_TENSOR, k)]
    if any(_tensor_name(arch, k, bid) == new_name for k in keys) or new_name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return GGMLQuantizationType.F32
    return _FTYPE_QTYPE[ftype]


def _convert(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """gguf.quants.quantize as the converter calls it (Q8_0 falling back to F16 on odd rows)."""
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, GGMLQuantizationType.F16), GGMLQuantizationType.F16


def _llama3_rope_factors(rope: dict[str, Any], hp: dict[str, Any]) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: rope_freqs for rope_type llama3, in float32 as torch does."""
    base = rope.get("rope_theta", 10000.0)
    dim = hp.get("head_dim")
    if dim is None:
        dim = hp["hidden_size"] // hp["num_attention_heads"]
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    freqs = (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(np.float32)
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = np.float32(2 * math.pi) / freq
        if wavelen < high_freq_wavelen:
            out.append(1.0)
        elif wavelen > low_freq_wavelen:
            out.append(float(factor))
        else:
            smooth = (np.float32(old_context_len) / wavelen - np.float32(low_freq_factor)) / np.float32(high_freq_factor - low_freq_factor)
            smooth = np.float32(smooth)
            out.append(np.float32(1) / ((np.float32(1) - smooth) / np.float32(factor) + smooth))
    return np.array(out, dtype=np.float32)


def _make_load(raw: Callable[[], np.ndarray], permute: tuple[int, int | None] | None,
               qtype: GGMLQuantizationType, st: _StTensor | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if st is not None and st.dtype == "BF16" and qtype == GGMLQuantizationType.BF16 and st.shape:
            # bf16 -> bf16: the converter's rounding leaves every value as it is (NaNs aside)
            bits = st.raw()
            if permute is not None:
                bits = _permute(bits, *permute)
            bits = np.ascontiguousarray(bits)
            if not ((bits & 0x7FFF) > 0x7F80).any():
                return bits.view(np.uint8)
        data = raw()
        if permute is not None:
            data = _permute(data, *permute)
        out, _ = _convert(data, qtype)
        return np.ascontiguousarray(out)
    return load


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

# token types (gguf.TokenType / SentencePieceTokenTypes)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN35_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_TEKKEN_RE = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|[^\\r\\n\\p{L}\\p{N}]?"
              "[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_GPT4O_RE = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

# (signature of tokenizer.json's pre_tokenizer, llama.cpp's tokenizer.ggml.pre name); the
# signature is the list of steps: ("split", regex) or ("digits", individual) or ("bytelevel", use_regex)
BPE_PRE_TOKENIZERS: list[tuple[tuple, str]] = [
    ((("split", _LLAMA3_RE), ("bytelevel", False)), "llama-bpe"),   # Llama 3.x, DeepSeek-R1-Distill-Llama
    ((("split", _QWEN2_RE), ("bytelevel", False)), "qwen2"),        # Qwen 1.5 / 2 / 2.5 / 3
    ((("split", _QWEN35_RE), ("bytelevel", False)), "qwen35"),
    ((("split", _TEKKEN_RE), ("bytelevel", False)), "tekken"),      # Mistral Nemo
    ((("split", _GPT4O_RE), ("bytelevel", False)), "gpt-4o"),
    ((("digits", True), ("bytelevel", True)), "smollm"),            # SmolLM / SmolLM2 (same regex as starcoder)
    ((("bytelevel", True),), "gpt-2"),
]


def _pre_signature(pre: Any) -> tuple | None:
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for step in steps or []:
        t = step.get("type") if isinstance(step, dict) else None
        if t == "Split":
            pattern = step.get("pattern") or {}
            if "Regex" not in pattern or step.get("behavior") != "Isolated" or step.get("invert"):
                return None
            sig.append(("split", pattern["Regex"]))
        elif t == "Digits":
            sig.append(("digits", bool(step.get("individual_digits"))))
        elif t == "ByteLevel":
            if step.get("add_prefix_space"):
                return None
            sig.append(("bytelevel", bool(step.get("use_regex", True))))
        else:
            return None
    return tuple(sig)


def bpe_pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE tokenizer.json, from its pre_tokenizer."""
    sig = _pre_signature(tokenizer_json.get("pre_tokenizer"))
    for known, name in BPE_PRE_TOKENIZERS:
        if sig == known:
            return name
    desc = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if len(desc) > 300:
        desc = desc[:300] + "..."
    raise ModelError("BPE pre-tokenizer not recognized (kquant knows "
                     f"{', '.join(n for _, n in BPE_PRE_TOKENIZERS)}): {desc}")


def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


class _SpecialVocab:
    """gguf.vocab.SpecialVocab as shipped with llama.cpp's convert_hf_to_gguf.py (newer than the
    gguf 0.19.0 wheel: ByteLevel post-processors, normalizer flags, post-processor precedence)."""

    def __init__(self, path: Path, load_merges: bool = False, special_token_types: Iterable[str] | None = None,
                 n_vocab: int | None = None):
        self.special_token_ids: dict[str, int] = {}
        self.add_special_token: dict[str, bool] = {}
        self.n_vocab = n_vocab
        self.load_merges = load_merges
        self.merges: list[str] = []
        self.chat_template: Any = None
        self.normalizer_lowercase: bool | None = None
        self.normalizer_strip_accents: bool | None = None
        self.special_token_types = tuple(special_token_types) if special_token_types is not None else \
            ('bos', 'eos', 'unk', 'sep', 'pad', 'cls', 'mask')
        self._try_load_from_tokenizer_json(path)
        self._try_load_from_config_json(path)
        if self.load_merges and not self.merges:
            self._try_load_merges_txt(path)

    def add_to(self, w: gguf.GGUFWriter) -> None:
        if self.merges:
            w.add_token_merges(self.merges)
        for typ, tokid in self.special_token_ids.items():
            handler = getattr(w, f'add_{typ}_token_id', None)
            if handler is not None:
                handler(tokid)
        for typ, value in self.add_special_token.items():
            handler = getattr(w, f'add_add_{typ}_token', None)
            if handler is not None:
                handler(value)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)
        if self.normalizer_lowercase is not None:
            w.add_bool("tokenizer.ggml.normalizer.lowercase", self.normalizer_lowercase)
        if self.normalizer_strip_accents is not None:
            w.add_bool("tokenizer.ggml.normalizer.strip_accents", self.normalizer_strip_accents)

    def _try_load_merges_txt(self, path: Path) -> None:
        merges_file = path / 'merges.txt'
        if not merges_file.is_file():
            return
        with open(merges_file, 'r', encoding='utf-8') as fp:
            first_line = next(fp, '').strip()
            if not first_line.startswith('#'):
                fp.seek(0)
            merges = []
            for line in fp:
                parts = line.strip().split(None, 3)
                if len(parts) == 2:
                    merges.append(f'{parts[0]} {parts[1]}')
        self.merges = merges

    def _set_special_token(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise ModelError(f'invalid value for special token type {typ}: {tid}')
        if self.n_vocab is None or tid < self.n_vocab:
            if typ not in self.special_token_ids:
                self.special_token_ids[typ] = tid

    def _parse_normalizer(self, normalizer: dict) -> None:
        t = normalizer.get('type')
        if t == 'Lowercase':
            self.normalizer_lowercase = True
        elif t == 'StripAccents':
            self.normalizer_strip_accents = True
        elif t == 'BertNormalizer':
            if 'lowercase' in normalizer:
                self.normalizer_lowercase = normalizer['lowercase']
            if 'strip_accents' in normalizer:
                self.normalizer_strip_accents = normalizer['strip_accents']
        elif t == 'Sequence':
            for norm in normalizer.get('normalizers', []):
                self._parse_normalizer(norm)

    def _try_load_from_tokenizer_json(self, path: Path) -> None:  # noqa: C901 - a port
        tokenizer = None
        tokenizer_file = path / 'tokenizer.json'
        if tokenizer_file.is_file():
            tokenizer = _read_json(tokenizer_file, "tokenizer")
            if self.load_merges:
                merges = tokenizer.get('model', {}).get('merges')
                if isinstance(merges, list) and merges:
                    if isinstance(merges[0], str):
                        self.merges = merges
                    elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
                        self.merges = [' '.join(''.join(chr(ord(c) + 256) if c == ' ' else c for c in part)
                                                for part in pair) for pair in merges]
                    else:
                        raise ModelError(f"{tokenizer_file.name}: unknown tokenizer merges format")
            if normalizer := tokenizer.get('normalizer'):
                self._parse_normalizer(normalizer)
            added_tokens = tokenizer.get('added_tokens', {})
        else:
            added_tokens = {}
        tokenizer_config = None
        tokenizer_config_file = path / 'tokenizer_config.json'
        if tokenizer_config_file.is_file():
            tokenizer_config = _read_json(tokenizer_config_file, "tokenizer config")
        if tokenizer:
            special_bos = (tokenizer_config or {}).get('bos_token')
            special_cls = (tokenizer_config or {}).get('cls_token')
            special_eos = (tokenizer_config or {}).get('eos_token')
            special_sep = (tokenizer_config or {}).get('sep_token')
            if not special_bos and special_cls and tokenizer_config:
                tokenizer_config['bos_token'] = special_bos = special_cls
            if not special_eos and special_sep and tokenizer_config:
                tokenizer_config['eos_token'] = special_eos = special_sep
            if post_processor := tokenizer.get('post_processor'):
                for processor in post_processor.get('processors', [post_processor]):
                    processor_type = processor.get('type')
                    if processor_type == 'ByteLevel':
                        self.add_special_token.setdefault('bos', False)
                        self.add_special_token.setdefault('eos', False)
                    elif processor_type == 'RobertaProcessing':
                        self.add_special_token['bos'] = True
                        self.add_special_token['eos'] = True
                        self.add_special_token['sep'] = True
                        if not special_cls and tokenizer_config:
                            special_cls = processor.get('cls', [special_bos])[0]
                            tokenizer_config['cls_token'] = special_cls
                        if not special_sep and tokenizer_config:
                            special_sep = processor.get('sep', [special_eos])[0]
                            tokenizer_config['sep_token'] = special_sep
                        continue
                    elif processor_type == 'TemplateProcessing':
                        tmpl_single = processor.get('single', [])
                        tmpl_pair = processor.get('pair', [])
                        special_first = None
                        special_last = None
                        if len(tmpl_single) > 1:
                            if special_first := tmpl_single[0].get('SpecialToken', {}).get('id'):
                                if not tokenizer_config:
                                    special_bos = special_first
                                elif special_first not in (special_bos, special_cls):
                                    if not special_bos:
                                        tokenizer_config['bos_token'] = special_bos = special_first
                                    if not special_cls:
                                        tokenizer_config['cls_token'] = special_cls = special_first
                                self.add_special_token['bos'] = special_first in (special_bos, special_cls)
                            if special_last := tmpl_single[-1].get('SpecialToken', {}).get('id'):
                                if not tokenizer_config:
                                    special_eos = special_last
                                elif special_last != special_eos:
                                    if 'eot' not in self.special_token_types:
                                        self.special_token_types = tuple(self.special_token_types) + ('eot', )
                                        tokenizer_config['eot_token'] = special_eos
                                    elif 'eom' not in self.special_token_types:
                                        self.special_token_types = tuple(self.special_token_types) + ('eom', )
                                        tokenizer_config['eom_token'] = special_eos
                                    tokenizer_config['eos_token'] = special_eos = special_last
                                self.add_special_token['eos'] = special_last == special_eos
                        if tmpl_pair:
                            seq_start = 1 if special_first and tmpl_pair[0].get('SpecialToken', {}).get('id') == special_first else 0
                            seq_stop = -1 if special_last and tmpl_pair[-1].get('SpecialToken', {}).get('id') == special_last else None
                            if tmpl_pair := tmpl_pair[slice(seq_start, seq_stop)]:
                                tmpl_a = tmpl_pair[0].get('Sequence', {}).get('id')
                                tmpl_b = tmpl_pair[-1].get('Sequence', {}).get('id')
                                if tmpl_a == 'A' and tmpl_b == 'B' and (tmpl_pair := tmpl_pair[1:-1]):
                                    add_sep = False
                                    if special_entry := tmpl_pair[0].get('SpecialToken', {}).get('id'):
                                        if special_entry in (special_sep, special_eos) and not special_last:
                                            add_sep = True
                                    if len(tmpl_pair) == 2:
                                        if special_entry := tmpl_pair[1].get('SpecialToken', {}).get('id'):
                                            if special_entry in (special_sep, special_eos):
                                                add_sep = True
                                    self.add_special_token['sep'] = add_sep
                                    if add_sep and not special_sep and tokenizer_config:
                                        tokenizer_config['sep_token'] = special_eos
                        continue
        if not tokenizer_config:
            return
        chat_template_alt = None
        chat_template_json = path / 'chat_template.json'
        chat_template_jinja = path / 'chat_template.jinja'
        if chat_template_jinja.is_file():
            with open(chat_template_jinja, encoding='utf-8') as f:
                chat_template_alt = f.read()
            if additional := sorted((path / 'additional_chat_templates').glob('*.jinja')):
                chat_template_alt = [{'name': 'default', 'template': chat_template_alt}]
                for template_path in additional:
                    with open(template_path, encoding='utf-8') as fp:
                        chat_template_alt.append({'name': template_path.stem, 'template': fp.read()})
        elif chat_template_json.is_file():
            chat_template_alt = _read_json(chat_template_json, "chat template").get('chat_template')
        chat_template = tokenizer_config.get('chat_template', chat_template_alt)
        if chat_template is None or isinstance(chat_template, (str, list)):
            self.chat_template = chat_template
        for typ in self.special_token_types:
            add_entry = tokenizer_config.get(f'add_{typ}_token')
            if isinstance(add_entry, bool) and typ not in self.add_special_token:
                self.add_special_token[typ] = add_entry
            entry = tokenizer_config.get(f'{typ}_token')
            if isinstance(entry, str):
                tc_content = entry
            elif isinstance(entry, dict):
                tc_content = entry.get('content')
                if not isinstance(tc_content, str):
                    continue
            else:
                continue
            maybe_token_id = next((atok.get('id') for atok in added_tokens if atok.get('content') == tc_content), None)
            self._set_special_token(typ, maybe_token_id)

    def _try_load_from_config_json(self, path: Path) -> None:
        config_file = path / 'config.json'
        if not config_file.is_file():
            return
        config = _read_json(config_file, "config")
        for typ in self.special_token_types:
            token_id = config.get(f'{typ}_token_id')
            if token_id is None and 'text_config' in config:
                token_id = config['text_config'].get(f'{typ}_token_id')
            self._set_special_token(typ, token_id)


def _set_vocab_sentencepiece(w: gguf.GGUFWriter, folder: Path, hp: dict[str, Any]) -> None:
    """TextModel._set_vocab_sentencepiece / _create_vocab_sentencepiece."""
    from sentencepiece import SentencePieceProcessor

    tokenizer_path = folder / 'tokenizer.model'
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(tokenizer_path))
    except (OSError, RuntimeError) as e:
        raise ModelError(f"cannot load SentencePiece model {tokenizer_path}: {e}") from None
    vocab_size = _find(hp, ["vocab_size_per_layer_input", "vocab_size"]) or sp.vocab_size()

    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores: list[float] = [-10000.0] * vocab_size
    toktypes: list[int] = [_UNUSED] * vocab_size
    for token_id in range(sp.vocab_size()):
        if token_id >= vocab_size:
            break
        toktype = _NORMAL
        if sp.IsUnknown(token_id):
            toktype = _UNKNOWN
        elif sp.IsControl(token_id):
            toktype = _CONTROL
        elif sp.IsUnused(token_id):
            toktype = _UNUSED
        elif sp.IsByte(token_id):
            toktype = _BYTE
        tokens[token_id] = sp.IdToPiece(token_id).encode("utf-8")
        scores[token_id] = sp.GetScore(token_id)
        toktypes[token_id] = toktype

    added_tokens_file = folder / 'added_tokens.json'
    if added_tokens_file.is_file():
        for key, token_id in _read_json(added_tokens_file, "added tokens").items():
            if token_id >= vocab_size:
                continue
            tokens[token_id] = key.encode("utf-8")
            scores[token_id] = -1000.0
            toktypes[token_id] = _USER_DEFINED

    tokenizer_config_file = folder / 'tokenizer_config.json'
    if tokenizer_config_file.is_file():
        tc = _read_json(tokenizer_config_file, "tokenizer config")
        for token_id, token_data in tc.get("added_tokens_decoder", {}).items():
            token_id = int(token_id)
            token: str = token_data["content"]
            if token_id >= vocab_size:
                continue
            if token_data.get("special") or _looks_special(token):
                toktypes[token_id] = _CONTROL
            else:
                token = token.replace("\u2581", " ")
                toktypes[token_id] = _USER_DEFINED
            scores[token_id] = -1000.0
            tokens[token_id] = token.encode("utf-8")

    if vocab_size > len(tokens):  # pragma: no cover - as the converter (cannot happen)
        for i in range(1, vocab_size - len(tokens) + 1):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            toktypes.append(_UNUSED)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([t.decode("utf-8") for t in tokens])
    w.add_token_scores(scores)
    w.add_token_types(toktypes)
    _SpecialVocab(folder, n_vocab=len(tokens)).add_to(w)


def _set_vocab_gpt2(w: gguf.GGUFWriter, folder: Path, hp: dict[str, Any]) -> None:
    """TextModel._set_vocab_gpt2 / get_vocab_base, read from tokenizer.json without transformers."""
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise ModelError(f"{folder}: no tokenizer (neither tokenizer.model nor tokenizer.json)")
    tj = _read_json(tj_path, "tokenizer")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelError(f"{tj_path.name}: a {model.get('type')} tokenizer without tokenizer.model; "
                         "kquant converts byte-level BPE tokenizer.json or SentencePiece tokenizer.model")
    tokpre = bpe_pre_tokenizer_name(tj)

    vocab: dict[str, int] = dict(model["vocab"])
    added: dict[int, dict[str, Any]] = {}
    for atok in tj.get("added_tokens") or []:
        added[int(atok["id"])] = atok
    tc_path = folder / "tokenizer_config.json"
    tc = _read_json(tc_path, "tokenizer config") if tc_path.is_file() else {}
    for tid, atok in (tc.get("added_tokens_decoder") or {}).items():
        added.setdefault(int(tid), atok)
    for tid, atok in added.items():
        vocab[atok["content"]] = tid
    added_vocab = {atok["content"]: tid for tid, atok in added.items()}

    vocab_size = hp.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise ModelError(f"tokenizer has token id {max(vocab.values())} but config.json's vocab_size is {vocab_size}")
    reverse_vocab = {id_: tok for tok, id_ in vocab.items()}
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(vocab_size):
        if i not in reverse_vocab:
            tokens.append(f"[PAD{i}]")
            toktypes.append(_UNUSED)
            continue
        token = reverse_vocab[i]
        if token in added_vocab:
            atok = added.get(i) or added[added_vocab[token]]
            if atok.get("special") or _looks_special(token):
                toktypes.append(_CONTROL)
            else:
                token = token.replace("\u2581", " ")
                toktypes.append(_USER_DEFINED)
        else:
            toktypes.append(_NORMAL)
        tokens.append(token)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokpre)
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    _SpecialVocab(folder, load_merges=True).add_to(w)


def _set_vocab(w: gguf.GGUFWriter, arch: MODEL_ARCH, folder: Path, hp: dict[str, Any]) -> None:
    if arch == MODEL_ARCH.LLAMA:
        tc_path = folder / "tokenizer_config.json"
        if (folder / "tekken.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise ModelError(f"{folder}: Mistral tekken.json tokenizers are not supported")
        if tc_path.is_file():
            tc = _read_json(tc_path, "tokenizer config")
            if (add_prefix_space := tc.get("add_prefix_space")) is not None:
                w.add_add_space_prefix(add_prefix_space)
            if tc.get("tokenizer_class") == "HybridDNATokenizer":
                raise ModelError(f"{folder}: HybridDNATokenizer is not supported")
        if (folder / "tokenizer.model").is_file():
            _set_vocab_sentencepiece(w, folder, hp)
        else:
            tj_path = folder / "tokenizer.json"
            if tj_path.is_file():
                tj = _read_json(tj_path, "tokenizer")
                m = tj.get("model") or {}
                is_llama3 = m.get("type") == "BPE" and m.get("ignore_merges", False) and not m.get("byte_fallback", True)
                if not is_llama3 and m.get("type") == "BPE" and m.get("byte_fallback", False) \
                        and (tj.get("decoder") or {}).get("type") == "Sequence":
                    raise ModelError(f"{folder}: a byte-fallback BPE tokenizer.json without tokenizer.model "
                                     "(llama.cpp's LlamaHfVocab) is not supported; add the tokenizer.model")
            _set_vocab_gpt2(w, folder, hp)
        vocab_size = hp.get("vocab_size", 32000)
        if vocab_size == 32016:  # CodeLlama
            sv = _SpecialVocab(folder, load_merges=False, special_token_types=['prefix', 'suffix', 'middle', 'eot'])
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                sv._set_special_token(typ, tid)
            sv.add_to(w)
        if vocab_size == 49152:  # granite small models / SmolLM
            w.add_add_bos_token(False)
    else:  # qwen2, qwen3
        if (folder / "tokenizer.model").is_file():
            _set_vocab_sentencepiece(w, folder, hp)
        else:
            _set_vocab_gpt2(w, folder, hp)


# ---------------------------------------------------------------------------------------------
# hyper-parameters
# ---------------------------------------------------------------------------------------------

def _set_params(w: gguf.GGUFWriter, arch: MODEL_ARCH, folder: Path, hp: dict[str, Any], block_count: int,
                rope: dict[str, Any], ftype: LlamaFileType) -> None:
    """TextModel.set_gguf_parameters (+ LlamaModel / Qwen2Model)."""
    w.add_block_count(block_count)
    if (n_ctx := _find(hp, ["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                            "max_sequence_length", "model_max_length"])) is not None:
        w.add_context_length(n_ctx)
    if (n_embd := _find(hp, ["hidden_size", "n_embd", "dim"])) is not None:
        w.add_embedding_length(n_embd)
    if (n_ff := _find(hp, ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                           "n_inner", "hidden_dim"])) is not None:
        w.add_feed_forward_length(n_ff)
    if (n_head := _find(hp, ["num_attention_heads", "n_head", "n_heads"])) is not None:
        w.add_head_count(n_head)
    if (n_head_kv := _find(hp, ["num_key_value_heads", "n_kv_heads"])) is not None:
        w.add_head_count_kv(n_head_kv)
    if hp.get("is_causal") is False:
        w.add_causal_attention(False)

    rope_params = rope.get("full_attention", rope)
    if (rope_type := rope_params.get("rope_type")) is not None:
        factor = rope_params.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            if rope_params.get("original_max_position_embeddings") is None:
                raise ModelError("yarn rope scaling without original_max_position_embeddings")
            w.add_rope_scaling_orig_ctx_len(rope_params["original_max_position_embeddings"])
            if (v := rope_params.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(v)
            if (v := rope_params.get("attention_factor", rope_params.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(v)
            if (v := rope_params.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(v)
            if (v := rope_params.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(v)
        elif rope_type in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if "mrope_section" in rope:
        raise ModelError("mrope (multimodal rope) is not supported")
    if (rope_theta := rope_params.get("rope_theta")) is not None:
        w.add_rope_freq_base(rope_theta)
    if (local_theta := (rope.get("sliding_attention") or {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local_theta)
    if (eps := _find(hp, ["rms_norm_eps", "norm_eps"])) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _find(hp, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        w.add_layer_norm_eps(eps)
    if _find(hp, ["num_local_experts", "num_experts", "n_routed_experts"]) is not None:
        raise ModelError("mixture-of-experts models are not supported")
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)

    if arch == MODEL_ARCH.LLAMA:
        w.add_vocab_size(hp["vocab_size"])
        rope_dim = hp.get("head_dim")
        if rope_dim is None:
            rope_dim = hp["hidden_size"] // hp["num_attention_heads"]
        w.add_rope_dimension_count(rope_dim)
    else:
        _try_set_pooling_type(w, folder, hp)


def _try_set_pooling_type(w: gguf.GGUFWriter, folder: Path, hp: dict[str, Any]) -> None:
    pooling_path = None
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        for mod in _read_json(modules_file, "sentence-transformers modules"):
            if mod["type"].endswith("Pooling"):
                pooling_path = mod["path"]
                break
    mode_mapping = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
    if pooling_path is not None:
        pooling = _read_json(folder / pooling_path / "config.json", "pooling config")
        if pooling.get("pooling_mode_mean_tokens"):
            pooling_type = gguf.PoolingType.MEAN
        elif pooling.get("pooling_mode_cls_token"):
            pooling_type = gguf.PoolingType.CLS
        elif pooling.get("pooling_mode_lasttoken"):
            pooling_type = gguf.PoolingType.LAST
        elif (mode := pooling.get("pooling_mode")) in mode_mapping:
            pooling_type = mode_mapping[mode]
        else:
            raise ModelError("only MEAN, CLS and LAST pooling types are supported")
        w.add_pooling_type(pooling_type)
    if (classifier_pooling := hp.get("classifier_pooling")) is not None:
        if classifier_pooling not in ("cls", "mean"):
            raise ModelError(f"unsupported classifier_pooling: {classifier_pooling}")
        w.add_classifier_pooling_type(mode_mapping[classifier_pooling])


def _general_metadata(w: gguf.GGUFWriter, folder: Path, total_params: int) -> None:
    """ModelBase.prepare_metadata: general.type and the authorship / sampling keys."""
    meta = gguf.Metadata.load(None, folder, None, total_params)
    gen_config_file = folder / "generation_config.json"
    if gen_config_file.is_file():  # llama.cpp's Metadata also reads repetition_penalty
        try:
            with open(gen_config_file, encoding="utf-8") as f:
                gen = json.load(f)
        except (json.JSONDecodeError, OSError):
            gen = {}
        if isinstance(gen, dict) and "penalty_repeat" not in gen and "repetition_penalty" in gen:
            meta.sampling_penalty_repeat = gen["repetition_penalty"]
    if meta.name is None:
        meta.name = folder.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

def _kv_list(w: gguf.GGUFWriter) -> list[KV]:
    out = []
    for key, v in w.kv_data[0].items():
        value, sub = v.value, v.sub_type
        if v.type == GGUFValueType.ARRAY:
            if sub is None:
                sub = GGUFValueType.get_type(value[0])
            value = [x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else x for x in value]
        elif isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8")
        out.append(KV(key, value, v.type, sub))
    return out


def load_hf_model(folder: str | Path, outtype: str = "f16") -> ModelSource:
    """Read a Hugging Face model folder as convert_hf_to_gguf.py --outtype OUTTYPE would write it.

    `outtype` is one of f32, f16, bf16 or q8_0 (gguf.quants' Q8_0, as the converter does); all
    four are checked against llama.cpp's converter in tests/test_hf.py. The converter's "auto"
    is `guess_outtype(folder)`."""
    folder = Path(folder)
    if outtype not in OUTTYPES:
        raise ModelError(f"unknown outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    ftype = OUTTYPES[outtype]
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = _read_json(config_file, "config")
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} is not a JSON object")
    for key in ("llm_config", "lm_config", "thinker_config", "language_config", "lfm", "text_config"):
        if key in config:
            raise ModelError(f"{config_file}: multimodal / nested configs ({key}) are not supported")
    arches = config.get("architectures") or []
    hf_arch = arches[0] if arches else None
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"architecture {hf_arch!r} is not supported (kquant converts "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    arch, undo_permute = SUPPORTED_ARCHITECTURES[hf_arch]
    hp = _hparams(config)

    if "draft_vocab_size" in hp and hp.get("num_hidden_layers") == 1:
        raise ModelError("EAGLE-3 draft models are not supported")
    if arch == MODEL_ARCH.QWEN3:
        readme = folder / "README.md"
        text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
        hints = [folder.name, str(hp.get("_name_or_path", "")), str(hp.get("model_type", "")), hf_arch]
        if "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text or \
                any("qwen3-reranker" in h.lower() or "qwen3-vl-reranker" in h.lower() for h in hints):
            raise ModelError("Qwen3 reranker models are not supported")
    if (hp.get("quantization_config") or {}).get("quant_method") or (folder / "hf_quant_config.json").is_file():
        raise ModelError("quantized checkpoints (quantization_config) are not supported")

    block_count = _find(hp, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
    if not isinstance(block_count, int):
        raise ModelError(f"{config_file}: no num_hidden_layers")
    for key in ("hidden_size", "num_attention_heads", "vocab_size"):
        if not isinstance(hp.get(key), int):
            raise ModelError(f"{config_file}: no {key}")
    tensor_map = gguf.get_tensor_name_map(arch, block_count)
    rope = hp["rope_parameters"]
    n_head = _find(hp, ["n_heads", "num_attention_heads"])
    n_kv_head = _find(hp, ["n_kv_heads", "num_key_value_heads"])

    tensors: list[SourceTensor] = []

    def add(new_name: str, np_shape: tuple[int, ...], raw: Callable[[], np.ndarray],
            permute: tuple[int, int | None] | None, bid: int | None, st: _StTensor | None = None) -> None:
        qtype = _pick_qtype(arch, new_name, bid, len(np_shape), ftype)
        if qtype == GGMLQuantizationType.Q8_0 and np_shape[-1] % 32 != 0:
            qtype = GGMLQuantizationType.F16
        tensors.append(SourceTensor(new_name, tuple(reversed(np_shape)), qtype, _make_load(raw, permute, qtype, st)))

    # generate_extra_tensors: llama3 rope factors come first
    if arch == MODEL_ARCH.LLAMA:
        rp = rope.get("full_attention", rope)
        if rp and str(rp.get("rope_type", "")).lower() == "llama3":
            factors = _llama3_rope_factors(rp, hp)
            add(gguf.TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, lambda f=factors: f, None, None)

    seen: set[str] = set()
    for name, st in _index_tensors(folder).items():
        if name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if "language_model." in name:
            name = name.replace("language_model.", "")
        if name.startswith(_SKIP_PREFIXES) or any(p in name for p in _SKIP_PARTS):
            continue
        if arch == MODEL_ARCH.LLAMA and "text_model." in name:
            name = name.replace("text_model.", "")
        if name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
            continue
        if name.endswith((".weight_scale", ".weight_scale_inv", ".qweight", ".scales", ".qzeros", ".g_idx")):
            raise ModelError(f"tensor {name!r}: quantized checkpoints are not supported")
        bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
        permute = None
        if undo_permute:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                permute = (n_head, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                permute = (n_head, n_kv_head)
        if "block_sparse_moe.experts" in name:
            raise ModelError("mixture-of-experts models are not supported")
        new_name = tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelError(f"tensor {name!r} ({st.path.name}) has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
        if new_name in seen:
            raise ModelError(f"tensor {name!r} maps to {new_name!r} a second time")
        seen.add(new_name)
        if permute is not None:
            heads = permute[1] if permute[1] is not None and permute[1] != permute[0] else permute[0]
            if not st.shape or st.shape[0] % (2 * heads):
                raise ModelError(f"tensor {name!r} of shape {list(st.shape)} does not split into rope heads")
        add(new_name, st.shape, st.load, permute, bid, st)

    total_params = sum(t.n_elements for t in tensors)
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    # a key set twice keeps its first place and takes the last value, as in the converter
    # (e.g. add_bos_token for 49152-token vocabularies); gguf logs a warning for it: not here
    log = logging.getLogger("gguf.gguf_writer")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        _general_metadata(w, folder, total_params)
        _set_params(w, arch, folder, hp, block_count, rope, ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _set_vocab(w, arch, folder, hp)
    finally:
        log.setLevel(level)
    return ModelSource(arch=gguf.MODEL_ARCH_NAMES[arch], kv=_kv_list(w), tensors=tensors, path=str(folder))


def guess_outtype(folder: str | Path) -> str:
    """convert_hf_to_gguf.py's --outtype auto: bf16 or f16 after the first 2-D (or more) tensor's
    dtype, f16 otherwise."""
    for st in _index_tensors(Path(folder)).values():
        if len(st.shape) < 2:
            continue
        if st.dtype == "BF16":
            return "bf16"
        if st.dtype == "F16":
            return "f16"
    return "f16"


def default_outfile_name(source: ModelSource) -> str:
    """The file name convert_hf_to_gguf.py picks when --outfile is not given (it puts the file
    in the model folder): NAME[-SIZE][-FINETUNE][-VERSION]-OUTTYPE.gguf."""
    ftype = LlamaFileType(source.get("general.file_type", LlamaFileType.MOSTLY_F16))
    output_type = ftype.name.partition("_")[2]
    return gguf.naming_convention(source.get("general.name"), source.get("general.basename"),
                                  source.get("general.finetune"), source.get("general.version"),
                                  source.get("general.size_label"), output_type) + ".gguf"
