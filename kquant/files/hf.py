"""A Hugging Face model folder as a `ModelSource`: what llama.cpp's convert_hf_to_gguf.py writes.

`load_hf_model(folder, outtype)` reads config.json, the tokenizer files and the safetensors
headers of a folder of any class in kquant.archs (LlamaForCausalLM, MistralForCausalLM,
MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM,
Phi3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration's text
model) and returns the metadata pairs and tensors that
`convert_hf_to_gguf.py --outtype OUTTYPE` would write, in the same order, with the same value
types and the same tensor bytes.  Nothing is loaded at construction: each tensor's `load()`
memory-maps only its own bytes.

What lives where:

* here, the steps every architecture shares: config.json -> hyper-parameters (transformers'
  defaults filled in as AutoConfig(...).to_dict() gives them to the converter), general.*
  metadata (gguf's `Metadata.load`: model card, config.json, generation_config.json; the name
  falls back to the folder's name, the size label comes from the parameter count), the generic
  hyper-parameter keys, and the tensors: names through gguf's tensor name map, Q and K rows
  permuted back to the GGML rope layout where the architecture asks for it, per-expert tensors
  stacked into one 3-D tensor per kind (the architecture's `hf_experts`), 1-D tensors, norms
  and biases in F32, the rest in the outtype; f16 is numpy's float32 -> float16 cast (round to
  nearest even), bf16 is gguf.quants' BF16 rounding, q8_0 is gguf.quants' Q8_0 (rows whose
  length is not a multiple of 32 fall back to F16 as in the converter);
* kquant.archs.<arch>: each architecture's own rules (its classes, config defaults, extra
  metadata and tensors, vocabulary quirks);
* kquant.files.safetensors: the safetensors headers and index; kquant.files.hf_vocab: the
  tokenizer (SentencePiece or byte-level BPE, special tokens, chat template).

Everything kquant cannot use raises `ModelError` with one message for the user.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import gguf
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType, MODEL_ARCH, MODEL_TENSOR

from ..archs import Arch, arch_for_hf_class, arch_for_model_type, check_tensors, hf_classes
from ..archs.base import tensor_name
from ..errors import ModelError
from .safetensors import StTensor, index_tensors, read_json
from .source import KV, ModelSource, SourceTensor

__all__ = ["load_hf_model", "default_outfile_name", "OUTTYPES", "guess_outtype"]


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

def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as AutoConfig(...).to_dict() returns it (transformers 5.x) for the model types
    of kquant.archs; any other model_type is used as it is (the converter's own fallback)."""
    model_type = config.get("model_type")
    arch = arch_for_model_type(model_type)
    if arch is None:
        return dict(config)
    if arch.hparams is not None:
        return arch.hparams(config)
    hp = dict(arch.config_defaults[model_type])
    hp.update(config)
    if model_type in arch.head_dim_from_heads and hp.get("head_dim") is None:
        hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
    if hp.get("num_key_value_heads") is None:
        hp["num_key_value_heads"] = hp["num_attention_heads"]
    # rope: rope_scaling / rope_theta move into rope_parameters
    rope = hp.pop("rope_scaling", None) or hp.get("rope_parameters") or {}
    rope = dict(rope) if isinstance(rope, dict) else {}
    theta = hp.pop("rope_theta", arch.default_rope_theta)
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
# tensors
# ---------------------------------------------------------------------------------------------

_SKIP_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                  "sound_projection.", "speech_embeddings.")
_SKIP_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
               "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
               "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")

# where the blocks' tensors of the architectures kquant converts are (model.layers.N.*)
_BLOCK_PREFIXES = ("model.layers.", "layers.")

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
    """`key`'s name in block `bid` (None: outside the blocks), if `arch` has such a tensor."""
    if key not in gguf.MODEL_TENSORS[arch] or ("{bid}" in gguf.TENSOR_NAMES[key]) != (bid is not None):
        return None
    return tensor_name(key, bid)


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


def _make_load(raw: Callable[[], np.ndarray], permute: tuple[int, int | None] | None,
               qtype: GGMLQuantizationType, st: StTensor | None = None) -> Callable[[], np.ndarray]:
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
# hyper-parameters
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------

def _set_params(w: gguf.GGUFWriter, arch: Arch, folder: Path, hp: dict[str, Any], block_count: int,
                rope: dict[str, Any], ftype: LlamaFileType) -> None:
    """TextModel.set_gguf_parameters, then the architecture's own additions (or the
    architecture's own set_gguf_parameters instead, where it replaces TextModel's)."""
    if arch.own_params is not None:
        arch.own_params(w, hp, block_count, ftype)
        return
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
    _set_expert_params(w, hp)
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)
    arch.set_params(w, folder, hp)


# the converter's score functions that this gguf package has a value for
_GATING_FUNCS = {name.lower(): getattr(gguf.ExpertGatingFuncType, name)
                 for name in ("SIGMOID", "SOFTMAX", "SQRTSOFTPLUS") if hasattr(gguf.ExpertGatingFuncType, name)}


def _set_expert_params(w: gguf.GGUFWriter, hp: dict[str, Any]) -> None:
    """TextModel.set_gguf_parameters' expert keys (what a checkpoint without experts lacks)."""
    if (n_experts := _find(hp, ["num_local_experts", "num_experts", "n_routed_experts"])) is not None:
        w.add_expert_count(n_experts)
    if (n_used := _find(hp, ["num_experts_per_tok", "num_experts_per_token", "top_k_experts"])) is not None:
        w.add_expert_used_count(n_used)
    if (n_groups := hp.get("n_group")) is not None:
        w.add_expert_group_count(n_groups)
    if (n_group_used := hp.get("topk_group")) is not None:
        w.add_expert_group_used_count(n_group_used)
    if (score_func := _find(hp, ["score_function", "scoring_func", "score_func", "moe_router_activation",
                                 "moe_router_activation_func", "expert_selection_fn"])) is not None:
        if score_func not in _GATING_FUNCS:
            raise ModelError(f"unsupported expert score gating function {score_func!r}")
        w.add_expert_gating_func(_GATING_FUNCS[score_func])


def _parameter_counts(tensors: list[SourceTensor]) -> tuple[int, int, int, int]:
    """GGUFWriter.get_total_parameter_count: (total, shared, per-expert, expert count), the
    experts being the 3-D "_exps." tensors."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        size = t.n_elements
        if "_exps." in t.name and len(t.shape) >= 3:
            count = t.shape[1 if ".bias" in t.name else 2]  # numpy's shape[-2 / -3], in ggml order
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0


def _general_metadata(w: gguf.GGUFWriter, folder: Path, counts: tuple[int, int, int, int]) -> None:
    """ModelBase.prepare_metadata: general.type and the authorship / sampling keys; `counts`
    are _parameter_counts' (the size label of a model with experts counts one of them)."""
    total_params = counts[0]
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
        meta.size_label = gguf.size_label(*counts)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

def _check_utf8(folder: Path, key: str, text: str) -> None:
    """JSON (and the model card's YAML) can spell lone surrogates ("\\ud800"), which no UTF-8
    text holds: the converter fails on them with a traceback, and kquant's GGUF writer would
    write "\\udc80".."\\udcff" as stray bytes. One error naming the key instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        raise ModelError(f"{folder}: {key} is not valid UTF-8 text: it holds the lone surrogate "
                         f"U+{code:04X} (written \\u{code:04x} in the folder's JSON or model card)") from None


def _kv_list(folder: Path, w: gguf.GGUFWriter) -> list[KV]:
    out = []
    for key, v in w.kv_data[0].items():
        value, sub = v.value, v.sub_type
        if v.type == GGUFValueType.ARRAY:
            if sub is None:
                sub = GGUFValueType.get_type(value[0])
            value = [x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else x for x in value]
            for x in value:
                if isinstance(x, str):
                    _check_utf8(folder, key, x)
        elif isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8")
        if isinstance(value, str):
            _check_utf8(folder, key, value)
        out.append(KV(key, value, v.type, sub))
    return out


def _read_config(folder: Path) -> dict[str, Any]:
    """config.json, refused when it is not one kquant converts as a whole (nested configs)."""
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = read_json(config_file, "config")
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} is not a JSON object")
    return config


def _text_config(config_file: Path, config: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """The part of config.json holding the text model's sizes: config.json itself, or the
    text_config of a multimodal class whose architecture reads it (gemma3); other nested
    configs refused."""
    for key in ("llm_config", "lm_config", "thinker_config", "language_config", "lfm", "text_config"):
        if key in config and not (key == "text_config" and arch.text_config is not None):
            raise ModelError(f"{config_file}: multimodal / nested configs ({key}) are not supported")
    text = arch.text_config(config) if arch.text_config is not None else config
    if not isinstance(text, dict):
        raise ModelError(f"{config_file}: text_config is not a JSON object")
    return text


def _refuse_unsupported(folder: Path, arch: Arch, hp: dict[str, Any], hf_class: str) -> None:
    """The checkpoints the converter handles (or refuses) in ways kquant does not follow."""
    if "draft_vocab_size" in hp and hp.get("num_hidden_layers") == 1:
        raise ModelError("EAGLE-3 draft models are not supported")
    arch.check(folder, hp, hf_class)
    if (hp.get("quantization_config") or {}).get("quant_method") or (folder / "hf_quant_config.json").is_file():
        raise ModelError("quantized checkpoints (quantization_config) are not supported")


# The sizes config.json must state: transformers would fill a missing one in with Llama-7B's
# (hidden_size 4096, ...) and the converter write a file none of the folder's tensors fit.
_REQUIRED_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                   "vocab_size")
# sizes that may be absent (or null: transformers' default), but are positive integers if given
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, str, type(None))) else repr(value)


def _check_size(config_file: Path, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int to Python
        raise ModelError(f"{config_file}: {key} is {_shown(value)}, not an integer")
    if value < 1:
        raise ModelError(f"{config_file}: {key} is {value}; it must be at least 1")


def _check_positive(config_file: Path, key: str, value: Any) -> None:
    """A float hyper-parameter (an epsilon, rope's base): a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"{config_file}: {key} is {_shown(value)}, not a number")
    if not math.isfinite(value) or value <= 0:
        raise ModelError(f"{config_file}: {key} is {value}; it must be a finite number > 0")


def _check_config(config_file: Path, config: dict[str, Any], required: tuple[str, ...] = _REQUIRED_SIZES) -> None:
    """The sizes and numbers of config.json the converted model is made of, before transformers'
    defaults could stand in for them: ModelError naming the key otherwise."""
    for key in required:
        if config.get(key) is None:
            raise ModelError(f"{config_file}: no {key}")
    for key in _REQUIRED_SIZES + _OPTIONAL_SIZES:
        if config.get(key) is not None:
            _check_size(config_file, key, config[key])
    n_head, n_head_kv = config["num_attention_heads"], config.get("num_key_value_heads")
    if n_head_kv is not None and n_head % n_head_kv:
        raise ModelError(f"{config_file}: num_attention_heads {n_head} is not a multiple of "
                         f"num_key_value_heads {n_head_kv}")
    for key in ("rms_norm_eps", "rope_theta"):
        if config.get(key) is not None:
            _check_positive(config_file, key, config[key])


def _check_rope(config_file: Path, rope: dict[str, Any]) -> None:
    """rope_theta where transformers 5 keeps it (rope_parameters, maybe per attention type)."""
    for params in (rope, *(v for v in rope.values() if isinstance(v, dict))):
        if params.get("rope_theta") is not None:
            _check_positive(config_file, "rope_theta", params["rope_theta"])


# rope_scaling types convert_hf_to_gguf.py writes into the GGUF (TextModel.set_gguf_parameters),
# or as tensors (llama3: LlamaModel's rope_freqs); it drops any other with a warning, and
# llama.cpp then runs the model without it
_ROPE_WRITTEN = {"default": (), "linear": (), "yarn": (), "su": (), "longrope": (), "llama3": ("llama",)}


def _dropped_rope(arch: Arch, rope: dict[str, Any]) -> str:
    """Why the converted model would run with a rope other than the checkpoint's: a
    rope_scaling type the converter drops ("" when it keeps it)."""
    params = rope.get("full_attention", rope)
    rope_type = params.get("rope_type")
    if not isinstance(rope_type, str):
        return ""
    archs = _ROPE_WRITTEN.get(rope_type if rope_type in _ROPE_WRITTEN else rope_type.lower())
    if archs is None or (archs and arch.name not in archs):
        return (f"config.json's rope_scaling type {rope_type!r} is dropped by convert_hf_to_gguf.py for "
                f"{arch.name} models (llama.cpp then runs them without it), and kquant's runtime does "
                "not implement it")
    return ""


def _block_count(config_file: Path, hp: dict[str, Any]) -> int:
    """The converter's block count (its first of these keys; num_hidden_layers checked)."""
    block_count = _find(hp, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
    _check_size(config_file, "num_hidden_layers", block_count)
    return block_count


def _hf_tensor_name(name: str, arch: Arch) -> str | None:
    """The HF tensor name the converter maps (ModelBase.filter_tensors / modify_tensors), or None
    for tensors it drops."""
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    if "language_model." in name:
        name = name.replace("language_model.", "")
    if name in arch.hf_skip:
        return None
    if name.startswith(_SKIP_PREFIXES) or any(p in name for p in _SKIP_PARTS):
        return None
    for part in arch.hf_name_drop:
        if part in name:
            name = name.replace(part, "")
    if name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
        return None
    if name.endswith((".weight_scale", ".weight_scale_inv", ".qweight", ".scales", ".qzeros", ".g_idx")):
        raise ModelError(f"tensor {name!r}: quantized checkpoints are not supported")
    return name


def _qk_permutation(name: str, st: StTensor, arch: Arch, hp: dict[str, Any]) -> tuple[int, int | None] | None:
    """(n_head, n_head_kv) for the Q/K rows the architecture permutes, None for other tensors."""
    if not arch.permute_qk:
        return None
    n_head = _find(hp, ["n_heads", "num_attention_heads"])
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        permute = (n_head, n_head)
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        permute = (n_head, _find(hp, ["n_kv_heads", "num_key_value_heads"]))
    else:
        return None
    heads = permute[1] if permute[1] is not None and permute[1] != permute[0] else permute[0]
    if not st.shape or st.shape[0] % (2 * heads):
        raise ModelError(f"tensor {name!r} of shape {list(st.shape)} does not split into rope heads")
    return permute


def _shifted(load: Callable[[], np.ndarray], shift: float) -> Callable[[], np.ndarray]:
    """load() + shift in the tensor's dtype (float16 stays float16, as torch adds)."""
    def shifted() -> np.ndarray:
        data = load()
        return data + data.dtype.type(shift)
    return shifted


def _tensors(folder: Path, arch: Arch, hp: dict[str, Any], block_count: int,
             ftype: LlamaFileType) -> list[SourceTensor]:
    """The tensors the converter writes, in its order: the generated ones, then the folder's."""
    tensor_map = arch.tensor_map(block_count)
    tensors: list[SourceTensor] = []

    def add(new_name: str, np_shape: tuple[int, ...], raw: Callable[[], np.ndarray],
            permute: tuple[int, int | None] | None, bid: int | None, st: StTensor | None = None) -> None:
        qtype = _pick_qtype(arch.model_arch, new_name, bid, len(np_shape), ftype)
        if qtype == GGMLQuantizationType.Q8_0 and np_shape[-1] % 32 != 0:
            qtype = GGMLQuantizationType.F16
        tensors.append(SourceTensor(new_name, tuple(reversed(np_shape)), qtype, _make_load(raw, permute, qtype, st)))

    seen: set[str] = set()

    def add_mapped(name: str, np_shape: tuple[int, ...], raw: Callable[[], np.ndarray],
                   permute: tuple[int, int | None] | None, bid: int | None, st: StTensor | None = None) -> None:
        new_name = tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        where = f" ({st.path.name})" if st is not None else ""
        if new_name is None:
            raise ModelError(f"tensor {name!r}{where} has no GGUF name for {arch.name}")
        if new_name in seen:
            raise ModelError(f"tensor {name!r} maps to {new_name!r} a second time")
        seen.add(new_name)
        add(new_name, np_shape, raw, permute, bid, st)

    for key, data in arch.extra_tensors(hp):
        add(tensor_name(key), data.shape, lambda d=data: d, None, None)
    stacker = _ExpertStacker(arch, hp, block_count)
    for hf_name, st in index_tensors(folder).items():
        name = _hf_tensor_name(hf_name, arch)
        if name is None:
            continue
        bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
        if bid is not None and bid >= block_count and name.startswith(_BLOCK_PREFIXES):
            raise ModelError(f"tensor {name!r} ({st.path.name}) is of block {bid}, but config.json's "
                             f"num_hidden_layers is {block_count}")
        if arch.hf_experts is not None and arch.hf_experts.marker in name:
            for merged, shape, load in stacker.add(name, bid, st):
                add_mapped(merged, shape, load, None, bid)
            continue
        if "block_sparse_moe.experts" in name or ".mlp.experts." in name:
            raise ModelError(f"tensor {name!r}: mixture-of-experts {arch.name} models are not supported")
        permute = _qk_permutation(name, st, arch, hp)
        n_vocab = hp.get("vocab_size")
        if arch.trim_embd_to_vocab and "embed_tokens.weight" in name and st.shape and n_vocab \
                and st.shape[0] > n_vocab:  # the class's modify_tensors: data_torch[:n_vocab_real]
            add_mapped(name, (n_vocab, *st.shape[1:]), lambda st=st, n=n_vocab: st.load()[:n], permute, bid)
        elif arch.norm_shift and name.endswith("norm.weight"):  # the class's modify_tensors
            add_mapped(name, st.shape, _shifted(st.load, arch.norm_shift), permute, bid)
        else:
            add_mapped(name, st.shape, st.load, permute, bid, st)
    stacker.finish()
    return tensors


class _ExpertStacker:
    """The converter's _experts buffer: a block's per-expert tensors held until all
    n_expert * kinds of them are seen, then one stacked tensor per kind (in the kinds' order),
    each loading its experts only when written."""

    def __init__(self, arch: Arch, hp: dict[str, Any], block_count: int):
        self.rule = arch.hf_experts
        self.n_expert = _find(hp, self.rule.count_keys) if self.rule is not None else None
        self.blocks: list[dict[str, StTensor]] = [{} for _ in range(block_count)]
        if self.rule is not None:
            kinds = "|".join(re.escape(k) for k in self.rule.kinds)
            self._pattern = re.compile(re.escape(self.rule.per_expert).replace(r"\{bid\}", r"\d+")
                                       .replace(r"\{xid\}", r"\d+").replace(r"\{kind\}", f"(?:{kinds})"))

    def add(self, name: str, bid: int | None, st: StTensor) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
        rule = self.rule
        if bid is None or not isinstance(self.n_expert, int) or self.n_expert < 1:
            raise ModelError(f"tensor {name!r}: an expert tensor outside the blocks, or no expert count "
                             f"({' / '.join(rule.count_keys)}) in config.json")
        if not self._pattern.fullmatch(name):
            # e.g. transformers 5's fused mlp.experts.gate_up_proj [n_expert, 2 * n_ff, n_embd]
            raise ModelError(f"tensor {name!r}: expert tensors are converted in the per-expert layout "
                             f"({rule.per_expert.format(bid='N', xid='X', kind='|'.join(rule.kinds))}); "
                             "fused or stacked expert tensors are not supported")
        held = self.blocks[bid]
        held[name] = st
        if len(held) < self.n_expert * len(rule.kinds):
            return []
        out = []
        for kind in rule.kinds:
            names = [rule.per_expert.format(bid=bid, xid=x, kind=kind) for x in range(self.n_expert)]
            missing = [n for n in names if n not in held]
            if missing:
                raise ModelError(f"block {bid}: expert tensor {missing[0]!r} is missing (the folder's expert "
                                 f"tensors are not the {self.n_expert} x {len(rule.kinds)} the converter stacks)")
            parts = [held.pop(n) for n in names]
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1 or len(parts[0].shape) != 2:
                raise ModelError(f"block {bid}: the {kind} experts have different or non-2-D shapes {sorted(shapes)}")
            out.append((rule.merged.format(bid=bid, kind=kind), (self.n_expert, *parts[0].shape),
                        lambda parts=parts: np.stack([p.load() for p in parts])))
        return out

    def finish(self) -> None:
        """Qwen2MoeModel.prepare_tensors: no expert tensor may be left over."""
        left = [n for held in self.blocks for n in held]
        if left:
            raise ModelError(f"unprocessed expert tensors: {left[0]!r} (and {len(left) - 1} more)"
                             if len(left) > 1 else f"unprocessed expert tensor: {left[0]!r}")


def _metadata(folder: Path, arch: Arch, hp: dict[str, Any], block_count: int, ftype: LlamaFileType,
              counts: tuple[int, int, int, int]) -> list[KV]:
    """The converter's metadata, in its order: general.*, hyper-parameters, tokenizer."""
    w = gguf.GGUFWriter(path=None, arch=arch.name)
    # a key set twice keeps its first place and takes the last value, as in the converter
    # (e.g. add_bos_token for 49152-token vocabularies); gguf logs a warning for it: not here
    log = logging.getLogger("gguf.gguf_writer")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        arch.tensor_params(w, hp)
        _general_metadata(w, folder, counts)
        _set_params(w, arch, folder, hp, block_count, hp["rope_parameters"], ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        arch.set_vocab(w, folder, hp)
    finally:
        log.setLevel(level)
    return _kv_list(folder, w)


def load_hf_model(folder: str | Path, outtype: str = "f16") -> ModelSource:
    """Read a Hugging Face model folder as convert_hf_to_gguf.py --outtype OUTTYPE would write it.

    `outtype` is one of f32, f16, bf16 or q8_0 (gguf.quants' Q8_0, as the converter does); all
    four are checked against llama.cpp's converter in tests/test_hf.py. The converter's "auto"
    is `guess_outtype(folder)`."""
    folder = Path(folder)
    if outtype not in OUTTYPES:
        raise ModelError(f"unknown outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    ftype = OUTTYPES[outtype]
    config = _read_config(folder)
    config_file = folder / "config.json"
    arches = config.get("architectures") or []
    if not isinstance(arches, list) or not arches:
        # the converter reads the model's class from here and nowhere else
        raise ModelError(f"{config_file}: no architectures (the model's class, e.g. [\"LlamaForCausalLM\"])")
    hf_class = arches[0]
    arch = arch_for_hf_class(hf_class)
    if arch is None:
        raise ModelError(f"architecture {hf_class!r} is not supported (kquant converts "
                         f"{', '.join(hf_classes())})")
    # a nested text_config (Gemma3ForConditionalGeneration) may leave sizes out: its class's
    # defaults are the model family's own (Gemma 3 4B's config.json states 5 of them)
    text = _text_config(config_file, config, arch)
    _check_config(config_file, text, _REQUIRED_SIZES if text is config else ())
    hp = _hparams(config)
    _check_rope(config_file, hp["rope_parameters"])
    _refuse_unsupported(folder, arch, hp, hf_class)
    block_count = _block_count(config_file, hp)
    tensors = _tensors(folder, arch, hp, block_count, ftype)
    kv = _metadata(folder, arch, hp, block_count, ftype, _parameter_counts(tensors))
    source = ModelSource(arch=arch.name, kv=kv, tensors=tensors, path=str(folder),
                         not_runnable=_dropped_rope(arch, hp["rope_parameters"]))
    # the converter writes whatever it is given, but llama.cpp would refuse to load a file
    # whose config and tensors disagree: refuse it before it is written
    check_tensors(source)
    return source


def guess_outtype(folder: str | Path) -> str:
    """convert_hf_to_gguf.py's --outtype auto: bf16 or f16 after the first 2-D (or more) tensor's
    dtype, f16 otherwise."""
    for st in index_tensors(Path(folder)).values():
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
