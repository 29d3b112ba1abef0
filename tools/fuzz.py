#!/usr/bin/env python3
"""Fuzz kquant's readers of untrusted files: GGUF models, imatrix files (GGUF and legacy .dat)
and safetensors folders.

Each target starts from a small valid seed file built here (kquant's own imatrix writers for
the imatrix seeds) and mutates it: byte flips, truncation, insertion, deletion, 8-byte fields
overwritten with extreme values, and structured changes that know the layout (a count, a
length, a value type made ARRAY, a tensor's offset, type or dimension; a safetensors header
entry). A mutated input passes when the reader either accepts it or refuses it with kquant's
own `ModelError`, in under TIME_LIMIT seconds and with less than MEMORY_LIMIT bytes allocated
above the file's size. Anything else is a finding: another exception (a traceback for the
user), a memory bomb, a hang, or a tensor whose loaded bytes differ from its declared size.

tests/test_fuzz.py runs these targets for a fixed number of examples (hypothesis drives the
mutations); this script runs them for as long as asked, with random mutations:

    python tools/fuzz.py --seconds 600                      # all targets, the time split evenly
    python tools/fuzz.py --seconds 120 --target gguf --out fuzz-findings

It prints the inputs tried, the time taken and each finding (its input saved under --out), and
ends with a one-line summary; the exit status is 1 when anything was found.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kquant.errors import ModelError  # noqa: E402

TIME_LIMIT = 2.0  # seconds per input
MEMORY_LIMIT = 32 << 20  # bytes traced above the input's size

# GGUF value types (gguf.GGUFValueType) and the struct format of the scalar ones
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
        U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


# ---- files with a map of their fields ----------------------------------------------------

@dataclass(frozen=True)
class Field:
    """A fixed-size little-endian integer of a file: what structured mutations change."""

    name: str
    offset: int
    size: int


def patch(data: bytes, f: Field, value: int) -> bytes:
    """`data` with field `f` set to `value` (wrapped to the field's width)."""
    out = bytearray(data)
    out[f.offset:f.offset + f.size] = (value % (1 << 8 * f.size)).to_bytes(f.size, "little")
    return bytes(out)


def _gguf_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype: int, value) -> bytes:
    """A KV value's bytes; an ARRAY value is (element type, items)."""
    if vtype == STRING:
        return _gguf_str(value)
    if vtype == ARRAY:
        sub, items = value
        return struct.pack("<IQ", sub, len(items)) + b"".join(gguf_value(sub, v) for v in items)
    return struct.pack(_FMT[vtype], value)


def gguf_bytes(kv: Sequence[tuple[str, int, object]],
               tensors: Sequence[tuple[str, tuple[int, ...], int, bytes]],
               alignment: int = 32, version: int = 3) -> bytes:
    """A GGUF file as gguf.cpp writes it: KV pairs (key, type, value), tensor infos (name,
    ggml shape, ggml type id, data) and each tensor's data padded to `alignment` (pass a
    general.alignment KV pair too when it is not 32)."""
    head = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(kv))]
    for key, vtype, value in kv:
        head.append(_gguf_str(key) + struct.pack("<I", vtype) + gguf_value(vtype, value))
    offset, blobs = 0, []
    for name, shape, ttype, data in tensors:
        head.append(_gguf_str(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
                    + struct.pack("<IQ", ttype, offset))
        blobs.append(data + bytes(-len(data) % alignment))
        offset += len(blobs[-1])
    raw = b"".join(head)
    return raw + bytes(-len(raw) % alignment) + b"".join(blobs)


class _Walker:
    """Reads a valid GGUF and records where each count, length, type and offset lies."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.fields = data, 4, []

    def take(self, name: str, size: int) -> int:
        self.fields.append(Field(name, self.pos, size))
        v = int.from_bytes(self.data[self.pos:self.pos + size], "little")
        self.pos += size
        return v

    def string(self, name: str) -> str:
        n = self.take(f"{name}.len", 8)
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8", "replace")

    def value(self, name: str, vtype: int) -> None:
        if vtype == STRING:
            self.string(name)
        elif vtype == ARRAY:
            sub = self.take(f"{name}.sub_type", 4)
            n = self.take(f"{name}.n", 8)
            for i in range(n):
                self.value(f"{name}[{i}]", sub)
        else:
            self.take(f"{name}.value", struct.calcsize(_FMT[vtype]))


def gguf_fields(data: bytes) -> list[Field]:
    """The field map of a valid GGUF file: 'version', 'n_tensors', 'n_kv'; for each key
    'kv.<key>.key_len', '.type', then its value's '.len' (a string), '.sub_type' and '.n' (an
    array; element i as 'kv.<key>[i].len' or '.value') or '.value'; for each tensor
    'tensor.<name>.name_len', '.n_dims', '.ne0'.., '.type', '.offset'."""
    w = _Walker(data)
    w.take("version", 4)
    n_tensors, n_kv = w.take("n_tensors", 8), w.take("n_kv", 8)
    for _ in range(n_kv):
        at = len(w.fields)
        key = w.string("kv")
        w.fields[at] = Field(f"kv.{key}.key_len", w.fields[at].offset, 8)
        w.value(f"kv.{key}", w.take(f"kv.{key}.type", 4))
    for _ in range(n_tensors):
        at = len(w.fields)
        name = w.string("tensor")
        w.fields[at] = Field(f"tensor.{name}.name_len", w.fields[at].offset, 8)
        n_dims = w.take(f"tensor.{name}.n_dims", 4)
        for j in range(n_dims):
            w.take(f"tensor.{name}.ne{j}", 8)
        w.take(f"tensor.{name}.type", 4)
        w.take(f"tensor.{name}.offset", 8)
    return w.fields


def field_map(fields: Sequence[Field]) -> dict[str, Field]:
    return {f.name: f for f in fields}


def dat_fields(data: bytes) -> list[Field]:
    """The field map of a valid legacy .dat imatrix: the entry count, each entry's name
    length, ncall and nval, then the chunk count and the dataset name length."""
    out, pos = [Field("n_entries", 0, 4)], 4
    (n,) = struct.unpack_from("<i", data, 0)
    for i in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        out.append(Field(f"entry{i}.len", pos, 4))
        pos += 4 + length
        (nval,) = struct.unpack_from("<i", data, pos + 4)
        out += [Field(f"entry{i}.ncall", pos, 4), Field(f"entry{i}.nval", pos + 4, 4)]
        pos += 8 + 4 * nval
    if pos + 8 <= len(data):
        out += [Field("chunk_count", pos, 4), Field("dataset.len", pos + 4, 4)]
    return out


# ---- seeds --------------------------------------------------------------------------------

@dataclass
class Seed:
    data: bytes
    fields: list[Field]
    kind: str  # "gguf", "dat" or "safetensors": which structured mutations apply


def model_gguf() -> bytes:
    """A small valid model GGUF: most value types, a string array, three tensors (F32 [8, 5],
    F16 [64], Q8_0 [32, 2]), alignment 64 (the F16 tensor fills two alignment units: declared
    F32 it would claim four)."""
    rng = np.random.default_rng(0)
    kv = [("general.architecture", STRING, "llama"), ("general.name", STRING, "fuzz"),
          ("general.alignment", U32, 64), ("llama.block_count", U32, 1),
          ("llama.rope.freq_base", F32, 10000.0), ("general.flag", BOOL, 1),
          ("general.big", U64, 1 << 40), ("general.neg", I64, -5), ("general.d", F64, 0.5),
          ("general.i8s", ARRAY, (I8, [1, -2, 3])),
          ("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "</s>", "a", "b\u00e9", "c"])),
          ("tokenizer.ggml.scores", ARRAY, (F32, [0.0, 0.0, -1.0, -2.0, -3.0]))]
    q8 = b"".join(np.float16(0.01).tobytes() + rng.integers(-127, 128, 32, np.int8).tobytes()
                  for _ in range(2))
    tensors = [("token_embd.weight", (8, 5), GGML_F32, rng.standard_normal(40, np.float32).tobytes()),
               ("blk.0.attn_norm.weight", (64,), GGML_F16, np.ones(64, np.float16).tobytes()),
               ("blk.0.ffn_down.weight", (32, 2), GGML_Q8_0, q8)]
    return gguf_bytes(kv, tensors, alignment=64)


def _imatrix():
    from kquant.calibration.imatrix_file import Imatrix, ImatrixEntry

    im = Imatrix(datasets=["calibration.txt"], chunk_count=2, chunk_size=64)
    im.entries["blk.0.attn_q.weight"] = ImatrixEntry(np.arange(1, 9, dtype=np.float32), np.array([128]))
    im.entries["blk.0.ffn_up_exps.weight"] = ImatrixEntry(np.ones(8, np.float32), np.array([64, 0]))
    return im


def _written(write: Callable[[object, Path], object]) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "seed"
        write(_imatrix(), p)
        return p.read_bytes()


def imatrix_gguf() -> bytes:
    from kquant.calibration.imatrix_file import save_imatrix_gguf

    return _written(save_imatrix_gguf)


def imatrix_dat() -> bytes:
    from kquant.calibration.imatrix_file import save_imatrix_legacy

    return _written(save_imatrix_legacy)


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], header: dict | None = None,
                      metadata: dict | None = None) -> bytes:
    """A safetensors file of (dtype, shape, data) tensors laid out in order; `header`, when
    given, is written instead of the one made from `tensors` (the data stays)."""
    made: dict = {"__metadata__": metadata or {"format": "pt"}}
    at = 0
    for name, (dtype, shape, data) in tensors.items():
        made[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(data)]}
        at += len(data)
    head = json.dumps(made if header is None else header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(d for _, _, d in tensors.values())


def safetensors_seed() -> bytes:
    rng = np.random.default_rng(1)
    return safetensors_bytes({
        "model.embed_tokens.weight": ("F32", [5, 4], rng.standard_normal(20, np.float32).tobytes()),
        "model.norm.weight": ("F16", [4], np.ones(4, np.float16).tobytes()),
        "lm_head.weight": ("BF16", [5, 4], rng.integers(0, 1 << 16, 20, np.uint16).tobytes()),
    })


def make_seed(target: str) -> Seed:
    if target == "gguf":
        data = model_gguf()
    elif target == "imatrix":
        data = imatrix_gguf()
    elif target == "dat":
        data = imatrix_dat()
        return Seed(data, dat_fields(data), "dat")
    else:
        data = safetensors_seed()
        return Seed(data, [Field("header.len", 0, 8)], "safetensors")
    return Seed(data, gguf_fields(data), "gguf")


# ---- mutations ----------------------------------------------------------------------------

class Chooser(Protocol):
    """Where a mutation's choices come from: random.Random here, hypothesis in the test."""

    def integer(self, lo: int, hi: int) -> int: ...

    def pick(self, options: Sequence): ...


class RandomChooser:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, options: Sequence):
        return options[self.rng.randrange(len(options))]


def extremes(size: int) -> list[int]:
    """Values at the edges of a `size`-byte field (signed and unsigned)."""
    top = 1 << 8 * size
    return [0, 1, 2, top - 1, top - 2, top // 2, top // 2 - 1, top // 4, 1 << 30, 1 << 31,
            1 << 32, 1 << 40, 1 << 62, 3, 4, 5, 7, 9, 13, 64, 65, 255, 256, 4096, 10**6]


def _flip(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    if d:
        d[ch.integer(0, len(d) - 1)] ^= 1 << ch.integer(0, 7)
    return d


def _byte(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    if d:
        d[ch.integer(0, len(d) - 1)] = ch.pick([0, 0xFF, 0x7F, 0x80, ch.integer(0, 255)])
    return d


def _truncate(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    return d[:ch.integer(0, max(len(d) - 1, 0))]


def _insert(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    at, n = ch.integer(0, len(d)), ch.pick([1, 2, 4, 8, 16, 64])
    return d[:at] + bytes([ch.pick([0, 0xFF, 0x41])]) * n + d[at:]


def _delete(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    at, n = ch.integer(0, len(d)), ch.pick([1, 2, 4, 8, 16, 64])
    return d[:at] + d[at + n:]


def _duplicate(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    at, n = ch.integer(0, len(d)), ch.pick([4, 8, 16, 32, 64])
    to = ch.integer(0, len(d))
    return d[:to] + d[at:at + n] + d[to:]


def _word(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    """8 (or 4) bytes anywhere set to an extreme value."""
    size = ch.pick([8, 4])
    if len(d) >= size:
        at = ch.integer(0, len(d) - size)
        d[at:at + size] = (ch.pick(extremes(size)) % (1 << 8 * size)).to_bytes(size, "little")
    return d


def _pick_field(fields: Sequence[Field], ch: Chooser) -> Field:
    """A field, its kind first (a dimension, an offset, a type...): the kinds equally likely,
    however many strings a seed's arrays hold."""
    kinds = sorted({f.name.rsplit(".", 1)[-1].rstrip("0123456789") for f in fields})
    kind = ch.pick(kinds)
    return ch.pick([f for f in fields if f.name.rsplit(".", 1)[-1].rstrip("0123456789") == kind])


def _field(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    """A known field set to an extreme value or moved by a small delta (an offset off the
    alignment, a count one too many)."""
    if not seed.fields:
        return d
    f = _pick_field(seed.fields, ch)
    if f.offset + f.size > len(d):
        return d
    old = int.from_bytes(d[f.offset:f.offset + f.size], "little")
    value = ch.pick([ch.pick(extremes(f.size)), old + ch.integer(-64, 64), old * 2, old // 2])
    return bytearray(patch(bytes(d), f, value))


def _vtype(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    """A GGUF value or tensor type field changed: a string made ARRAY, F16 declared F32..."""
    types = [f for f in seed.fields if f.name.endswith((".type", ".sub_type"))]
    if not types:
        return d
    f = ch.pick(types)
    if f.offset + f.size > len(d):
        return d
    return bytearray(patch(bytes(d), f, ch.pick([ARRAY, STRING, ch.integer(0, 44), 99, 4, 31])))


_WEIRD = [None, -1, 0, 1, 2**64, 2**63, 1.5, "x", "F32", "I64", "Q9", [], [1], [-1], [0, 0],
          [1, 0], [0, 2**70], [1.5], ["1"], [True], {"a": 1}, True, [[1]]]


def _json(d: bytearray, seed: Seed, ch: Chooser) -> bytearray:
    """A safetensors header changed as JSON: an entry's dtype, shape or offsets made odd, an
    entry added, copied or dropped, or the header made another kind of value."""
    try:
        n = int.from_bytes(d[:8], "little")
        header = json.loads(bytes(d[8:8 + n]))
        data = bytes(d[8 + n:])
    except (ValueError, RecursionError):
        return d
    names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    if not names:
        return d
    name = ch.pick(names)
    what = ch.pick(["dtype", "shape", "data_offsets", "entry", "add", "drop", "whole", "shift",
                    "metadata"])
    entry = header[name] if isinstance(header[name], dict) else {}
    if what in ("dtype", "shape", "data_offsets"):
        entry[what] = ch.pick(_WEIRD)
    elif what == "shift" and isinstance(entry.get("data_offsets"), list):
        entry["data_offsets"] = [o + ch.integer(-8, 8) if isinstance(o, int) else o
                                 for o in entry["data_offsets"]]
    elif what == "entry":
        header[name] = ch.pick(_WEIRD)
    elif what == "add":
        header[name + ".copy"] = dict(entry)
    elif what == "drop":
        del header[name]
    elif what == "metadata":
        header["__metadata__"] = ch.pick(_WEIRD)
    else:
        header = ch.pick(_WEIRD)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return bytearray(struct.pack("<Q", len(head)) + head + data)


_BYTE_OPS = [_flip, _byte, _truncate, _insert, _delete, _duplicate, _word]
_OPS = {"gguf": _BYTE_OPS + [_field, _field, _vtype, _vtype],
        "dat": _BYTE_OPS + [_field, _field],
        "safetensors": _BYTE_OPS + [_field, _json, _json, _json]}


def mutate(seed: Seed, ch: Chooser) -> bytes:
    """The seed with one to three mutations applied."""
    d = bytearray(seed.data)
    for _ in range(ch.integer(1, 3)):
        d = ch.pick(_OPS[seed.kind])(d, seed, ch)
    return bytes(d)


# ---- targets ------------------------------------------------------------------------------

class WrongResult(AssertionError):
    """The reader accepted an input and returned something inconsistent with it."""


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise WrongResult(what)


def read_model(path: Path) -> None:
    """load_gguf, then every tensor's load(): the bytes must be the declared size."""
    from kquant.files.gguf_read import load_gguf

    for t in load_gguf(path).tensors:
        a = t.load()
        _expect(a.nbytes == t.nbytes, f"tensor {t.name}: loaded {a.nbytes} bytes, declared {t.nbytes}")
        a.sum()  # touch every byte


def read_imatrix(path: Path) -> None:
    """load_imatrix (GGUF or .dat), then the per-column weights llama-quantize would use."""
    from kquant.calibration.imatrix_file import load_imatrix, weights_for_quantize

    im = load_imatrix(path)
    for name, e in im.entries.items():
        _expect(e.sums.dtype == np.float32 and e.counts.dtype == np.int64, f"{name}: dtypes")
    weights_for_quantize(im)


def read_safetensors(path: Path) -> None:
    """index_tensors on the folder, then every tensor loaded at its declared shape."""
    from kquant.files.safetensors import index_tensors

    for name, t in index_tensors(path.parent).items():
        a = t.load()
        _expect(a.shape == tuple(t.shape), f"tensor {name}: loaded {a.shape}, declared {t.shape}")
        a.sum()


@dataclass(frozen=True)
class Target:
    read: Callable[[Path], None]
    filename: str  # the input's name in its work folder


TARGETS = {"gguf": Target(read_model, "model.gguf"),
           "imatrix": Target(read_imatrix, "imatrix.gguf"),
           "dat": Target(read_imatrix, "imatrix.dat"),
           "safetensors": Target(read_safetensors, "model.safetensors")}


# ---- one input ----------------------------------------------------------------------------

@dataclass
class Finding:
    target: str
    kind: str  # "exception", "memory", "time" or "wrong result"
    detail: str
    data: bytes = field(repr=False)

    @property
    def signature(self) -> str:
        """Findings with one cause share this: the kind and the last line of kquant code."""
        frames = [ln for ln in self.detail.splitlines() if "kquant" in ln and "File" in ln]
        return f"{self.target}:{self.kind}:{frames[-1].strip() if frames else self.detail[-200:]}"

    def report(self) -> str:
        return f"{self.target}: {self.kind}\n{self.detail}"

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{self.target}-{self.kind.replace(' ', '-')}-{hashlib.sha1(self.data).hexdigest()[:12]}"
        stem.with_suffix(".bin").write_bytes(self.data)
        stem.with_suffix(".txt").write_text(self.report() + "\n")
        return stem.with_suffix(".bin")


class _Timeout(BaseException):
    """Raised by the alarm inside a reader that runs too long (BaseException: no reader's
    `except Exception` may swallow it)."""


def _on_alarm(signum, frame) -> None:
    raise _Timeout()


def write_input(target: str, data: bytes, work: Path) -> Path:
    """The input as a fresh file (a new inode: a memory map of an earlier input stays valid)."""
    path = work / TARGETS[target].filename
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


def check(target: str, data: bytes, work: Path) -> tuple[str, Finding | None]:
    """Run one input: ("accepted" | "refused", None) when the reader behaved, else a finding."""
    path = write_input(target, data, work)
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT * 5)  # a hang: stop well after the limit
    outcome, finding, t0 = "accepted", None, time.perf_counter()
    try:
        with np.errstate(all="ignore"):  # non-finite values are the quantizer's to refuse
            TARGETS[target].read(path)
    except ModelError:
        outcome = "refused"
    except _Timeout:
        finding = Finding(target, "time", f"still running after {TIME_LIMIT * 5:g} s", data)
    except WrongResult as e:
        finding = Finding(target, "wrong result", str(e), data)
    except Exception:  # noqa: BLE001 - every other exception is what the fuzzer looks for
        finding = Finding(target, "exception", traceback.format_exc(), data)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
        if not tracing:
            tracemalloc.stop()
    if finding is None and peak > len(data) + MEMORY_LIMIT:
        finding = Finding(target, "memory", f"{peak / 2**20:.1f} MiB traced for a "
                          f"{len(data)}-byte input ({outcome})", data)
    if finding is None and elapsed > TIME_LIMIT:
        finding = Finding(target, "time", f"{elapsed:.2f} s ({outcome})", data)
    return outcome, finding


# ---- the command line ---------------------------------------------------------------------

@dataclass
class Tally:
    tried: int = 0
    accepted: int = 0
    refused: int = 0
    findings: dict[str, Finding] = field(default_factory=dict)  # by signature


def fuzz(target: str, seconds: float, rng: random.Random, work: Path, out: Path) -> Tally:
    """Random mutations of the target's seed for `seconds`; each new finding printed and saved."""
    seed, tally = make_seed(target), Tally()
    ch, stop = RandomChooser(rng), time.monotonic() + seconds
    work.mkdir(parents=True, exist_ok=True)
    while time.monotonic() < stop:
        data = mutate(seed, ch)
        outcome, finding = check(target, data, work)
        tally.tried += 1
        if finding is None:
            setattr(tally, outcome, getattr(tally, outcome) + 1)
        elif finding.signature not in tally.findings:
            tally.findings[finding.signature] = finding
            print(f"FINDING {finding.report()}\n  input saved as {finding.save(out)}", flush=True)
    return tally


def _limit_memory(gib: float) -> None:
    """Cap the address space, so a memory bomb fails with MemoryError instead of taking the
    machine (numba and numpy are imported first: their reservations are already counted)."""
    import kquant.calibration.imatrix_file  # noqa: F401
    import kquant.files.gguf_read  # noqa: F401
    import kquant.files.safetensors  # noqa: F401

    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    limit = used + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="total time, split between targets")
    ap.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where findings are saved")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    ap.add_argument("--memory-gib", type=float, default=4.0,
                    help="address space allowed above the start (0: no cap)")
    args = ap.parse_args(argv)
    if args.memory_gib > 0 and Path("/proc/self/statm").exists():
        _limit_memory(args.memory_gib)
    seed = args.seed if args.seed is not None else time.time_ns() % 2**32
    targets = list(TARGETS) if args.target == "all" else [args.target]
    print(f"fuzzing {', '.join(targets)} for {args.seconds:g} s (random seed {seed})", flush=True)
    totals, found, t0 = [], 0, time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for name in targets:
            t1 = time.monotonic()
            tally = fuzz(name, args.seconds / len(targets), random.Random(seed), Path(tmp) / name, args.out)
            dt = time.monotonic() - t1
            found += len(tally.findings)
            totals.append(f"{name} {tally.tried}")
            print(f"{name}: {tally.tried} inputs in {dt:.1f} s ({tally.tried / dt:.0f}/s): "
                  f"{tally.accepted} accepted, {tally.refused} refused, "
                  f"{len(tally.findings)} findings", flush=True)
    total = sum(int(t.split()[1]) for t in totals)
    print(f"fuzz: {total} inputs in {time.monotonic() - t0:.1f} s ({', '.join(totals)}), "
          f"{found} findings{f' saved in {args.out}' if found else ''}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
