"""Per-tensor type choice for a quantization mix, as ``llama-quantize in.gguf out.gguf Q4_K_M`` makes it.

A port of the type-selection half of llama.cpp's ``src/llama-quant.cpp`` (the version vendored by
llama-cpp-python 0.3.36): the ftype -> default type table, the "may this tensor be quantized"
predicate, the tensor categories, the quantize state (``n_attention_wv``, ``i_ffn_down``, ...),
``llama_tensor_get_type_impl`` with all of its mix rules (K-quant, legacy, IQ, TQ and MXFP4 ftypes,
GQA / expert-count / 70B / Falcon / GLM5-next / BailingMoE3 special cases), the shape fallback, and
the ``--pure``, ``--leave-output-tensor``, ``--output-tensor-type``, ``--token-embedding-type`` and
``--tensor-type REGEX=TYPE`` overrides.

It only *chooses* types; it returns them as ``gguf.GGMLQuantizationType`` even where kquant has no
codec for the type (IQ4_NL, MXFP4, ...), so a caller can report or reject them.

Usage::

    model = model_info_from_gguf(reader)
    types = choose_types(model, tensor_infos_from_gguf(reader), "Q4_K_M")
"""
from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import gguf
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

__all__ = [
    "FTYPES", "TensorInfo", "ModelInfo", "Category",
    "parse_ftype", "parse_ggml_type", "parse_tensor_type_option", "default_type",
    "tensor_category", "allows_quantization", "use_more_bits", "fallback_type",
    "requires_imatrix", "weight_order_key", "choose_types",
    "model_info_from_gguf", "tensor_infos_from_gguf", "types_by_name",
]

# ---------------------------------------------------------------------------------------------
# ftype names and numbers
# ---------------------------------------------------------------------------------------------

# The names llama-quantize accepts (tools/quantize/quantize.cpp, QUANT_OPTIONS), in its order, so
# that a number maps back to the first name listed for it as there.  Left out: Q2_0 (no
# LlamaFileType/GGMLQuantizationType for it in gguf 0.19) and COPY (not an ftype but "copy every
# tensor as is"; choose_types(only_copy=True) does that).
FTYPES: dict[str, F] = {
    "Q1_0": F.MOSTLY_Q1_0,
    "Q4_0": F.MOSTLY_Q4_0,
    "Q4_1": F.MOSTLY_Q4_1,
    "MXFP4_MOE": F.MOSTLY_MXFP4_MOE,
    "Q5_0": F.MOSTLY_Q5_0,
    "Q5_1": F.MOSTLY_Q5_1,
    "IQ2_XXS": F.MOSTLY_IQ2_XXS,
    "IQ2_XS": F.MOSTLY_IQ2_XS,
    "IQ2_S": F.MOSTLY_IQ2_S,
    "IQ2_M": F.MOSTLY_IQ2_M,
    "IQ1_S": F.MOSTLY_IQ1_S,
    "IQ1_M": F.MOSTLY_IQ1_M,
    "TQ1_0": F.MOSTLY_TQ1_0,
    "TQ2_0": F.MOSTLY_TQ2_0,
    "Q2_K": F.MOSTLY_Q2_K,
    "Q2_K_S": F.MOSTLY_Q2_K_S,
    "IQ3_XXS": F.MOSTLY_IQ3_XXS,
    "IQ3_S": F.MOSTLY_IQ3_S,
    "IQ3_M": F.MOSTLY_IQ3_M,
    "Q3_K": F.MOSTLY_Q3_K_M,  # alias
    "IQ3_XS": F.MOSTLY_IQ3_XS,
    "Q3_K_S": F.MOSTLY_Q3_K_S,
    "Q3_K_M": F.MOSTLY_Q3_K_M,
    "Q3_K_L": F.MOSTLY_Q3_K_L,
    "IQ4_NL": F.MOSTLY_IQ4_NL,
    "IQ4_XS": F.MOSTLY_IQ4_XS,
    "Q4_K": F.MOSTLY_Q4_K_M,  # alias
    "Q4_K_S": F.MOSTLY_Q4_K_S,
    "Q4_K_M": F.MOSTLY_Q4_K_M,
    "Q5_K": F.MOSTLY_Q5_K_M,  # alias
    "Q5_K_S": F.MOSTLY_Q5_K_S,
    "Q5_K_M": F.MOSTLY_Q5_K_M,
    "Q6_K": F.MOSTLY_Q6_K,
    "Q8_0": F.MOSTLY_Q8_0,
    "F16": F.MOSTLY_F16,
    "BF16": F.MOSTLY_BF16,
    "F32": F.ALL_F32,
}

# llama_ftype_get_default_type: the type every quantizable tensor starts from.  An ftype missing
# here (NVFP4, GUESSED) is "invalid output file type" to llama-quantize.
_DEFAULT_TYPES: dict[F, T] = {
    F.MOSTLY_Q4_0: T.Q4_0,
    F.MOSTLY_Q4_1: T.Q4_1,
    F.MOSTLY_Q5_0: T.Q5_0,
    F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q8_0: T.Q8_0,
    F.MOSTLY_F16: T.F16,
    F.MOSTLY_BF16: T.BF16,
    F.ALL_F32: T.F32,
    F.MOSTLY_Q1_0: T.Q1_0,
    F.MOSTLY_MXFP4_MOE: T.MXFP4,
    F.MOSTLY_Q2_K_S: T.Q2_K,
    F.MOSTLY_Q2_K: T.Q2_K,
    F.MOSTLY_IQ3_XS: T.IQ3_S,
    F.MOSTLY_Q3_K_S: T.Q3_K,
    F.MOSTLY_Q3_K_M: T.Q3_K,
    F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K,
    F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_S: T.Q5_K,
    F.MOSTLY_Q5_K_M: T.Q5_K,
    F.MOSTLY_Q6_K: T.Q6_K,
    F.MOSTLY_TQ1_0: T.TQ1_0,
    F.MOSTLY_TQ2_0: T.TQ2_0,
    F.MOSTLY_IQ2_XXS: T.IQ2_XXS,
    F.MOSTLY_IQ2_XS: T.IQ2_XS,
    F.MOSTLY_IQ2_S: T.IQ2_XS,
    F.MOSTLY_IQ2_M: T.IQ2_S,
    F.MOSTLY_IQ3_XXS: T.IQ3_XXS,
    F.MOSTLY_IQ1_S: T.IQ1_S,
    F.MOSTLY_IQ1_M: T.IQ1_M,
    F.MOSTLY_IQ4_NL: T.IQ4_NL,
    F.MOSTLY_IQ4_XS: T.IQ4_XS,
    F.MOSTLY_IQ3_S: T.IQ3_S,
    F.MOSTLY_IQ3_M: T.IQ3_S,
}


def parse_ftype(s: str | int | F) -> F:
    """An ftype from its llama-quantize name (any case, aliases Q3_K/Q4_K/Q5_K included) or number.

    Raises ValueError for anything llama-quantize would not accept (and for Q2_0/COPY, see FTYPES).
    Unlike llama-quantize's ``std::stoi``, a number must be the whole string ("7x" is refused).
    """
    if isinstance(s, F):
        return s
    if isinstance(s, int):
        return _ftype_from_number(s, repr(s))
    if not isinstance(s, str):
        raise ValueError(f"ftype must be a name or a number, not {type(s).__name__}")
    name = s.strip().upper()
    if name in FTYPES:
        return FTYPES[name]
    if re.fullmatch(r"[+-]?\d+", name):
        return _ftype_from_number(int(name), repr(s))
    raise ValueError(f"unknown ftype {s!r}; expected one of {', '.join(FTYPES)} or its number")


def _ftype_from_number(number: int, shown: str) -> F:
    # llama-quantize only accepts numbers that one of its named options has
    for ftype in FTYPES.values():
        if ftype.value == number:
            return ftype
    raise ValueError(f"unknown ftype number {shown}")


def default_type(ftype: str | int | F) -> T:
    """llama_ftype_get_default_type: the base tensor type of an ftype (ValueError if it has none)."""
    ftype = parse_ftype(ftype)
    try:
        return _DEFAULT_TYPES[ftype]
    except KeyError:
        raise ValueError(f"invalid output file type {ftype.value} ({ftype.name})") from None


def parse_ggml_type(s: str | int | T) -> T:
    """A ggml type from its ggml name, any case ("q4_K", "Q8_0", "f16"), as llama-quantize's
    parse_ggml_type reads --output-tensor-type/--token-embedding-type/--tensor-type values."""
    if isinstance(s, T):
        return s
    if isinstance(s, int):
        return T(s)
    try:
        return T[s.strip().upper()]
    except KeyError:
        raise ValueError(f"invalid ggml_type {s!r}") from None


def parse_tensor_type_option(s: str) -> tuple[str, T]:
    """One ``--tensor-type NAME_REGEX=TYPE`` argument, as llama-quantize parses it: split at the
    first '=', the pattern lowercased (so ``Attn_Q=q8_0`` matches ``attn_q``), the type by name."""
    pattern, sep, type_name = s.partition("=")
    if not sep:
        raise ValueError(f"malformed tensor type {s!r}: expected NAME=TYPE")
    if not pattern:
        raise ValueError(f"missing tensor name in {s!r}")
    if not type_name:
        raise ValueError(f"missing quantization type in {s!r}")
    try:
        re.compile(pattern.lower())
    except re.error as e:
        raise ValueError(f"--tensor-type {s!r}: {pattern!r} is not a regular expression ({e})") from None
    return pattern.lower(), parse_ggml_type(type_name)


# ---------------------------------------------------------------------------------------------
# model and tensor descriptions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the quantizer sees it: its GGUF name, its shape in ggml order (``shape[0]`` =
    ne[0] = the row length) and its current type (the type it keeps when not quantized)."""
    name: str
    shape: tuple[int, ...]
    type: T = T.F32

    @property
    def ne(self) -> tuple[int, int, int, int]:
        """The shape padded to ggml's four dimensions."""
        return (tuple(int(n) for n in self.shape) + (1, 1, 1, 1))[:4]  # type: ignore[return-value]

    @property
    def n_dims(self) -> int:
        """ggml_n_dims: trailing dimensions of size 1 do not count, and there is at least one."""
        ne = self.ne
        for i in range(3, 0, -1):
            if ne[i] > 1:
                return i + 1
        return 1


# architectures for which load_hparams sets LLM_TYPE_70B at this many layers (src/models/*.cpp)
_LAYERS_OF_70B = {"qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters the mix rules look at (from the GGUF's ``{arch}.*`` keys).

    n_head/n_head_kv are those of layer 0, which is what ``hparams.n_gqa()`` uses.  ``is_70b``
    overrides the model-type guess (llama.cpp's LLM_TYPE_70B, which gets attn_v one step up).
    """
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    n_embd: int = 0
    is_70b: bool | None = None

    @property
    def n_gqa(self) -> int:
        """hparams.n_gqa(): query heads per KV head, 0 where there are no KV heads."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def type_70b(self) -> bool:
        """Whether llama.cpp's loader would call this a 70B model (the only size the rules use)."""
        if self.is_70b is not None:
            return self.is_70b
        if self.arch == "llama":
            # llama: 80 layers with GQA (80 without GQA is the old 65B); 8 experts is Mixtral
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        return _LAYERS_OF_70B.get(self.arch) == self.n_layer


# ---------------------------------------------------------------------------------------------
# tensor categories and the "may it be quantized" predicate
# ---------------------------------------------------------------------------------------------

class Category(enum.Enum):
    """tensor_category: broad roles that the mix rules key on (not per-arch tensor names)."""
    TOKEN_EMBD = enum.auto()
    ATTENTION_Q = enum.auto()
    ATTENTION_V = enum.auto()
    ATTENTION_K = enum.auto()
    ATTENTION_QKV = enum.auto()
    ATTENTION_KV_B = enum.auto()
    ATTENTION_OUTPUT = enum.auto()
    FFN_UP = enum.auto()
    FFN_GATE = enum.auto()
    FFN_DOWN = enum.auto()
    OUTPUT = enum.auto()
    OTHER = enum.auto()


# substring -> category, tried in this order (so "attn_qkv.weight" wins over "attn_q...", and
# "ffn_up" also takes ffn_up_exps/ffn_up_shexp)
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", Category.ATTENTION_QKV),
    ("attn_kv_b.weight", Category.ATTENTION_KV_B),
    ("attn_v.weight", Category.ATTENTION_V),
    ("attn_k.weight", Category.ATTENTION_K),
    ("attn_q.weight", Category.ATTENTION_Q),
    ("attn_output.weight", Category.ATTENTION_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)


def _is_token_embd(name: str) -> bool:
    return name in ("token_embd.weight", "per_layer_token_embd.weight")


def _is_output_weight(name: str) -> bool:
    return name == "output.weight"


def tensor_category(name: str) -> Category:
    """tensor_get_category: exact names for output/token embeddings, then substring matches."""
    if _is_output_weight(name):
        return Category.OUTPUT
    if _is_token_embd(name):
        return Category.TOKEN_EMBD
    for substring, category in _CATEGORY_SUBSTRINGS:
        if substring in name:
            return category
    return Category.OTHER


def _is_attn_v_like(category: Category) -> bool:
    # the tensors holding V (alone or fused): the most quantization-sensitive ones
    return category in (Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B)


# substrings that keep a tensor unquantized, for every architecture
_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",        # expert router
    "ffn_gate_tid2eid.weight",    # DeepSeek-V4 i32 token-id -> expert-id table
    "altup", "laurel",            # tiny (e.g. 4x4)
    "per_layer_model_proj",       # not big, kept as is
    "ssm_conv1d",                 # Mamba/Kimi small conv1d weights
    "shortconv.conv.weight",
    "indexer.k_proj.weight", "indexer.q_proj.weight",  # MiniMax's tiny indexer projections
    # RWKV's small yet 2-D weights
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",          # T5 relative position bias
    # multimodal
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",  # audio codebooks
)

# extra substrings kept unquantized for glm5-next only
_NEVER_QUANTIZED_GLM5_NEXT = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
    "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
    "attn_v_b.weight",
)

# LLM_TN(arch)(LLM_TENSOR_POS_EMBD / LLM_TENSOR_TOKEN_TYPES, "weight"): the same for every arch
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")

_SIZE_T = 1 << 64


def _ends_with_weight(name: str) -> bool:
    # `name.rfind("weight") == name.size() - 6` in size_t arithmetic: besides "ends with weight",
    # a name of exactly 5 characters also passes (npos == 5 - 6 wraps to SIZE_MAX); kept as is
    found = name.rfind("weight")
    return (found % _SIZE_T if found >= 0 else _SIZE_T - 1) == (len(name) - 6) % _SIZE_T


def allows_quantization(tensor: TensorInfo, arch: str = "", *, quantize_output_tensor: bool = True,
                        only_copy: bool = False) -> bool:
    """tensor_allows_quantization: 2-D/3-D ``*weight`` tensors, minus norms, routers, positional
    embeddings, conv/SSM-small/RWKV/multimodal special cases, and output.weight under
    --leave-output-tensor."""
    if only_copy or tensor.n_dims < 2:
        return False
    name = tensor.name
    if not _ends_with_weight(name):
        return False
    if not quantize_output_tensor and name == "output.weight":
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    if any(s in name for s in _NEVER_QUANTIZED):
        return False
    if arch == "glm5-next" and any(s in name for s in _NEVER_QUANTIZED_GLM5_NEXT):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# helpers of the mix rules
# ---------------------------------------------------------------------------------------------

def _block_size(qtype: T) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def _is_quantized(qtype: T) -> bool:
    # ggml_is_quantized: exactly the types with blocks of more than one value
    return _block_size(qtype) > 1


def _c_mod(a: int, b: int) -> int:
    """C's `%` (truncating), which differs from Python's for a negative left side."""
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The first and last eighth of the layers, and every third one in between, get more bits."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or _c_mod(i_layer - n_layers // 8, 3) == 2)


_BLK_NUMBER = re.compile(r"blk\.\s*([+-]?\d+)")


def _blk_index(name: str) -> int | None:
    """sscanf(name, "blk.%d.", &i): the layer number of a "blk.N..." name, else None."""
    m = _BLK_NUMBER.match(name)
    return int(m.group(1)) if m else None


def weight_order_key(name: str) -> tuple[int, str]:
    """llama_model_loader::weight_name_comparer: by layer (-1 for non-"blk." names), then by name.

    The quantizer walks the tensors in this order, and the counters of the mix rules (which
    attn_v / ffn_down this is) follow it.  (Python compares str by code point, like std::string
    compares bytes, for the ASCII names GGUF uses.)
    """
    layer = _blk_index(name)
    return (-1 if layer is None else layer, name)


# fallbacks for a tensor whose row length is not a multiple of the target's block size
_FALLBACKS: dict[T, T] = {
    # 256-blocks -> the 32-block IQ type
    **{t: T.IQ4_NL for t in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S,
                             T.IQ4_XS)},
    # low-bit types -> Q4_0 (GGML_TYPE_Q2_0 would go here too; gguf 0.19 does not know it)
    **{t: T.Q4_0 for t in (T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0)},
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


def fallback_type(tensor: TensorInfo, target: T) -> T:
    """tensor_type_fallback: a type whose block size divides the row length (ne[0]).

    K/IQ types step to a 32-block type of at least as many bits; a 32-block type that still does
    not fit (and any fallback that does not) becomes F16.  ValueError where llama.cpp has no
    fallback (a non-fitting type with blocks over 32 and no entry, e.g. Q1_0, Q8_K, NVFP4).
    """
    ncols = tensor.ne[0]
    block = _block_size(target)
    if ncols % block == 0:
        return target
    if target in _FALLBACKS:
        result = _FALLBACKS[target]
    elif block <= 32:
        result = target  # already a 32-block type: nothing smaller to demote to, F16 below
    else:
        raise ValueError(f"no tensor type fallback is defined for type {target.name} "
                         f"(tensor {tensor.name}, ncols {ncols})")
    if ncols % _block_size(result) != 0:
        result = T.F16  # not even a multiple of 32: unusual shape, keep it in 16 bits
    return result


def requires_imatrix(name: str, qtype: T, ftype: str | int | F) -> bool:
    """tensor_requires_imatrix: llama-quantize refuses to make these types without an imatrix
    (token embeddings and output.weight excepted)."""
    if _is_token_embd(name) or _is_output_weight(name):
        return False
    if qtype in (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S):
        return True
    # the K-quants never need it, except Q2_K tensors in a Q2_K_S file
    return qtype == T.Q2_K and parse_ftype(ftype) == F.MOSTLY_Q2_K_S


# ---------------------------------------------------------------------------------------------
# the quantize state and the mix rules
# ---------------------------------------------------------------------------------------------

@dataclass
class _QuantizeState:
    """quantize_state_impl: counters over the tensors of one quantization run."""
    model: ModelInfo
    ftype: F
    has_imatrix: bool = False
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    patterns: list[tuple[re.Pattern[str], T]] = field(default_factory=list)
    n_attention_wv: int = 0
    n_ffn_down: int = 0
    n_ffn_gate: int = 0
    n_ffn_up: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    has_tied_embeddings: bool = True  # until an output.weight shows up

    def count_tensors(self, names: Iterable[str]) -> None:
        """init_quantize_state_counters: how many attn_v-like tensors there are, whether there is
        an output.weight (else the token embeddings double as output), and one ffn_* per layer."""
        for name in names:
            category = tensor_category(name)
            if _is_attn_v_like(category):
                self.n_attention_wv += 1
            if category == Category.OUTPUT:
                self.has_tied_embeddings = False
        self.n_ffn_down = self.n_ffn_gate = self.n_ffn_up = self.model.n_layer

    def first_pattern_match(self, name: str) -> T | None:
        """The type of the first --tensor-type pattern found in the name (std::regex_search)."""
        for pattern, qtype in self.patterns:
            if pattern.search(name):
                return qtype
        return None

    def layer_of(self, counter: int, n_layer: int, name: str) -> tuple[int, int]:
        """layer_info: the counter is the layer for dense models; with experts, ffn tensors are
        not one per layer in order (Mixtral), so the layer is read from the name instead."""
        if max(1, self.model.n_expert) > 1:
            i_layer = _blk_index(name)
            if i_layer is None:
                raise ValueError(f"Failed to determine layer for tensor {name}")
            if i_layer < 0 or i_layer >= n_layer:
                raise ValueError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {n_layer})")
            return i_layer, n_layer
        return counter, n_layer


_IQ2_LIKE = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M,
             F.MOSTLY_IQ1_M)
# ftypes whose output tensor goes to Q5_K rather than Q6_K
_OUTPUT_Q5_K = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S,
                F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M)
# ftypes whose attn_output goes to Q5_K in 8-expert models
_ATTN_OUTPUT_Q5_K_8_EXPERTS = (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S,
                               F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M,
                               F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS)


def _output_type(qs: _QuantizeState, new_type: T, tensor: TensorInfo) -> T:
    """output.weight (and tied token embeddings): Q6_K unless the row does not fit the base
    type's blocks (Q8_0), the ftype is a very low-bit IQ one (Q5_K), or Q8_0 already."""
    if qs.output_tensor_type is not None:
        return qs.output_tensor_type
    ftype = qs.ftype
    if ftype == F.MOSTLY_MXFP4_MOE:
        return T.Q8_0
    if qs.model.arch == "falcon" or tensor.ne[0] % _block_size(new_type) != 0:
        return T.Q8_0
    if ftype in _OUTPUT_Q5_K:
        return T.Q5_K
    if new_type != T.Q8_0:
        return T.Q6_K
    return new_type


def _mxfp4_moe_type(qs: _QuantizeState, tensor: TensorInfo, category: Category) -> T:
    """MXFP4_MOE: expert tensors (3-D) in MXFP4, everything else in Q8_0.  BailingMoE3's MLA
    projections are 3-D too, so there only the ffn tensors count as experts."""
    is_bailingmoe3_expert = qs.model.arch == "bailingmoe3" and category in (
        Category.FFN_UP, Category.FFN_GATE, Category.FFN_DOWN)
    if tensor.ne[2] > 1 and (qs.model.arch != "bailingmoe3" or is_bailingmoe3_expert):
        return T.MXFP4
    return T.Q8_0


def _token_embd_type(qs: _QuantizeState, new_type: T) -> T:
    """Untied token embeddings: bumped up for the 1-2 bit ftypes only."""
    if qs.token_embedding_type is not None:
        return qs.token_embedding_type
    ftype = qs.ftype
    if ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
        return T.Q2_K
    if ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS):
        return T.IQ3_S
    if ftype in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0):  # (and Q2_0, unknown to gguf 0.19)
        return T.Q4_K
    return new_type


def _iq2_like_type(qs: _QuantizeState, new_type: T, category: Category) -> T:
    """The IQ1/IQ2 ftypes: attn_v, ffn_down of the first eighth and attn_output get more bits."""
    ftype, hp = qs.ftype, qs.model
    iq2_s_or_m = ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
    if _is_attn_v_like(category):
        if hp.n_gqa >= 4 or hp.n_expert >= 4:
            new_type = T.Q4_K
        else:
            new_type = T.IQ3_S if iq2_s_or_m else T.Q2_K
        qs.i_attention_wv += 1
    elif hp.n_expert == 8 and category == Category.ATTENTION_K:
        new_type = T.Q4_K
    elif category == Category.FFN_DOWN:
        if qs.i_ffn_down < qs.n_ffn_down // 8:
            new_type = T.IQ3_S if iq2_s_or_m else T.Q2_K
        qs.i_ffn_down += 1
    elif category == Category.ATTENTION_OUTPUT:
        if hp.n_expert == 8:
            new_type = T.Q5_K
        elif ftype in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            new_type = T.IQ2_XXS
        elif iq2_s_or_m:
            new_type = T.IQ3_S
    return new_type


def _attn_v_type(qs: _QuantizeState, new_type: T) -> T:
    """attn_v / attn_qkv / attn_kv_b: more bits, the more so with GQA (V shared by many heads)."""
    ftype, hp = qs.ftype, qs.model
    if ftype == F.MOSTLY_Q2_K:
        new_type = T.Q4_K if hp.n_gqa >= 4 else T.Q3_K
    elif ftype == F.MOSTLY_Q2_K_S and hp.n_gqa >= 4:
        new_type = T.Q4_K
    elif ftype == F.MOSTLY_IQ3_XXS:
        new_type = T.Q4_K if hp.n_gqa >= 4 else (T.IQ3_S if not qs.has_imatrix else T.IQ3_XXS)
    elif ftype in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and hp.n_gqa >= 4:
        new_type = T.Q4_K
    elif ftype == F.MOSTLY_IQ3_M:
        new_type = T.Q4_K
    elif ftype == F.MOSTLY_Q3_K_M:
        new_type = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
    elif ftype == F.MOSTLY_Q3_K_L:
        new_type = T.Q5_K
    elif ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and hp.n_gqa >= 4:
        new_type = T.Q5_K
    elif (ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M)
          and use_more_bits(qs.i_attention_wv, qs.n_attention_wv)):
        new_type = T.Q6_K
    elif ftype == F.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
        new_type = T.Q5_K
    if hp.type_70b and new_type in (T.Q3_K, T.Q4_K):
        # 70B: 8 heads share each V, so attn_v is 8x smaller than attn_q; more bits are cheap
        new_type = T.Q5_K
    if hp.n_expert == 8:
        new_type = T.Q8_0  # 8-expert models: costs only ~128MB
    qs.i_attention_wv += 1
    return new_type


def _attn_k_type(qs: _QuantizeState, new_type: T) -> T:
    if qs.model.n_expert == 8:
        return T.Q8_0
    if qs.ftype == F.MOSTLY_IQ3_XS:
        return T.IQ3_XXS
    if qs.ftype == F.MOSTLY_IQ3_XXS:
        return T.IQ2_S
    return new_type


def _attn_q_type(qs: _QuantizeState, new_type: T) -> T:
    if qs.ftype == F.MOSTLY_IQ3_XS:
        return T.IQ3_XXS
    if qs.ftype == F.MOSTLY_IQ3_XXS:
        return T.IQ2_S
    return new_type


def _ffn_down_type(qs: _QuantizeState, new_type: T, name: str) -> T:
    """ffn_down: the most sensitive FFN matrix; more bits in the first layers / use_more_bits."""
    ftype, hp = qs.ftype, qs.model
    falcon = hp.arch == "falcon"
    i_layer, n_layer = qs.layer_of(qs.i_ffn_down, qs.n_ffn_down, name)
    if ftype == F.MOSTLY_Q2_K:
        new_type = T.Q3_K
    elif ftype == F.MOSTLY_Q2_K_S:
        if i_layer < n_layer // 8:
            new_type = T.Q4_K
    elif ftype == F.MOSTLY_IQ3_XXS and not qs.has_imatrix:
        new_type = T.Q4_K if i_layer < n_layer // 8 else T.Q3_K
    elif ftype == F.MOSTLY_Q3_K_M:
        if i_layer < n_layer // 16:
            new_type = T.Q5_K
        elif not falcon or use_more_bits(i_layer, n_layer):
            new_type = T.Q4_K
        else:
            new_type = T.Q3_K
    elif ftype == F.MOSTLY_IQ3_M and (i_layer < n_layer // 8 or (
            hp.n_expert == 8 and use_more_bits(i_layer, n_layer))):
        new_type = T.Q4_K
    elif ftype == F.MOSTLY_Q3_K_L:
        new_type = T.Q4_K if falcon else T.Q5_K
    elif ftype == F.MOSTLY_Q4_K_M:
        if falcon:
            new_type = (T.Q6_K if i_layer < n_layer // 16
                        else T.Q5_K if use_more_bits(i_layer, n_layer) else T.Q4_K)
        elif use_more_bits(i_layer, n_layer):
            new_type = T.Q6_K
    elif (i_layer < n_layer // 8 and ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS)
          and not qs.has_imatrix):
        new_type = T.Q5_K
    elif ftype == F.MOSTLY_Q5_K_M and use_more_bits(i_layer, n_layer):
        new_type = T.Q6_K
    elif ftype == F.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
        new_type = T.Q5_K
    elif (ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and qs.has_imatrix
          and i_layer < n_layer // 8):
        # guards the first ffn_down layers, which can go crazy even with an imatrix; only with
        # one, so that without it the result stays what it always was
        new_type = T.Q4_1 if ftype == F.MOSTLY_Q4_0 else T.Q5_1
    qs.i_ffn_down += 1
    return new_type


def _attn_output_type(qs: _QuantizeState, new_type: T) -> T:
    ftype, hp = qs.ftype, qs.model
    if hp.arch == "falcon":
        return T.Q4_K if ftype == F.MOSTLY_Q3_K_L else new_type
    if hp.n_expert == 8:
        return T.Q5_K if ftype in _ATTN_OUTPUT_Q5_K_8_EXPERTS else new_type
    return {
        F.MOSTLY_Q2_K: T.Q3_K,
        F.MOSTLY_IQ3_XXS: T.IQ3_S,
        F.MOSTLY_Q3_K_M: T.Q4_K,
        F.MOSTLY_Q3_K_L: T.Q5_K,
        F.MOSTLY_IQ3_M: T.Q4_K,
    }.get(ftype, new_type)


def _attn_qkv_type(qs: _QuantizeState, new_type: T) -> T:
    ftype = qs.ftype
    if ftype in (F.MOSTLY_Q3_K_M, F.MOSTLY_Q3_K_L, F.MOSTLY_IQ3_M):
        return T.Q4_K
    if ftype == F.MOSTLY_Q4_K_M:
        return T.Q5_K
    if ftype == F.MOSTLY_Q5_K_M:
        return T.Q6_K
    return new_type


def _ffn_gate_up_type(qs: _QuantizeState, new_type: T, name: str, category: Category) -> T:
    """ffn_gate / ffn_up: IQ3_XS takes them down to IQ3_XXS in the middle layers."""
    if category == Category.FFN_GATE:
        i_layer, n_layer = qs.layer_of(qs.i_ffn_gate, qs.n_ffn_gate, name)
    else:
        i_layer, n_layer = qs.layer_of(qs.i_ffn_up, qs.n_ffn_up, name)
    if qs.ftype == F.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
        new_type = T.IQ3_XXS
    if category == Category.FFN_GATE:
        qs.i_ffn_gate += 1
    else:
        qs.i_ffn_up += 1
    return new_type


def _mix_type(qs: _QuantizeState, new_type: T, tensor: TensorInfo, category: Category) -> T:
    """llama_tensor_get_type_impl: the mix rules, first matching branch only (the order matters:
    output/tied embeddings, MXFP4_MOE, token embeddings, IQ1/IQ2 ftypes, then by category)."""
    name, arch, ftype = tensor.name, qs.model.arch, qs.ftype

    # glm5-next: these stay at Q8_0 or better by default
    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new_type not in (T.F32, T.BF16, T.F16):
            return T.Q8_0

    if category == Category.OUTPUT or (qs.has_tied_embeddings and category == Category.TOKEN_EMBD):
        # a tied token embedding is also the output matrix, so it gets the output's type
        return _output_type(qs, new_type, tensor)
    if ftype == F.MOSTLY_MXFP4_MOE:
        return _mxfp4_moe_type(qs, tensor, category)
    if category == Category.TOKEN_EMBD:
        return _token_embd_type(qs, new_type)
    if ftype in _IQ2_LIKE:
        return _iq2_like_type(qs, new_type, category)
    if _is_attn_v_like(category):
        return _attn_v_type(qs, new_type)
    if category == Category.ATTENTION_K:
        return _attn_k_type(qs, new_type)
    if category == Category.ATTENTION_Q:
        return _attn_q_type(qs, new_type)
    if category == Category.FFN_DOWN:
        return _ffn_down_type(qs, new_type, name)
    if category == Category.ATTENTION_OUTPUT:
        return _attn_output_type(qs, new_type)
    if category == Category.ATTENTION_QKV:
        # unreachable: attn_qkv is attn_v-like and taken above (kept as the C code has it)
        return _attn_qkv_type(qs, new_type)
    if category in (Category.FFN_GATE, Category.FFN_UP):
        return _ffn_gate_up_type(qs, new_type, name, category)
    return new_type


def _tensor_type(qs: _QuantizeState, tensor: TensorInfo, base: T, category: Category, *,
                 pure: bool) -> T:
    """llama_tensor_get_type for a quantizable tensor: explicit embedding/output types first
    (final, no fallback), then a --tensor-type pattern or the mix rules, then the shape fallback."""
    if qs.token_embedding_type is not None and category == Category.TOKEN_EMBD:
        # per_layer_token_embd is a large separate table: an explicit --tensor-type may name it
        named = (tensor.name == "per_layer_token_embd.weight"
                 and qs.first_pattern_match(tensor.name) is not None)
        if not named:
            return qs.token_embedding_type
    if qs.output_tensor_type is not None and category == Category.OUTPUT:
        return qs.output_tensor_type

    new_type = base
    if not _is_quantized(base):
        return new_type  # F32/F16/BF16 files: no mix, no fallback

    manual = qs.first_pattern_match(tensor.name)
    if manual is not None:
        new_type = manual
    elif not pure:
        new_type = _mix_type(qs, new_type, tensor, category)

    return fallback_type(tensor, new_type)


def choose_types(model: ModelInfo, tensors: Sequence[TensorInfo], ftype: str | int | F, *,
                 pure: bool = False,
                 leave_output_tensor: bool = False,
                 output_tensor_type: T | str | None = None,
                 token_embedding_type: T | str | None = None,
                 tensor_types: Iterable[tuple[str, T | str]] = (),
                 has_imatrix: bool = False,
                 only_copy: bool = False) -> dict[str, T]:
    """The type llama-quantize gives every tensor for this ftype and these options.

    ``tensors`` are all of the model's tensors (the counters look at all of them: whether an
    ``output.weight`` exists decides if the token embeddings are tied). They are visited in the
    loader's order (weight_order_key) whatever the order given, as the counters depend on it.
    Tensors that are not quantized keep ``TensorInfo.type``.

    Options, as llama-quantize's: ``pure`` (--pure: no mix rules, the default type everywhere
    but embeddings/output options), ``leave_output_tensor`` (--leave-output-tensor),
    ``output_tensor_type`` / ``token_embedding_type`` (--output-tensor-type /
    --token-embedding-type, taken as is), ``tensor_types`` ((regex, type) pairs of --tensor-type,
    searched in order, first match wins; note llama-quantize lowercases its CLI patterns, see
    parse_tensor_type_option), ``has_imatrix`` (--imatrix given), ``only_copy`` (COPY).
    """
    ftype = parse_ftype(ftype)
    base = default_type(ftype)
    qs = _QuantizeState(
        model=model, ftype=ftype, has_imatrix=has_imatrix,
        output_tensor_type=None if output_tensor_type is None else parse_ggml_type(output_tensor_type),
        token_embedding_type=(None if token_embedding_type is None
                              else parse_ggml_type(token_embedding_type)),
        patterns=[(re.compile(p), parse_ggml_type(t)) for p, t in tensor_types],
    )
    ordered = sorted(tensors, key=lambda t: weight_order_key(t.name))
    _check_unique(ordered)
    qs.count_tensors(t.name for t in ordered)

    chosen: dict[str, T] = {}
    for tensor in ordered:
        if allows_quantization(tensor, model.arch, quantize_output_tensor=not leave_output_tensor,
                               only_copy=only_copy):
            chosen[tensor.name] = _tensor_type(qs, tensor, base, tensor_category(tensor.name),
                                               pure=pure)
        else:
            chosen[tensor.name] = tensor.type
    return chosen


def _check_unique(tensors: Sequence[TensorInfo]) -> None:
    for a, b in zip(tensors, tensors[1:]):
        if a.name == b.name:
            raise ValueError(f"duplicate tensor name {a.name!r}")


# ---------------------------------------------------------------------------------------------
# reading the inputs from a GGUF file
# ---------------------------------------------------------------------------------------------

def _field_value(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _first_int(value: object, default: int = 0) -> int:
    # per-layer hparams (head counts of hybrid models) come as arrays; the rules use layer 0
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else default
    return int(value)  # type: ignore[call-overload]


def model_info_from_gguf(reader: gguf.GGUFReader) -> ModelInfo:
    """ModelInfo from a GGUF's metadata (``general.architecture`` and ``{arch}.*`` keys)."""
    arch = str(_field_value(reader, "general.architecture", ""))
    if not arch:
        raise ValueError("GGUF has no general.architecture")

    def hparam(key: str) -> int:
        return _first_int(_field_value(reader, f"{arch}.{key}"))

    return ModelInfo(arch=arch, n_layer=hparam("block_count"), n_head=hparam("attention.head_count"),
                     n_head_kv=hparam("attention.head_count_kv"), n_expert=hparam("expert_count"),
                     n_embd=hparam("embedding_length"))


def tensor_infos_from_gguf(reader: gguf.GGUFReader) -> list[TensorInfo]:
    """TensorInfo (name, ggml-order shape, stored type) of every tensor of a GGUF."""
    return [TensorInfo(t.name, tuple(int(n) for n in t.shape), T(t.tensor_type))
            for t in reader.tensors]


def types_by_name(types: Mapping[str, T]) -> dict[str, str]:
    """The chosen types as ggml-style names ("q4_K"), handy for printing and comparing."""
    return {name: _ggml_type_name(t) for name, t in types.items()}


def _ggml_type_name(qtype: T) -> str:
    # ggml_type_name: lowercase, except the "K" of the K-quants
    name = qtype.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name
