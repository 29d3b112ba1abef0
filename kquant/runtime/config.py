"""A model's shape and numerics, read from GGUF metadata (what llama.cpp's llama_hparams holds).

Every input kquant reads becomes GGUF metadata first (an HF folder through kquant.files.hf, exactly as
convert_hf_to_gguf.py writes it), so this is the one place that interprets hyperparameters (the
sizes the tensors are made of through kquant.archs.checks, which the converter checks with too).
Which architectures the runtime accepts, each one's rope style and its tensors come from
kquant.archs; `read_config` refuses, before any work, a model the runtime would fail on halfway
or compute garbage with.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from ..archs import ARCHS
from ..archs.checks import check_tensors, meta_float, meta_int, model_dims, where
from ..errors import ModelError
from ..files.source import ModelSource
from ..matmul.cpu import WEIGHT_TYPES


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # attention.key_length (qwen3 has head_dim != n_embd / n_head)
    n_rot: int  # rope.dimension_count: leading dims of each head that rotate
    rope_neox: bool  # the arch's rope style (kquant.archs): NEOX halves or NORM adjacent pairs
    rope_base: float
    rope_freq_scale: float  # 1 / linear scaling factor
    rms_eps: float
    n_vocab: int
    # rope.scaling.attn_factor: cos and sin scaled by it (LongRoPE's, phi3)
    rope_attn_factor: float = 1.0
    # rope.scaling.original_context_length (llama.cpp's n_ctx_orig_yarn): a context longer than
    # this takes the rope_factors_long tensor, else rope_factors_short
    n_ctx_orig: int = 0
    scale_q: bool = False  # Q scaled by q_scale before attention (kquant.archs: phi3, gemma2, gemma3)
    q_scale: float = 1.0  # llama.cpp's f_attention_scale (1/sqrt(head_dim) but for gemma2's and gemma3's 27B)
    scale_embd: bool = False  # token embeddings times sqrtf(n_embd) (gemma)
    post_norms: bool = False  # attn_post_norm / ffn_post_norm on each block's outputs (gemma)
    ffn_act: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu (GeGLU)
    attn_softcap: float = 0.0  # attention scores capped to cap * tanh(s / cap) (0: not)
    final_softcap: float = 0.0  # logits capped likewise (0: not)
    # sliding-window attention: the window, and per layer whether it applies (empty: none)
    n_swa: int = 0
    swa_layers: tuple[bool, ...] = ()
    # the SWA layers' rope (base, freq scale) where it differs from the global one (gemma3:
    # rope.freq_base_swa at scale 1); None: every layer ropes with rope_base, rope_freq_scale
    rope_swa: tuple[float, float] | None = None
    # mixture of experts (0: none): experts, experts used per token, the rows of each expert's
    # gate/up and of the shared expert's; the top-k weights renormalized (build_moe_ffn's
    # norm_w, by arch) and scaled by expert_weights_scale (0: not)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    expert_norm: bool = False
    expert_weights_scale: float = 0.0

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_head // self.n_head_kv


def read_config(source: ModelSource) -> ModelConfig:
    """The hyperparameters of a model of kquant.archs (llama/mistral/qwen2/qwen3/phi3/gemma2/gemma3), with llama.cpp's defaults, after
    checking everything the runtime will rely on before any weight is read: each metadata value
    (present where llama.cpp requires it, of its type, in range), every tensor's type (one the
    runtime computes with) and the tensor set and shapes (kquant.archs.checks, llama.cpp's
    loader checks). A model that fails any is one ModelError naming the key or tensor."""
    arch = source.arch
    if arch not in ARCHS:
        raise ModelError(f"architecture {arch!r} is not supported by kquant's runtime "
                         f"(supported: {', '.join(sorted(ARCHS))})")
    if source.not_runnable:
        raise ModelError(f"{where(source)}: {source.not_runnable}")
    check_runnable_types(source)
    dims = model_dims(source)
    if dims.head_dim_v != dims.head_dim:
        raise ModelError(f"{where(source)}: {arch}.attention.value_length {dims.head_dim_v} differs from "
                         f"{arch}.attention.key_length {dims.head_dim}: kquant's runtime does not run such models")
    n_ctx_train = meta_int(source, f"{arch}.context_length", 0)  # llama.cpp's n_ctx_train
    rope_freq_scale = _rope_freq_scale(source)
    check_tensors(source, dims, runtime=True)
    a = ARCHS[arch]
    _check_experts(source, dims.n_expert)
    n_swa, swa_layers = _swa(source, a.swa_pattern, a.swa_window, dims.n_layer)
    return ModelConfig(
        arch=arch,
        n_layer=dims.n_layer,
        n_embd=dims.n_embd,
        n_ff=dims.n_ff,
        n_head=dims.n_head,
        n_head_kv=dims.n_head_kv,
        head_dim=dims.head_dim,
        n_rot=dims.n_rot,
        rope_neox=ARCHS[arch].rope_neox,
        rope_base=meta_float(source, f"{arch}.rope.freq_base", 10000.0),
        rope_freq_scale=rope_freq_scale,
        rms_eps=meta_float(source, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        n_vocab=dims.n_vocab,
        rope_attn_factor=meta_float(source, f"{arch}.rope.scaling.attn_factor", 1.0),
        n_ctx_orig=meta_int(source, f"{arch}.rope.scaling.original_context_length", 0, minimum=0) or n_ctx_train,
        scale_q=a.scale_q,
        q_scale=a.q_scale(dims) if a.scale_q else 1.0,
        scale_embd=a.scale_embd,
        post_norms=a.post_norms,
        ffn_act=a.ffn_act,
        attn_softcap=meta_float(source, f"{arch}.attn_logit_softcapping", a.attn_softcap)
        if a.attn_softcap else 0.0,
        final_softcap=meta_float(source, f"{arch}.final_logit_softcapping", a.final_softcap,
                                 allow_zero=a.final_softcap_key)
        if a.final_softcap or a.final_softcap_key else 0.0,
        n_swa=n_swa,
        swa_layers=swa_layers,
        rope_swa=(meta_float(source, f"{arch}.rope.freq_base_swa", a.swa_rope_base), 1.0)
        if a.swa_rope_base and any(swa_layers) else None,
        n_expert=dims.n_expert,
        n_expert_used=meta_int(source, f"{arch}.expert_used_count", 0, minimum=0) if dims.n_expert else 0,
        n_ff_exp=_expert_rows(a, dims),
        n_ff_shexp=dims.n_ff_shexp,
        expert_norm=a.expert_norm,
        expert_weights_scale=meta_float(source, f"{arch}.expert_weights_scale", 0.0, allow_zero=True),
    )


def _expert_rows(arch, dims) -> int:
    """Each expert's gate/up rows as the arch's loader sizes them (llama: n_ff; qwen*moe:
    expert_feed_forward_length), read off its ffn_up_exps shape."""
    from gguf import MODEL_TENSOR

    spec = next((t for t in arch.tensors if t.key == MODEL_TENSOR.FFN_UP_EXP), None)
    return spec.size(dims)[1] if spec is not None and dims.n_expert else 0


def _check_experts(source: ModelSource, n_expert: int) -> None:
    """The routing the runtime computes: llama.cpp's softmax gating over all experts, k of
    them per token. Expert groups (DeepSeek-V3's group-limited routing, which build_moe_ffn
    applies to any arch that has them) are refused."""
    arch = source.arch
    if not n_expert:
        return
    if meta_int(source, f"{arch}.expert_used_count", 0, minimum=0) == 0:
        raise ModelError(f"{where(source)}: {arch}.expert_count is {n_expert} but {arch}.expert_used_count "
                         "is missing or 0")
    if meta_int(source, f"{arch}.expert_group_count", 0, minimum=0) > 1:
        raise ModelError(f"{where(source)}: expert groups ({arch}.expert_group_count) are not supported by "
                         "kquant's runtime")


def _swa(source: ModelSource, pattern: int, window: int, n_layer: int) -> tuple[int, tuple[bool, ...]]:
    """llama.cpp's sliding window (attention.sliding_window, else the arch's default) and its
    layers (load_swa_pattern: attention.sliding_window_pattern as one flag per layer or as
    n_pattern, else the arch's n_pattern; layer il slides where il % n_pattern < n_pattern - 1);
    no SWA where the arch has none (llama.cpp ignores the keys there)."""
    if not pattern:
        return 0, ()
    arch = source.arch
    n_swa = meta_int(source, f"{arch}.attention.sliding_window", window, minimum=0)
    if n_swa == 0 and window == 0:  # gemma3: no window (key absent or 0) is no SWA at all
        return 0, ()
    key = f"{arch}.attention.sliding_window_pattern"
    value = source.get(key, pattern)
    if isinstance(value, list):
        if len(value) != n_layer or not all(isinstance(v, (bool, int)) for v in value):
            raise ModelError(f"{where(source)}: {key} has {len(value)} entries, not one flag per layer ({n_layer})")
        layers = tuple(bool(v) for v in value)
    else:
        n_pattern = meta_int(source, key, pattern, minimum=0)
        layers = tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))
    if n_swa == 0 and any(layers):
        raise ModelError(f"{where(source)}: {arch}.attention.sliding_window is 0 for a model with "
                         "sliding-window layers")
    return n_swa, layers


def _rope_freq_scale(source: ModelSource) -> float:
    """1 / the linear rope scaling factor (the only scaling the runtime runs; longrope's is the
    same factor, with its per-frequency factors from tensors); llama.cpp takes a factor of 0,
    or none, as no scaling."""
    key = f"{source.arch}.rope.scaling"
    scaling = source.get(f"{key}.type", "none")
    if scaling not in ("none", "linear", "longrope"):
        raise ModelError(f"{where(source)}: rope scaling {scaling!r} ({key}.type) is not supported by "
                         "kquant's runtime")
    factor = meta_float(source, f"{key}.factor", 0.0, allow_zero=True)
    return 1.0 / factor if scaling in ("linear", "longrope") and factor > 0 else 1.0


def check_runnable_types(source: ModelSource) -> None:
    """ModelError naming the first tensor stored in a type the runtime cannot compute with: the
    runtime multiplies every matrix by its block kernel (kquant.matmul), so it runs the types
    that have one, and dequantizes the rest of the tensors with the same types' codecs."""
    for t in source.tensors:
        if t.type not in WEIGHT_TYPES:
            runs = ", ".join(q.name for q in WEIGHT_TYPES)
            raise ModelError(f"{where(source)}: tensor {t.name} is {t.type.name}: kquant's runtime does not "
                             f"run {_family(t.type)} yet (it runs {runs})")


def _family(qtype: T) -> str:
    """How the user knows the types of a family: one message for all i-quants."""
    if qtype.name.startswith("IQ"):
        return "i-quants"
    if qtype.name.startswith("TQ"):
        return "ternary quants (TQ1_0, TQ2_0)"
    return f"{qtype.name} tensors"
