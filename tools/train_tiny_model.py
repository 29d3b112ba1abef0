"""Train kquant's own tiny Llama model (``data/tiny-llama``) from public-domain novels.

The project ships this model so that its main command has a real model to work on
(``kquant-quantize data/tiny-llama out.gguf Q4_K_M``, whose output llama.cpp then runs)
without downloading anything. It is a genuine Hugging Face ``LlamaForCausalLM`` with a
SentencePiece tokenizer laid out like Llama's, trained here on CPU.

Reproduce it with::

    pip install torch==2.13.0 transformers safetensors sentencepiece protobuf
    python tools/train_tiny_model.py --out data/tiny-llama --minutes 35

``--minutes`` times the first steps and then fixes the number of optimizer steps to fit the
budget; the chosen number is printed and written to the model's README. Given the seed and
the number of steps the run is deterministic, so ``--steps N`` (which skips the timing)
rebuilds the same weights with the same library versions on the same kind of CPU (one
thread; other CPUs may pick other kernels and differ in the last bits). If a slow machine
makes the time guard stop a run before its schedule ends, the README gives the command that
reproduces that too (``--steps STOP --schedule-steps N``).

Choices, and why:
- every dimension is a multiple of 256 (hidden 256, FFN 768, vocab 4096), so llama.cpp's
  K-quant mixes quantize every matrix with a K-quant instead of falling back;
- 4 heads of 64 with 2 key/value heads (GQA), so llama.cpp's GQA rules (attn_v/attn_k
  bumps in the mixes) are exercised;
- untied output matrix, so ``output.weight`` exists as in most real models;
- 4 layers in float32: about 5.2 M parameters, 21 MB, small enough to ship in git.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import math
import re
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

DEFAULT_BOOKS = "/work/shared/text/calibration/pg*.txt"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2  # Llama's special-token ids
SAMPLE_PROMPTS = ("It was a", "The whale", "Elizabeth said that")


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Book:
    """One Gutenberg ebook, cleaned, split into training and held-out text."""

    ebook: str  # "pg1342"
    title: str
    author: str
    train: str
    val: str


def strip_gutenberg(raw: str) -> str:
    """Keep only the book: the text between the '*** START OF' and '*** END OF' lines."""
    lines = raw.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("*** END OF"))
    return "\n".join(lines[start + 1 : end])


def unwrap_paragraphs(text: str) -> list[str]:
    """Gutenberg hard-wraps lines at ~70 columns; join each paragraph into one line.

    A language model should learn where sentences go, not where a 1990s typesetter broke
    lines, and one paragraph per line is also the shape of most evaluation text.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        joined = " ".join(block.split())
        if joined:
            paragraphs.append(joined)
    return paragraphs


def header_field(raw: str, name: str) -> str:
    match = re.search(rf"^{name}:\s*(.+)$", raw, flags=re.MULTILINE)
    return match.group(1).strip() if match else "?"


def load_books(paths: list[Path], val_fraction: float) -> list[Book]:
    """Read and clean each book; the last ``val_fraction`` of each one is held out.

    Holding out the end of *every* book (at a paragraph boundary) keeps the validation
    set representative of all five authors rather than only of the last book.
    """
    books = []
    for path in paths:
        raw = path.read_text(encoding="utf-8-sig")
        paragraphs = unwrap_paragraphs(strip_gutenberg(raw))
        total = sum(len(p) + 1 for p in paragraphs)
        cut, seen = len(paragraphs), 0
        for i, p in enumerate(paragraphs):
            seen += len(p) + 1
            if seen > total * (1.0 - val_fraction):
                cut = i + 1
                break
        books.append(
            Book(
                ebook=path.stem,
                title=header_field(raw, "Title"),
                author=header_field(raw, "Author"),
                train="\n".join(paragraphs[:cut]) + "\n",
                val="\n".join(paragraphs[cut:]) + "\n",
            )
        )
    return books


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(books: list[Book], vocab_size: int, out_dir: Path) -> spm.SentencePieceProcessor:
    """Train a BPE SentencePiece model with Llama's settings; write tokenizer.model.

    The options are those of Llama 2's tokenizer.model (identity normalization, dummy
    prefix, digits split, byte fallback, <unk>/<s>/</s> = 0/1/2), so llama.cpp and
    transformers treat it as an ordinary Llama SPM vocabulary. Only training text is used.
    """
    # Paragraphs go in through an iterator and the model comes back through a writer, so the
    # saved trainer_spec holds no temporary file names: the file is byte-for-byte reproducible.
    paragraphs = [line for book in books for line in book.train.split("\n") if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        unk_surface=" \u2047 ",
        max_sentence_length=1 << 16,  # whole paragraphs are the "sentences"
        input_sentence_size=0,  # use every paragraph: no random subsampling
        shuffle_input_sentence=False,
        num_threads=1,  # single-threaded: deterministic and polite on a shared box
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))


def encode_stream(sp: spm.SentencePieceProcessor, texts: list[str]) -> torch.Tensor:
    """Tokenize each book as one string (as llama.cpp's perplexity tool would), </s> between."""
    ids: list[int] = []
    for text in texts:
        ids.extend(sp.encode(text))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def write_tokenizer_configs(out_dir: Path, max_length: int) -> None:
    """The JSON files transformers' LlamaTokenizer expects beside tokenizer.model."""
    special = {
        str(UNK_ID): "<unk>",
        str(BOS_ID): "<s>",
        str(EOS_ID): "</s>",
    }
    added_tokens_decoder = {
        idx: {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for idx, content in special.items()
    }
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,  # plain SentencePiece behaviour, as llama.cpp tokenizes
        "model_max_length": max_length,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_tokens_map = {
        name: {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for name, content in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    }
    dump_json(out_dir / "tokenizer_config.json", tokenizer_config)
    dump_json(out_dir / "special_tokens_map.json", special_tokens_map)


def dump_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace):
    """A transformers LlamaForCausalLM, so the saved weights follow HF conventions exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_positions,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        use_cache=True,
    )
    torch.manual_seed(args.seed)  # the initial weights come from the global generator
    model = LlamaForCausalLM(config)
    return model.float()


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; decay only the matrices (norm gains and embeddings stay undecayed, as usual)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim == 2 and "embed_tokens" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warmup over a fixed number of steps, then cosine decay to floor * peak.

    The warmup does not depend on ``total``, so the steps used to time the machine (all
    inside the warmup) are the same whatever total they lead to: runs stay reproducible.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_from(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs are <s> followed by the window's first seq_len-1 tokens; targets the window.

    Starting every sequence with <s> matches inference (llama.cpp and transformers add
    BOS) and llama.cpp's perplexity tool, which puts BOS at the start of each chunk.
    """
    windows = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    bos = torch.full((windows.shape[0], 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, windows[:, :-1]], dim=1), windows


def loss_on(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, batch: int) -> float:
    """Mean next-token loss (nats) over every non-overlapping window of the held-out text."""
    model.eval()
    starts = torch.arange(0, len(stream) - seq_len + 1, seq_len)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        inputs, targets = batch_from(stream, starts[i : i + batch], seq_len)
        total += loss_on(model, inputs, targets).item() * targets.numel()
        count += targets.numel()
    model.train()
    return total / count


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainResult:
    steps: int  # optimizer steps run
    schedule_steps: int  # length of the learning-rate schedule (more only if cut short)
    seconds: float
    tokens_seen: int
    train_loss: float
    val_loss: float
    stopped_early: bool
    log: list[str]


def train(model, train_ids: torch.Tensor, val_ids: torch.Tensor, args: argparse.Namespace) -> TrainResult:
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    sampler = torch.Generator().manual_seed(args.seed + 1)  # batch order, separate from init
    log: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        log.append(line)

    t0 = time.monotonic()
    val_loss = evaluate(model, val_ids, args.seq_len, args.batch)
    eval_seconds = time.monotonic() - t0
    say(f"step 0: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f}), eval took {eval_seconds:.1f}s")

    total = args.schedule_steps or args.steps  # length of the cosine schedule
    stop = args.steps  # steps actually run (fewer than total only to reproduce a cut-short run)
    timing_from, timing_to = 3, 3 + args.timing_steps  # skip the first, slower steps
    recent: list[float] = []
    train_loss = float("nan")
    step, stopped_early = 0, False
    t_start = time.monotonic()
    while (total is None or step < total) and (stop is None or step < stop):
        lr = learning_rate(step, total or 10**9, args.lr, args.warmup, args.lr_floor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len, (args.batch,), generator=sampler)
        inputs, targets = batch_from(train_ids, starts, args.seq_len)
        loss = loss_on(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        recent.append(loss.item())
        step += 1

        if step == timing_from:
            t_timing = time.monotonic()
        if total is None and step == timing_to:
            # Fix the step count now, from the measured speed, so the cosine has an end.
            per_step = (time.monotonic() - t_timing) / (timing_to - timing_from)
            per_step += eval_seconds / args.eval_every
            left = args.minutes * 60 - (time.monotonic() - args.t_launch) - 2 * eval_seconds - 60
            total = max(args.warmup + 1, step + int(left / per_step))
            say(f"timing: {per_step:.2f}s/step incl. eval -> {total} steps fit in {args.minutes} min "
                f"(rerun with --steps {total} to reproduce without timing)")

        if step % args.eval_every == 0 or step == total or step == stop:
            train_loss = sum(recent) / len(recent)
            recent.clear()
            val_loss = evaluate(model, val_ids, args.seq_len, args.batch)
            elapsed = time.monotonic() - t_start
            tok_s = step * args.batch * args.seq_len / elapsed
            say(f"step {step}/{total}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                f"(ppl {math.exp(val_loss):.1f}), lr {lr:.2e}, {elapsed / 60:.1f} min, {tok_s:.0f} tok/s")
        # A safety net if the machine slows down badly: stop rather than overrun by hours.
        if args.steps is None and time.monotonic() - args.t_launch > args.minutes * 60 * 1.25:
            say(f"stopping early at step {step}: over 125% of the {args.minutes} min budget")
            stopped_early = True
            break

    if recent:  # the last partial interval (only after a cut-short run)
        train_loss = sum(recent) / len(recent)
        val_loss = evaluate(model, val_ids, args.seq_len, args.batch)
    return TrainResult(step, total, time.monotonic() - t_start, step * args.batch * args.seq_len,
                       train_loss, val_loss, stopped_early, log)


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(model, sp: spm.SentencePieceProcessor, prompt: str, n_tokens: int,
             temperature: float, top_k: int, seed: int) -> str:
    """Greedy (temperature 0) or top-k sampling, with its own seeded generator."""
    model.eval()
    rng = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + sp.encode(prompt)
    for _ in range(n_tokens):
        context = torch.tensor([ids[-model.config.max_position_embeddings :]])
        logits = model(input_ids=context, use_cache=False).logits[0, -1]
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            values, indices = torch.topk(logits / temperature, top_k)
            next_id = int(indices[torch.multinomial(F.softmax(values, dim=-1), 1, generator=rng)])
        if next_id == EOS_ID:
            break
        ids.append(next_id)
    return sp.decode(ids[1:])


def make_samples(model, sp: spm.SentencePieceProcessor, seed: int) -> list[tuple[str, str, str]]:
    samples = []
    for prompt in SAMPLE_PROMPTS:
        samples.append((prompt, "greedy", generate(model, sp, prompt, 60, 0.0, 1, seed)))
        samples.append((prompt, "temperature 0.8, top-k 40, seed %d" % seed,
                        generate(model, sp, prompt, 60, 0.8, 40, seed)))
    return samples


# --------------------------------------------------------------------------- saving


def save_model(model, out_dir: Path) -> None:
    """config.json, generation_config.json and model.safetensors, written by transformers."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model.save_pretrained(out_dir, safe_serialization=True)


def verify(model, sp: spm.SentencePieceProcessor, out_dir: Path) -> list[str]:
    """Reload the saved folder with transformers' Auto classes; the logits and the token ids
    must equal those of the model and tokenizer that were just trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    text = "It was a truth universally acknowledged, 1813 times, that Ahab's whale—\u00e9t\u00e9!"
    hf_ids = tokenizer(text)["input_ids"]
    sp_ids = [BOS_ID] + sp.encode(text)
    if hf_ids != sp_ids:
        raise RuntimeError(f"tokenizer mismatch: transformers {hf_ids} vs sentencepiece {sp_ids}")
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([sp_ids])
        diff = (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"reloaded logits differ by {diff}")
    return [
        f"{type(reloaded).__name__} and {type(tokenizer).__name__} load from the folder with "
        "transformers' Auto classes;",
        f"the reloaded logits equal the trained model's exactly, and the tokenizer gives the "
        f"same ids as sentencepiece ({len(sp_ids)} tokens of a test sentence).",
    ]


def folder_size(out_dir: Path) -> int:
    return sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())


def write_readme(out_dir: Path, args: argparse.Namespace, books: list[Book], n_params: int,
                 n_train: int, n_val: int, result: TrainResult,
                 samples: list[tuple[str, str, str]], checks: list[str]) -> None:
    import sentencepiece
    import transformers

    command = "python tools/train_tiny_model.py " + " ".join(sys.argv[1:])
    exact = (f"python tools/train_tiny_model.py --out {args.out} --steps {result.steps} "
             f"--seed {args.seed}")
    if result.schedule_steps != result.steps:
        exact += f" --schedule-steps {result.schedule_steps}"
    book_lines = "\n".join(
        f"- *{b.title}*, {b.author} (Project Gutenberg ebook #{b.ebook[2:]}, `{b.ebook}.txt`)"
        for b in books
    )
    sample_blocks = "\n\n".join(
        f"Prompt `{p}`, {how}:\n\n" + "\n".join(f"> {line}" for line in text.splitlines())
        for p, how, text in samples
    )
    log = "\n".join(result.log)
    early = (f" of a {result.schedule_steps}-step schedule (cut short by the time guard)"
             if result.schedule_steps != result.steps else "")
    readme = f"""# tiny-llama: kquant's own tiny test model

A real, if very small, Llama language model in Hugging Face format, trained from scratch by
`tools/train_tiny_model.py` so that kquant can ship a model and quantize it with its main
command (`kquant-quantize data/tiny-llama out.gguf Q4_K_M`), then run the result in llama.cpp.
It writes recognisable English words and some syntax; it is a test fixture, not a useful model.

## Use

```sh
kquant-quantize data/tiny-llama out.gguf Q4_K_M
```

or with transformers: `AutoModelForCausalLM.from_pretrained("data/tiny-llama")` and
`AutoTokenizer.from_pretrained("data/tiny-llama")` (the tokenizer needs `sentencepiece` and
`protobuf`).

Files: `config.json`, `generation_config.json` and `model.safetensors` as transformers
{transformers.__version__} writes them (its config spells the dtype `dtype` and puts RoPE theta
in `rope_parameters`, where transformers 4 wrote `torch_dtype` and `rope_theta`);
`tokenizer.model` (SentencePiece), `tokenizer_config.json`, `special_tokens_map.json`.

## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM` (transformers), float32 safetensors |
| parameters | {n_params:,} |
| layers | {args.layers} |
| hidden size | {args.hidden} |
| FFN (intermediate) size | {args.ffn} |
| attention heads / KV heads | {args.heads} / {args.kv_heads} (GQA, head dim {args.hidden // args.heads}) |
| vocabulary | {args.vocab_size} (SentencePiece BPE with byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2) |
| context | {args.max_positions} positions (trained on sequences of {args.seq_len}) |
| RoPE theta / RMSNorm eps | 10000 / 1e-5 |
| output matrix | untied (`lm_head.weight` is its own tensor) |

Every dimension is a multiple of 256, so llama.cpp's K-quant mixes give every matrix a
K-quant; the 2 KV heads exercise llama.cpp's GQA rules.

## Data

Five public-domain novels from Project Gutenberg (`shared/text/calibration/`):

{book_lines}

The Project Gutenberg header and footer were removed (only the text between the
`*** START OF` and `*** END OF` lines is used) and hard-wrapped lines were joined so that
each paragraph is one line. The last {args.val_fraction:.0%} of each book is held out for
validation. Training tokens: {n_train:,}; validation tokens: {n_val:,}. The tokenizer was
trained on the training text only. Nothing from the evaluation set (`shared/text/eval`) was
used.

## Training

Command: `{command}`

Same weights, without the timing step: `{exact}`

- seed {args.seed}; PyTorch {torch.__version__} on CPU, 1 thread; transformers
  {transformers.__version__}; sentencepiece {sentencepiece.__version__}
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak learning rate
  {args.lr}, {args.warmup} warmup steps then cosine decay to {args.lr_floor:g} of the peak,
  gradient clipping {args.clip}
- batch {args.batch} x {args.seq_len} tokens, each sequence starting with `<s>`
- {result.steps} steps{early}, {result.tokens_seen:,} tokens seen, {result.seconds / 60:.1f} minutes

## Result

- final train loss {result.train_loss:.4f} (mean over the last interval)
- final validation loss {result.val_loss:.4f} nats/token, perplexity {math.exp(result.val_loss):.1f}

Samples (60 tokens at most; prompt tokenized with `<s>` first):

{sample_blocks}

Verification:
{chr(10).join('- ' + c for c in checks)}

Training log:

```
{log}
```

## License

The weights and tokenizer are released under the MIT license, like kquant itself. The
training text is in the public domain (Project Gutenberg ebooks of public-domain works).
"""
    (out_dir / "README.md").write_text(readme, encoding="utf-8")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/tiny-llama"))
    p.add_argument("--books", default=DEFAULT_BOOKS, help="glob of Gutenberg .txt files")
    p.add_argument("--minutes", type=float, default=35.0,
                   help="wall-time budget; sets the step count after timing (ignored with --steps)")
    p.add_argument("--steps", type=int, default=None, help="exact number of optimizer steps")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the cosine schedule if not --steps (to reproduce a run cut short)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-floor", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--timing-steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps results identical across machines and leaves a core free")
    args = p.parse_args(argv)
    if args.steps is None and args.timing_steps + 3 >= args.warmup:
        p.error("--timing-steps must end inside the warmup")
    if args.schedule_steps is not None and args.steps is None:
        p.error("--schedule-steps needs --steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.t_launch = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    paths = sorted(Path(p) for p in glob.glob(args.books))
    if not paths:
        sys.exit(f"no books match {args.books}")
    books = load_books(paths, args.val_fraction)
    args.out.mkdir(parents=True, exist_ok=True)

    sp = train_tokenizer(books, args.vocab_size, args.out)
    write_tokenizer_configs(args.out, args.max_positions)
    train_ids = encode_stream(sp, [b.train for b in books])
    val_ids = encode_stream(sp, [b.val for b in books])
    print(f"{len(books)} books; {len(train_ids):,} training and {len(val_ids):,} validation tokens", flush=True)

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM with {n_params:,} parameters", flush=True)

    result = train(model, train_ids, val_ids, args)
    save_model(model, args.out)
    samples = make_samples(model, sp, args.seed)
    for prompt, how, text in samples:
        print(f"[{how}] {text}", flush=True)
    checks = verify(model, sp, args.out)
    write_readme(args.out, args, books, n_params, len(train_ids), len(val_ids), result, samples, checks)
    print(f"wrote {args.out} ({folder_size(args.out) / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
