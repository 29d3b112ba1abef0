"""Build small Hugging Face model folders (random weights, real tokenizers) for kquant's tests.

    python tests/make_hf_fixtures.py DEST [--text FILE]

writes DEST/<fixture>/ for every fixture in FIXTURES: config.json, model*.safetensors (written by
hand: 8-byte header length, JSON header, raw little-endian data), tokenizer files and, for some,
a model card and generation_config.json.  Everything is deterministic (seeded numpy; the
SentencePiece model is trained single-threaded on a fixed slice of the calibration text, which
takes a fraction of a second), needs only numpy, json and sentencepiece, and is small (hidden 256,
2 layers, vocabularies of ~640 tokens): a few MB in all, built in about a second.

The folder names matter: convert_hf_to_gguf.py derives general.name (and the default output file
name) from them, so the reference results in tests/data/hf_reference/ hold for these names only.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "text" / "calibration" / "pg1342.txt"

# the fixtures: folder name -> short description
FIXTURES = {
    "tiny-llama-spm": "LlamaForCausalLM, F32 weights, SentencePiece tokenizer.model + added tokens, model card",
    "tiny-mistral-spm": "MistralForCausalLM, BF16 weights in 2 shards + index, GQA, SentencePiece",
    "tiny-llama3-bpe": "LlamaForCausalLM, BF16, Llama-3 BPE tokenizer.json, llama3 rope scaling, tied embeddings",
    "tiny-qwen2": "Qwen2ForCausalLM, BF16, Q/K/V biases, Qwen2 BPE tokenizer.json, tied, padded vocab",
    "tiny-qwen3": "Qwen3ForCausalLM, F16, q_norm/k_norm, head_dim 128 != hidden/heads, GQA",
    "tiny-smollm": "LlamaForCausalLM, BF16, SmolLM BPE (digits + byte-level), tied, hidden 64",
    "tiny-phi3": "Phi3ForCausalLM, BF16, fused qkv_proj / gate_up_proj, GQA, partial rotary 0.75, LongRoPE, "
                 "SentencePiece + Phi-3 added tokens, padded vocab",
    "tiny-phi4": "Phi3ForCausalLM as Phi-4-mini: GPT2Tokenizer (byte-level BPE, GPT-4o pre-tokenizer), padded "
                 "vocab, tied, partial rotary 0.75, LongRoPE",
    "tiny-qwen3moe": "Qwen3MoeForCausalLM, BF16, 8 experts (top 2, renormalized), q_norm/k_norm, GQA, "
                     "Qwen2 BPE tokenizer.json",
    "tiny-qwen2moe": "Qwen2MoeForCausalLM, BF16, 4 experts (top 2, not renormalized) + a shared expert with its "
                     "sigmoid gate, Q/K/V biases, Qwen2 BPE tokenizer.json",
    "tiny-mixtral": "MixtralForCausalLM, F16, 8 experts (top 2, renormalized) of n_ff rows, GQA, SentencePiece",
    "tiny-gemma2": "Gemma2ForCausalLM, BF16, (1 + w) norms, post-norms, GeGLU, GQA, sliding window 32 on even "
                   "layers, attention and final logit soft-capping, tied, SentencePiece + turn tokens",
    "tiny-gemma3": "Gemma3ForCausalLM, BF16, (1 + w) norms incl. Q/K norms, post-norms, GeGLU, GQA, 6 layers: "
                   "sliding window 32 with rope base 10000 on layers 0-4, layer 5 global with base 1e6, tied",
    "tiny-gemma3-vl": "Gemma3ForConditionalGeneration (text_config; vision tower and projector skipped), "
                      "linear rope scaling 8 on the global layer, final logit soft-capping, token_embd padded "
                      "beyond vocab_size (trimmed)",
}


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write float32 arrays as a safetensors file of `dtype` (F32, F16 or BF16), in dict order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        if dtype == "F32":
            raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        elif dtype == "F16":
            raw = np.ascontiguousarray(arr, dtype="<f2").tobytes()
        elif dtype == "BF16":
            raw = _to_bf16_bits(arr).astype("<u2").tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def _weights(seed: int, cfg: dict, *, bias: bool = False, qk_norm: bool = False, tied: bool = False) -> dict[str, np.ndarray]:
    """HF-named random weights for a llama-like decoder (float32, std 0.02; norms around 1)."""
    rng = np.random.default_rng(seed)
    h, ff, nl, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // nh

    def mat(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(v, h)}
    for i in range(nl):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = mat(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = mat(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = mat(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, nh * hd)
        if bias:
            w[p + "self_attn.q_proj.bias"] = mat(nh * hd)
            w[p + "self_attn.k_proj.bias"] = mat(nkv * hd)
            w[p + "self_attn.v_proj.bias"] = mat(nkv * hd)
        if qk_norm:
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            w.update(_expert_weights(p, cfg, mat))
            continue
        w[p + "mlp.gate_proj.weight"] = mat(ff, h)
        w[p + "mlp.up_proj.weight"] = mat(ff, h)
        w[p + "mlp.down_proj.weight"] = mat(h, ff)
    w["model.norm.weight"] = norm(h)
    if not tied:
        w["lm_head.weight"] = mat(v, h)
    return w


def _expert_weights(p: str, cfg: dict, mat) -> dict[str, np.ndarray]:
    """A block's mixture of experts, HF-named: Qwen2/3-MoE's mlp.gate router, per-expert
    gate/up/down and (qwen2moe) the shared expert with its gate, or Mixtral's
    block_sparse_moe.{gate, experts.X.w1/w2/w3}. The router is 5x the other matrices' scale so
    that tokens prefer distinct experts (a near-uniform softmax would route by noise)."""
    h = cfg["hidden_size"]
    n_exp = cfg.get("num_local_experts") or cfg["num_experts"]
    w = {}
    if cfg["model_type"] == "mixtral":
        ff = cfg["intermediate_size"]
        w[p + "block_sparse_moe.gate.weight"] = mat(n_exp, h) * np.float32(5)
        for x in range(n_exp):
            e = f"{p}block_sparse_moe.experts.{x}."
            w[e + "w1.weight"], w[e + "w2.weight"], w[e + "w3.weight"] = mat(ff, h), mat(h, ff), mat(ff, h)
        return w
    ff = cfg["moe_intermediate_size"]
    w[p + "mlp.gate.weight"] = mat(n_exp, h) * np.float32(5)
    for x in range(n_exp):
        e = f"{p}mlp.experts.{x}."
        w[e + "gate_proj.weight"], w[e + "up_proj.weight"], w[e + "down_proj.weight"] = mat(ff, h), mat(ff, h), mat(h, ff)
    if cfg.get("shared_expert_intermediate_size"):
        sff = cfg["shared_expert_intermediate_size"]
        w[p + "mlp.shared_expert.gate_proj.weight"] = mat(sff, h)
        w[p + "mlp.shared_expert.up_proj.weight"] = mat(sff, h)
        w[p + "mlp.shared_expert.down_proj.weight"] = mat(h, sff)
        w[p + "mlp.shared_expert_gate.weight"] = mat(1, h) * np.float32(25)
    return w


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------

def _training_text(text_path: Path, n: int = 300_000) -> str:
    text = text_path.read_text(encoding="utf-8")
    return text[3000:3000 + n]


def train_sentencepiece(text: str, vocab_size: int = 640) -> bytes:
    """A Llama-style SentencePiece BPE model (byte fallback, identity normalization)."""
    import sentencepiece as spm

    lines = [line for line in text.split("\n") if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, num_threads=1, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    return out.getvalue()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_PRETOK = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def train_bpe(text: str, n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE: 256 byte symbols then `n_merges` merges (ties broken by pair)."""
    b2u = bytes_to_unicode()
    words = Counter("".join(b2u[b] for b in tok.encode("utf-8")) for tok in _PRETOK.findall(text))
    splits = {w: list(w) for w in words}
    vocab = {b2u[b]: i for i, b in enumerate(sorted(b2u))}
    merges: list[tuple[str, str]] = []
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[str]] = {}
    for w, c in words.items():
        s = splits[w]
        for p in zip(s, s[1:]):
            pairs[p] += c
            where.setdefault(p, set()).add(w)
    for _ in range(n_merges):
        pairs = +pairs  # drop zero counts
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        for w in sorted(where.pop(best, ())):
            s, c = splits[w], words[w]
            for p in zip(s, s[1:]):
                pairs[p] -= c
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == best[0] and s[i + 1] == best[1]:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
            for p in zip(out, out[1:]):
                pairs[p] += c
                where.setdefault(p, set()).add(w)
    return vocab, merges


def _added(tid: int, content: str, special: bool = True) -> dict:
    return {"id": tid, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


_LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

# Xenova/gpt-4o's (Phi-4-mini's) Split regex
_GPT4O_RE = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

def _split_pre(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _tokenizer_json(vocab, merges, added, pre, post, normalizer=None, merges_as_pairs=True, ignore_merges=True) -> dict:
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab,
                  "merges": [list(m) for m in merges] if merges_as_pairs else [f"{a} {b}" for a, b in merges]},
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_CHAT_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_CHAT_LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
_CHAT_LLAMA2 = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
                "message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")


# ---------------------------------------------------------------------------------------------
# the fixtures
# ---------------------------------------------------------------------------------------------

def _spm_folder(d: Path, spm_model: bytes, n_sp: int, extra: list[tuple[int, str, bool]], chat: str | None) -> None:
    (d / "tokenizer.model").write_bytes(spm_model)
    decoder = {"0": _added(0, "<unk>"), "1": _added(1, "<s>"), "2": _added(2, "</s>")}
    for tid, content, special in extra:
        decoder[str(tid)] = _added(tid, content, special)
    for v in decoder.values():
        del v["id"]
    tc = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
          "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
          "legacy": False, "model_max_length": 1000000000000000019884624838656, "pad_token": None,
          "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}
    if chat is not None:
        tc["chat_template"] = chat
    _write_json(d / "tokenizer_config.json", tc)
    _write_json(d / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def build_llama_spm(d: Path, spm_model: bytes, n_sp: int) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
           "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
           "vocab_size": n_sp + 4, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "torch_dtype": "float32", "attention_bias": False, "pretraining_tp": 1}
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", _weights(1, cfg), "F32")
    # two added tokens past the SentencePiece vocabulary (one special, one not), two [PAD] ids
    (d / "added_tokens.json").write_text(json.dumps({"<|im_start|>": n_sp, "<tool>": n_sp + 1}), encoding="utf-8")
    _spm_folder(d, spm_model, n_sp, [(n_sp, "<|im_start|>", True), (n_sp + 1, "<tool>", False)], _CHAT_LLAMA2)
    (d / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\ntags:\n- text-generation\n- test\n"
        "base_model: kquant-tests/tiny-base-v1\ndatasets:\n- gutenberg\npipeline_tag: text-generation\n---\n\n"
        "# tiny-llama-spm\n\nRandom weights, for kquant's tests.\n", encoding="utf-8")


def build_mistral_spm(d: Path, spm_model: bytes, n_sp: int) -> None:
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": None, "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
           "tie_word_embeddings": False, "vocab_size": n_sp, "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "torch_dtype": "bfloat16"}
    _write_json(d / "config.json", cfg)
    w = _weights(2, cfg)
    names = list(w)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    total = 0
    for fname, part in shards.items():
        write_safetensors(d / fname, {n: w[n] for n in part}, "BF16")
        for n in part:
            weight_map[n] = fname
            total += w[n].size * 2
    _write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _spm_folder(d, spm_model, n_sp, [], _CHAT_LLAMA2)
    _write_json(d / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2})


def build_mixtral(d: Path, spm_model: bytes, n_sp: int) -> None:
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 256,
           "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": None, "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
           "num_local_experts": 8, "num_experts_per_tok": 2, "output_router_logits": False,
           "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0,
           "tie_word_embeddings": False, "vocab_size": n_sp, "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "torch_dtype": "float16"}
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", _weights(8, cfg), "F16")
    _spm_folder(d, spm_model, n_sp, [], _CHAT_LLAMA2)
    _write_json(d / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2})


def build_llama3_bpe(d: Path, text: str) -> None:
    vocab, merges = train_bpe(text[:60_000], 360)
    n = len(vocab)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|reserved_special_token_2|>", "<|eot_id|>"]
    added = [_added(n + i, s) for i, s in enumerate(specials)]
    for a in added:
        vocab[a["content"]] = a["id"]
    bos = n
    post = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}}}]}
    _write_json(d / "tokenizer.json", _tokenizer_json(vocab, merges, added, _split_pre(_LLAMA3_RE), post))
    decoder = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    _write_json(d / "tokenizer_config.json", {
        "added_tokens_decoder": decoder, "bos_token": "<|begin_of_text|>", "chat_template": _CHAT_LLAMA3,
        "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    _write_json(d / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 131072,
           "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "tie_word_embeddings": True, "vocab_size": n + len(specials), "bos_token_id": bos,
           "eos_token_id": [n + 1, n + 7], "hidden_act": "silu", "torch_dtype": "bfloat16",
           "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", _weights(3, cfg, tied=True), "BF16")
    _write_json(d / "generation_config.json", {"bos_token_id": bos, "do_sample": True, "eos_token_id": [n + 1, n + 7],
                                               "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1})


def build_qwen(d: Path, text: str, arch: str) -> None:
    qwen3 = arch.startswith("Qwen3")
    vocab, merges = train_bpe(text[:60_000], 340 if qwen3 else 330)
    n = len(vocab)
    specials = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                ("<tool_call>", False), ("</tool_call>", False)]
    if qwen3:
        specials += [("<think>", False), ("</think>", False)]
    added = [_added(n + i, s, sp) for i, (s, sp) in enumerate(specials)]
    for a in added:
        vocab[a["content"]] = a["id"]
    post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj = _tokenizer_json(vocab, merges, added, _split_pre(_QWEN2_RE), post, normalizer={"type": "NFC"},
                         merges_as_pairs=qwen3, ignore_merges=False)
    tj["pre_tokenizer"]["pretokenizers"][1]["trim_offsets"] = False
    _write_json(d / "tokenizer.json", tj)
    decoder = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    _write_json(d / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": _CHAT_CHATML, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    vocab_size = (n + len(specials) + 63) // 64 * 64   # padded, as Qwen's 151936
    if qwen3:
        cfg = {"architectures": [arch], "model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
               "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
               "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": vocab_size,
               "bos_token_id": n, "eos_token_id": n + 2, "attention_bias": False, "hidden_act": "silu",
               "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28, "torch_dtype": "float16"}
        weights, dtype = _weights(5, cfg, qk_norm=True), "F16"
        if arch == "Qwen3MoeForCausalLM":
            cfg.update(model_type="qwen3_moe", intermediate_size=768, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                       output_router_logits=False, router_aux_loss_coef=0.001, torch_dtype="bfloat16")
            weights, dtype = _weights(6, cfg, qk_norm=True), "BF16"
    else:
        cfg = {"architectures": [arch], "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
               "tie_word_embeddings": True, "vocab_size": vocab_size, "bos_token_id": n, "eos_token_id": n,
               "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768,
               "max_window_layers": 21, "torch_dtype": "bfloat16"}
        weights, dtype = _weights(4, cfg, bias=True, tied=True), "BF16"
        if arch == "Qwen2MoeForCausalLM":
            cfg.update(model_type="qwen2_moe", intermediate_size=768, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=256, shared_expert_intermediate_size=512, norm_topk_prob=False,
                       decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, tie_word_embeddings=False,
                       output_router_logits=False, router_aux_loss_coef=0.001)
            weights = _weights(7, cfg, bias=True)
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", weights, dtype)
    _write_json(d / "generation_config.json", {"bos_token_id": n, "do_sample": True, "eos_token_id": [n + 2, n],
                                               "pad_token_id": n, "repetition_penalty": 1.05, "temperature": 0.7,
                                               "top_k": 20, "top_p": 0.8})


def build_smollm(d: Path, text: str) -> None:
    vocab, merges = train_bpe(text[:40_000], 200)
    n = len(vocab)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = [_added(n + i, s) for i, s in enumerate(specials)]
    for a in added:
        vocab[a["content"]] = a["id"]
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    _write_json(d / "tokenizer.json", _tokenizer_json(vocab, merges, added, pre, post, ignore_merges=False,
                                                      merges_as_pairs=False))
    decoder = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    _write_json(d / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": "<|im_start|>",
        "chat_template": _CHAT_CHATML, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "model_max_length": 8192, "pad_token": "<|im_end|>", "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>", "vocab_size": n + len(specials)})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
           "rope_theta": 100000, "tie_word_embeddings": True, "vocab_size": n + len(specials),
           "bos_token_id": n + 1, "eos_token_id": n + 2, "pad_token_id": n + 2, "torch_dtype": "bfloat16"}
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", _weights(6, cfg, tied=True), "BF16")


_CHAT_PHI3 = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
              "'<|end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
              "{{ eos_token }}{% endif %}")


def build_phi3(d: Path, spm_model: bytes, n_sp: int) -> None:
    """Phi-3 / Phi-4-mini's layout: Q/K/V in one qkv_proj, gate and up in one gate_up_proj (gate
    first), LongRoPE factors for the rotated 3/4 of each head, Phi-3's added tokens (in
    added_tokens.json, tokenizer_config.json and tokenizer.json) past the SentencePiece pieces."""
    rot_half = 256 // 4 * 3 // 4 // 2  # head_dim 64 * partial_rotary_factor 0.75 / 2
    cfg = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 1024, "original_max_position_embeddings": 256,
           "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
           "rope_scaling": {"long_factor": [round(1.0 + 0.75 * i, 4) for i in range(rot_half)],
                            "short_factor": [round(1.0 + 0.01 * i, 4) for i in range(rot_half)],
                            "type": "longrope"},
           "sliding_window": 2047, "tie_word_embeddings": False, "vocab_size": n_sp + 8,
           "bos_token_id": 1, "eos_token_id": n_sp, "pad_token_id": n_sp, "hidden_act": "silu",
           "attention_bias": False, "torch_dtype": "bfloat16"}
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", _phi3_weights(7, cfg), "BF16")
    extra = [(n_sp, "<|endoftext|>", True), (n_sp + 1, "<|assistant|>", True), (n_sp + 2, "<|placeholder1|>", True),
             (n_sp + 3, "<|end|>", True), (n_sp + 4, "<|user|>", True), (n_sp + 5, "<tool>", False)]
    _spm_folder(d, spm_model, n_sp, extra, _CHAT_PHI3)
    (d / "added_tokens.json").write_text(json.dumps({c: t for t, c, _ in extra}), encoding="utf-8")
    base = [(0, "<unk>", True), (1, "<s>", True), (2, "</s>", True)]
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [_added(t, c, sp) for t, c, sp in base + extra], "normalizer": None,
          "pre_tokenizer": None, "post_processor": None, "decoder": None,
          "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "byte_fallback": True, "vocab": {}, "merges": []}}
    _write_json(d / "tokenizer.json", tj)
    _write_json(d / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [n_sp, n_sp + 3], "pad_token_id": n_sp})


def _phi3_weights(seed: int, cfg: dict) -> dict[str, np.ndarray]:
    """Phi-3's fused matrices: qkv_proj = [q; k; v], gate_up_proj = [gate; up] (rows)."""
    w = _weights(seed, cfg, tied=cfg["tie_word_embeddings"])
    fused = {}
    for name, a in w.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            p = name.replace("q_proj", "{}")
            fused[name.replace("q_proj", "qkv_proj")] = np.concatenate([w[p.format(x)] for x in ("q_proj", "k_proj", "v_proj")])
        elif ".gate_proj." in name:
            fused[name.replace("gate_proj", "gate_up_proj")] = np.concatenate([a, w[name.replace("gate_proj", "up_proj")]])
        else:
            fused[name] = a
    return fused


def build_phi4(d: Path, text: str) -> None:
    """Phi-4-mini's layout: Phi3ForCausalLM with a GPT2Tokenizer (byte-level BPE, GPT-4o's
    pre-tokenizer regex), the vocabulary padded in config.json, tied embeddings, partial rotary
    0.75 with LongRoPE factors."""
    vocab, merges = train_bpe(text[:60_000], 350)
    n = len(vocab)
    specials = [("<|endoftext|>", True), ("<|system|>", True), ("<|end|>", True), ("<|user|>", True),
                ("<|assistant|>", True), ("<|tool|>", True)]
    added = [_added(n + i, s, sp) for i, (s, sp) in enumerate(specials)]
    for a in added:
        vocab[a["content"]] = a["id"]
    post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj = _tokenizer_json(vocab, merges, added, _split_pre(_GPT4O_RE), post, ignore_merges=False,
                         merges_as_pairs=False)
    tj["pre_tokenizer"]["pretokenizers"][1]["trim_offsets"] = False
    _write_json(d / "tokenizer.json", tj)
    decoder = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    _write_json(d / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
        "bos_token": "<|endoftext|>", "chat_template": _CHAT_PHI3, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>"})
    rot_half = 256 // 4 * 3 // 4 // 2  # head_dim 64 * partial_rotary_factor 0.75 / 2
    cfg = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 2048, "original_max_position_embeddings": 512,
           "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
           "rope_scaling": {"long_factor": [round(1.0 + 0.5 * i, 4) for i in range(rot_half)],
                            "short_factor": [round(1.0 + 0.02 * i, 4) for i in range(rot_half)],
                            "type": "longrope"},
           "sliding_window": 262144, "tie_word_embeddings": True, "vocab_size": n + len(specials) + 10,
           "bos_token_id": n, "eos_token_id": n, "pad_token_id": n, "hidden_act": "silu",
           "attention_bias": False, "full_attn_mod": 1, "lm_head_bias": False, "torch_dtype": "bfloat16"}
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", _phi3_weights(8, cfg), "BF16")
    _write_json(d / "generation_config.json", {"bos_token_id": n, "eos_token_id": [n, n + 2], "pad_token_id": n})


_CHAT_GEMMA = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + "
               "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<start_of_turn>model\n' }}{% endif %}")


def _gemma_weights(seed: int, cfg: dict, *, qk_norm: bool = False) -> dict[str, np.ndarray]:
    """Gemma's layout: RMSNorm weights w stored for (1 + w) (so around 0), four norms a block
    (input, post-attention, pre- and post-feedforward), tied embeddings."""
    w = _weights(seed, cfg, qk_norm=qk_norm, tied=True)
    rng = np.random.default_rng(seed + 100)
    out = {}
    for name, a in w.items():
        if name.endswith("norm.weight"):
            a = (a - np.float32(1.0)).astype(np.float32)
        elif name.endswith(("q_proj.weight", "k_proj.weight")):  # scores of a few units, which the
            a = (a * np.float32(5.0)).astype(np.float32)           # soft-cap bends, softmax not flat
        elif name == "model.embed_tokens.weight":  # a residual stream above the post-normed blocks'
            a = (a * np.float32(10.0)).astype(np.float32)  # outputs (logits of a few units)
        out[name] = a
        if name.endswith("post_attention_layernorm.weight"):
            p = name.rpartition("post_attention_layernorm")[0]
            for extra in ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"):
                out[p + extra] = (rng.standard_normal(a.shape, dtype=np.float32) * np.float32(0.1)).astype(np.float32)
    return out


def _gemma_tokenizer(d: Path, spm_model: bytes, n_sp: int) -> None:
    extra = [(n_sp, "<start_of_turn>", True), (n_sp + 1, "<end_of_turn>", True)]
    _spm_folder(d, spm_model, n_sp, extra, _CHAT_GEMMA)
    tc = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "GemmaTokenizer"
    tc["add_bos_token"], tc["add_eos_token"] = True, False
    _write_json(d / "tokenizer_config.json", tc)


def build_gemma2(d: Path, spm_model: bytes, n_sp: int) -> None:
    """Gemma 2's layout and numerics, small: a sliding window of 32 on the even layers (the
    tests' prompts are longer), soft-caps low enough that random weights reach them."""
    cfg = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024, "rms_norm_eps": 1e-06,
           "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0,
           "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 64,
           "sliding_window": 32, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
           "tie_word_embeddings": True, "vocab_size": n_sp + 2, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 0, "torch_dtype": "bfloat16"}
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", _gemma_weights(8, cfg), "BF16")
    _gemma_tokenizer(d, spm_model, n_sp)
    _write_json(d / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, n_sp + 1], "pad_token_id": 0})


def _gemma3_text_config(n_sp: int) -> dict:
    return {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024, "rms_norm_eps": 1e-06,
            "query_pre_attn_scalar": 64, "sliding_window": 32, "hidden_activation": "gelu_pytorch_tanh",
            "vocab_size": n_sp + 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def build_gemma3(d: Path, spm_model: bytes, n_sp: int) -> None:
    """Gemma 3's text model, small: 6 layers so that llama.cpp's pattern (every 6th layer
    global) has both kinds, a window of 32 below the tests' prompts, two rope bases."""
    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **_gemma3_text_config(n_sp),
           "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
           "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    _write_json(d / "config.json", cfg)
    write_safetensors(d / "model.safetensors", _gemma3_weights(11, cfg), "BF16")
    _gemma_tokenizer(d, spm_model, n_sp)
    _write_json(d / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, n_sp + 1], "pad_token_id": 0})


def _gemma3_weights(seed: int, cfg: dict) -> dict[str, np.ndarray]:
    """_gemma_weights with Q/K norms; Q/K and the embeddings unscaled (the Q/K norms set the
    scores' size; without soft-capping, logits of a few units want a small embedding)."""
    w = _gemma_weights(seed, cfg, qk_norm=True)
    for name in w:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w[name] = (w[name] / np.float32(5.0)).astype(np.float32)
        elif name == "model.embed_tokens.weight":
            w[name] = (w[name] / np.float32(10.0)).astype(np.float32)
    return w


def build_gemma3_vl(d: Path, spm_model: bytes, n_sp: int) -> None:
    """Gemma3ForConditionalGeneration as the hub's checkpoints store it (language_model.model.*,
    vision_tower.*, multi_modal_projector.*): only the text model is converted. Its
    text_config leaves rope_theta and the local base to Gemma3TextConfig's defaults and scales
    the global layers' rope linearly by 8 (as Gemma 3 4B); the embedding has 6 rows beyond
    vocab_size, which the converter drops."""
    text = {"model_type": "gemma3_text", **_gemma3_text_config(n_sp),
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "final_logit_softcapping": 5.0}
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "boi_token_index": n_sp, "eoi_token_index": n_sp + 1, "image_token_index": n_sp + 1,
           "mm_tokens_per_image": 4, "text_config": text,
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "image_size": 32,
                             "patch_size": 16, "intermediate_size": 64, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "vision_use_head": False},
           "torch_dtype": "bfloat16"}
    _write_json(d / "config.json", cfg)
    w = _gemma3_weights(12, {**text, "vocab_size": text["vocab_size"] + 6})
    rng = np.random.default_rng(13)
    out = {f"language_model.{k}": v for k, v in w.items()}
    for name, shape in (("vision_tower.vision_model.embeddings.patch_embedding.weight", (32, 3, 16, 16)),
                        ("vision_tower.vision_model.post_layernorm.weight", (32,)),
                        ("multi_modal_projector.mm_input_projection_weight", (32, 256)),
                        ("multi_modal_projector.mm_soft_emb_norm.weight", (32,))):
        out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)
    write_safetensors(d / "model.safetensors", out, "BF16")
    _gemma_tokenizer(d, spm_model, n_sp)
    _write_json(d / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, n_sp + 1], "pad_token_id": 0})


def build(dest: str | Path, names: list[str] | None = None, text_path: str | Path | None = None) -> dict[str, Path]:
    """Build the fixtures (all, or `names`) under `dest`; returns name -> folder."""
    dest = Path(dest)
    text_path = Path(text_path) if text_path is not None else DEFAULT_TEXT
    if not text_path.is_file():
        raise FileNotFoundError(f"training text {text_path} not found (shared/text/calibration)")
    text = _training_text(text_path)
    names = list(FIXTURES) if names is None else list(names)
    out = {}
    spm_model = n_sp = None
    for name in names:
        if name not in FIXTURES:
            raise KeyError(name)
        d = dest / name
        d.mkdir(parents=True, exist_ok=True)
        if (name.endswith("-spm") or name in ("tiny-phi3", "tiny-gemma2", "tiny-gemma3", "tiny-gemma3-vl",
                                              "tiny-mixtral")) and spm_model is None:
            import sentencepiece as spm
            spm_model = train_sentencepiece(text)
            n_sp = spm.SentencePieceProcessor(model_proto=spm_model).vocab_size()
        if name == "tiny-llama-spm":
            build_llama_spm(d, spm_model, n_sp)
        elif name == "tiny-mistral-spm":
            build_mistral_spm(d, spm_model, n_sp)
        elif name == "tiny-llama3-bpe":
            build_llama3_bpe(d, text)
        elif name == "tiny-qwen2":
            build_qwen(d, text, "Qwen2ForCausalLM")
        elif name == "tiny-qwen3":
            build_qwen(d, text, "Qwen3ForCausalLM")
        elif name == "tiny-qwen3moe":
            build_qwen(d, text, "Qwen3MoeForCausalLM")
        elif name == "tiny-qwen2moe":
            build_qwen(d, text, "Qwen2MoeForCausalLM")
        elif name == "tiny-mixtral":
            build_mixtral(d, spm_model, n_sp)
        elif name == "tiny-smollm":
            build_smollm(d, text)
        elif name == "tiny-phi3":
            build_phi3(d, spm_model, n_sp)
        elif name == "tiny-phi4":
            build_phi4(d, text)
        elif name == "tiny-gemma2":
            build_gemma2(d, spm_model, n_sp)
        elif name == "tiny-gemma3":
            build_gemma3(d, spm_model, n_sp)
        elif name == "tiny-gemma3-vl":
            build_gemma3_vl(d, spm_model, n_sp)
        out[name] = d
    return out


# ---------------------------------------------------------------------------------------------
# what a GGUF file holds, as recorded in tests/data/hf_reference/*.json
# ---------------------------------------------------------------------------------------------

def _digest(value) -> dict:
    blob = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return {"len": len(value), "sha256": hashlib.sha256(blob).hexdigest()}


def summarize_gguf(path: str | Path) -> dict:
    """The metadata (ordered [key, type, value], long strings and arrays of more than 16 items as
    their length and sha256) and the tensors ([name, ggml shape, type, sha256 of the bytes]) of a
    GGUF file, plus the sha256 of the whole file."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    metadata = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        main = field.types[0]
        if main == GGUFValueType.ARRAY:
            typ = f"ARRAY[{field.types[-1].name}]"
            value = [v.item() if hasattr(v, "item") else v for v in field.contents()]
            if len(value) > 16:
                value = _digest(value)
        else:
            typ = main.name
            value = field.contents()
            value = value.item() if hasattr(value, "item") else value
            if isinstance(value, str) and len(value) > 200:
                value = {"len": len(value), "sha256": hashlib.sha256(value.encode("utf-8")).hexdigest()}
        metadata.append([field.name, typ, value])
    tensors = [[t.name, [int(d) for d in t.shape], t.tensor_type.name,
                hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()] for t in reader.tensors]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"file_sha256": h.hexdigest(), "metadata": metadata, "tensors": tensors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest")
    ap.add_argument("--text", default=None, help=f"training text (default {DEFAULT_TEXT})")
    ap.add_argument("--only", nargs="*", default=None, choices=list(FIXTURES))
    args = ap.parse_args(argv)
    for name, d in build(args.dest, args.only, args.text).items():
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{d}  {size / 1e6:.1f} MB  {FIXTURES[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
