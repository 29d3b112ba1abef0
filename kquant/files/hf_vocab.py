"""A Hugging Face tokenizer as GGUF tokenizer.ggml.* metadata, as llama.cpp's convert_hf_to_gguf.py writes it.

Two vocabulary kinds, read without transformers or tokenizers:

* `set_vocab_sentencepiece`: a SentencePiece tokenizer.model (tokens, scores, token types) plus
  added_tokens.json and tokenizer_config.json's added_tokens_decoder (TextModel._set_vocab_sentencepiece);
* `set_vocab_gpt2`: a byte-level BPE tokenizer.json (tokens, types, merges) (TextModel._set_vocab_gpt2).
  The converter names the BPE pre-tokenizer from the sha256 of the token ids a HF tokenizer
  gives for a fixed text; kquant names it from tokenizer.json's pre_tokenizer section instead
  (the regex and byte-level steps that select llama.cpp's pre-tokenizer types), see
  `BPE_PRE_TOKENIZERS` and `bpe_pre_tokenizer_name`.

`set_vocab` is the converter's default choice between the two; an architecture with quirks
of its own (kquant.archs.llama) calls the pieces itself.  `SpecialVocab` (special token ids,
add_bos/add_eos, merges, the chat template) is gguf's SpecialVocab as shipped with llama.cpp's
converter.  kquant.tokenizer has its own, separate table of what each pre-tokenizer name does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import gguf

from ..errors import ModelError
from .safetensors import read_json

__all__ = ["BPE_PRE_TOKENIZERS", "bpe_pre_tokenizer_name", "SpecialVocab", "set_vocab",
           "set_vocab_sentencepiece", "set_vocab_gpt2", "sentencepiece_pieces"]

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


class SpecialVocab:
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

    def set_special_token(self, typ: str, tid: Any) -> None:
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
            tokenizer = read_json(tokenizer_file, "tokenizer")
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
            tokenizer_config = read_json(tokenizer_config_file, "tokenizer config")
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
            chat_template_alt = read_json(chat_template_json, "chat template").get('chat_template')
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
            self.set_special_token(typ, maybe_token_id)

    def _try_load_from_config_json(self, path: Path) -> None:
        config_file = path / 'config.json'
        if not config_file.is_file():
            return
        config = read_json(config_file, "config")
        for typ in self.special_token_types:
            token_id = config.get(f'{typ}_token_id')
            if token_id is None and 'text_config' in config:
                token_id = config['text_config'].get(f'{typ}_token_id')
            self.set_special_token(typ, token_id)


def sentencepiece_pieces(folder: Path) -> list[tuple[bytes, float, int]]:
    """Every piece of the folder's SentencePiece tokenizer.model: (text, score, token type)."""
    from sentencepiece import SentencePieceProcessor

    tokenizer_path = folder / 'tokenizer.model'
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(tokenizer_path))
    except (OSError, RuntimeError) as e:
        raise ModelError(f"cannot load SentencePiece model {tokenizer_path}: {e}") from None
    out = []
    for token_id in range(sp.vocab_size()):
        toktype = _NORMAL
        if sp.IsUnknown(token_id):
            toktype = _UNKNOWN
        elif sp.IsControl(token_id):
            toktype = _CONTROL
        elif sp.IsUnused(token_id):
            toktype = _UNUSED
        elif sp.IsByte(token_id):
            toktype = _BYTE
        out.append((sp.IdToPiece(token_id).encode("utf-8"), sp.GetScore(token_id), toktype))
    return out


def set_vocab_sentencepiece(w: gguf.GGUFWriter, folder: Path, hp: dict[str, Any]) -> None:
    """TextModel._set_vocab_sentencepiece / _create_vocab_sentencepiece."""
    pieces = sentencepiece_pieces(folder)
    vocab_size = hp.get("vocab_size_per_layer_input", hp.get("vocab_size")) or len(pieces)

    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores: list[float] = [-10000.0] * vocab_size
    toktypes: list[int] = [_UNUSED] * vocab_size
    for token_id, (piece, score, toktype) in enumerate(pieces[:vocab_size]):
        tokens[token_id] = piece
        scores[token_id] = score
        toktypes[token_id] = toktype

    added_tokens_file = folder / 'added_tokens.json'
    if added_tokens_file.is_file():
        for key, token_id in read_json(added_tokens_file, "added tokens").items():
            if token_id >= vocab_size:
                continue
            tokens[token_id] = key.encode("utf-8")
            scores[token_id] = -1000.0
            toktypes[token_id] = _USER_DEFINED

    tokenizer_config_file = folder / 'tokenizer_config.json'
    if tokenizer_config_file.is_file():
        tc = read_json(tokenizer_config_file, "tokenizer config")
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
    SpecialVocab(folder, n_vocab=len(tokens)).add_to(w)


def set_vocab_gpt2(w: gguf.GGUFWriter, folder: Path, hp: dict[str, Any]) -> None:
    """TextModel._set_vocab_gpt2 / get_vocab_base, read from tokenizer.json without transformers."""
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise ModelError(f"{folder}: no tokenizer (neither tokenizer.model nor tokenizer.json)")
    tj = read_json(tj_path, "tokenizer")
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
    tc = read_json(tc_path, "tokenizer config") if tc_path.is_file() else {}
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
    SpecialVocab(folder, load_merges=True).add_to(w)



def set_vocab(w: gguf.GGUFWriter, folder: Path, hp: dict[str, Any]) -> None:
    """TextModel.set_vocab's usual choice: SentencePiece when there is a tokenizer.model, else
    byte-level BPE from tokenizer.json."""
    if (folder / "tokenizer.model").is_file():
        set_vocab_sentencepiece(w, folder, hp)
    else:
        set_vocab_gpt2(w, folder, hp)
