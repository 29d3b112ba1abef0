"""kquant's readers of untrusted files, fuzzed and checked against each finding of the
hardening work: a damaged GGUF model, imatrix (GGUF or legacy .dat) or safetensors file is
refused with `ModelError` naming the file and the key or tensor at fault, never a traceback,
a memory bomb, a hang or a silently wrong tensor.

The seeds, mutations and targets are tools/fuzz.py's (run it for longer from the command
line); here hypothesis drives the mutations for a fixed number of examples.
"""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kquant.errors import ModelError
from kquant.files.gguf_read import load_gguf, read_gguf
from kquant.files.safetensors import index_tensors, read_header

_spec = importlib.util.spec_from_file_location(
    "kquant_fuzz", Path(__file__).resolve().parent.parent / "tools" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["kquant_fuzz"] = fuzz  # dataclasses look their module up by name
_spec.loader.exec_module(fuzz)

F = fuzz
EXAMPLES = 300


class HypothesisChooser:
    """tools/fuzz.py's mutation choices drawn by hypothesis (so failures shrink)."""

    def __init__(self, data: st.DataObject):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def pick(self, options):
        return self.data.draw(st.sampled_from(list(options)))


# ---- the fuzz targets ---------------------------------------------------------------------

@pytest.mark.parametrize("target", list(F.TARGETS))
def test_seed_is_accepted(target, tmp_path):
    seed = F.make_seed(target)
    assert F.check(target, seed.data, tmp_path) == ("accepted", None)


@pytest.mark.parametrize("target", list(F.TARGETS))
def test_fuzz(target, tmp_path):
    seed = F.make_seed(target)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        blob = F.mutate(seed, HypothesisChooser(data))
        _, finding = F.check(target, blob, tmp_path)
        assert finding is None, finding.report()

    run()


# ---- GGUF: what the reader returns --------------------------------------------------------

def _write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_model_seed_reads_as_gguf_py_does(tmp_path):
    from gguf import GGUFReader, GGUFValueType

    p = _write(tmp_path, F.model_gguf())
    kv, tensors = read_gguf(p)
    reader = GGUFReader(p)
    for k in kv:
        want = reader.fields[k.key].contents()
        assert (list(want) if k.sub_type == GGUFValueType.STRING else want) == k.value, k.key
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert ours.shape == tuple(int(n) for n in theirs.shape)
        assert ours.type == theirs.tensor_type
        assert ours.load().tobytes() == np.asarray(theirs.data).tobytes()


def test_strings_keep_their_bytes(tmp_path):
    """Invalid UTF-8 in a token survives as surrogate escapes, written back byte for byte."""
    kv = [("general.architecture", F.STRING, "llama"),
          ("tokenizer.ggml.tokens", F.ARRAY, (F.STRING, [b"\xff\xfe", b"ok"]))]
    p = _write(tmp_path, F.gguf_bytes(kv, [("a.weight", (4,), F.GGML_F32, bytes(16))]))
    tokens = load_gguf(p).get("tokenizer.ggml.tokens")
    assert [t.encode("utf-8", "surrogateescape") for t in tokens] == [b"\xff\xfe", b"ok"]


def test_split_files(tmp_path):
    def part(no: int, names: list[str]) -> bytes:
        kv = [("general.architecture", F.STRING, "llama"), ("split.no", F.U16, no),
              ("split.count", F.U16, 2), ("split.tensors.count", F.I32, 3)]
        return F.gguf_bytes(kv, [(n, (4,), F.GGML_F32, bytes(16)) for n in names])

    _write(tmp_path, part(0, ["a", "b"]), "m-00001-of-00002.gguf")
    _write(tmp_path, part(1, ["c"]), "m-00002-of-00002.gguf")
    src = load_gguf(tmp_path / "m-00001-of-00002.gguf")
    assert [(t.name, t.split) for t in src.tensors] == [("a", 0), ("b", 0), ("c", 1)]
    _write(tmp_path, part(1, ["a"]), "m-00002-of-00002.gguf")
    with pytest.raises(ModelError, match="duplicate tensor name 'a' across the split files"):
        load_gguf(tmp_path / "m-00001-of-00002.gguf")


def test_vocabulary_is_read_fast(tmp_path):
    """A 50k-token vocabulary (and its scores) in well under a second: the string loop is
    checked once, not per string."""
    tokens = [f"token{i}" for i in range(50_000)]
    kv = [("general.architecture", F.STRING, "llama"),
          ("tokenizer.ggml.tokens", F.ARRAY, (F.STRING, tokens)),
          ("tokenizer.ggml.merges", F.ARRAY, (F.STRING, tokens)),
          ("tokenizer.ggml.scores", F.ARRAY, (F.F32, [0.0] * 50_000))]
    p = _write(tmp_path, F.gguf_bytes(kv, [("a.weight", (4,), F.GGML_F32, bytes(16))]))
    best = min(_timed(lambda: load_gguf(p)) for _ in range(3))
    assert load_gguf(p).get("tokenizer.ggml.tokens") == tokens
    assert best < 0.5, f"{best:.3f} s"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- GGUF: each finding, refused with a clear message -------------------------------------

MODEL = F.model_gguf()
FIELDS = F.field_map(F.gguf_fields(MODEL))
NORM = "blk.0.attn_norm.weight"  # the middle tensor of the seed (F16 [64])


def _refused(tmp_path: Path, data: bytes, match: str, target: str = "gguf") -> None:
    """`data` is refused with a message matching `match` and naming the file, quickly and
    within the fuzz memory limit."""
    outcome, finding = F.check(target, data, tmp_path)
    assert finding is None, finding.report()
    assert outcome == "refused"
    path = F.write_input(target, data, tmp_path)
    with pytest.raises(ModelError, match=match) as err:
        F.TARGETS[target].read(path)
    assert path.name in str(err.value)


def _patched(*changes: tuple[str, int]) -> bytes:
    data = MODEL
    for name, value in changes:
        data = F.patch(data, FIELDS[name], value)
    return data


def test_imatrix_string_made_array(tmp_path):
    """The fuzzing finding: general.type's STRING made ARRAY read its string's bytes as an
    element count of ~8e18, and gguf's GGUFReader grew without bound."""
    seed = F.imatrix_gguf()
    f = F.field_map(F.gguf_fields(seed))["kv.general.type.type"]
    _refused(tmp_path, F.patch(seed, f, F.ARRAY), "key 'general.type'", "imatrix")


def test_model_string_made_array(tmp_path):
    _refused(tmp_path, _patched(("kv.general.name.type", F.ARRAY)), "key 'general.name'")


@pytest.mark.parametrize("name,delta", [(NORM, 4), (NORM, 32), ("blk.0.ffn_down.weight", 1)])
def test_misaligned_offset(tmp_path, name, delta):
    at = int.from_bytes(MODEL[FIELDS[f"tensor.{name}.offset"].offset:][:8], "little")
    _refused(tmp_path, _patched((f"tensor.{name}.offset", at + delta)),
             f"tensor '{name}' has offset {at + delta}, expected {at}")


def test_overlapping_offset(tmp_path):
    _refused(tmp_path, _patched((f"tensor.{NORM}.offset", 0)),
             f"tensor '{NORM}' has offset 0, expected 192 .*token_embd.weight")


def test_f16_declared_f32(tmp_path):
    """The F16 norm declared F32 claims twice its bytes: the next tensor is not where the
    declared size puts it."""
    _refused(tmp_path, _patched((f"tensor.{NORM}.type", F.GGML_F32)),
             f"tensor 'blk.0.ffn_down.weight' has offset 320, expected 448 .*'{NORM}', F32")


def test_last_tensor_declared_smaller(tmp_path):
    """F32 data declared F16 in the last tensor leaves bytes after the data section."""
    data = F.gguf_bytes([("general.architecture", F.STRING, "llama")],
                        [("a.weight", (64,), F.GGML_F16, bytes(256))])
    _refused(tmp_path, data, "128 bytes after the end of the data section .*'a.weight', F16")


def test_truncated_data_names_the_tensor(tmp_path):
    _refused(tmp_path, MODEL[:-70], "truncated: tensor 'blk.0.ffn_down.weight' runs past the end")


@pytest.mark.parametrize("j", [0, 1])
def test_zero_dim(tmp_path, j):
    _refused(tmp_path, _patched((f"tensor.token_embd.weight.ne{j}", 0)),
             f"tensor 'token_embd.weight' dimension {j} is 0")


@pytest.mark.parametrize("ne0,ne1,match", [
    (1 << 40, 1 << 40, "may cause overflow"), (2**63, 5, "dimension 0 has invalid number"),
    (8, 2**64 - 1, "dimension 1 has invalid number"), (1 << 32, 1 << 31, "may cause overflow"),
    (1 << 40, 5, "truncated: tensor 'token_embd.weight'")])
def test_overflowing_dims(tmp_path, ne0, ne1, match):
    _refused(tmp_path, _patched(("tensor.token_embd.weight.ne0", ne0),
                                ("tensor.token_embd.weight.ne1", ne1)), match)


@pytest.mark.parametrize("n_dims,match", [(5, "invalid number of dimensions: 5 > 4"),
                                          (2**32 - 1, "invalid number of dimensions: 4294967295"),
                                          (0, "0 dimensions")])
def test_n_dims(tmp_path, n_dims, match):
    _refused(tmp_path, _patched((f"tensor.{NORM}.n_dims", n_dims)), f"tensor '{NORM}' has {match}")


@pytest.mark.parametrize("value", [0, 48, 3, 2**31 + 1])
def test_alignment_not_a_power_of_two(tmp_path, value):
    _refused(tmp_path, _patched(("kv.general.alignment.value", value)),
             f"general.alignment.*alignment {value} is not a power of 2")


def test_alignment_not_u32(tmp_path):
    data = F.gguf_bytes([("general.architecture", F.STRING, "llama"),
                         ("general.alignment", F.U64, 32)], [])
    _refused(tmp_path, data, "'general.alignment'.*must be of type UINT32 but is UINT64")


def test_duplicate_key(tmp_path):
    data = F.gguf_bytes([("general.architecture", F.STRING, "llama"),
                         ("general.name", F.STRING, "a"), ("general.name", F.STRING, "b")], [])
    _refused(tmp_path, data, "duplicate key 'general.name' for KV pair 2")


@pytest.mark.parametrize("field", ["n_kv", "n_tensors"])
@pytest.mark.parametrize("value", [2**63 - 1, 2**64 - 1, 2**63, 10**9, 1 << 32])
def test_huge_counts(tmp_path, field, value):
    _refused(tmp_path, _patched((field, value)), "truncated or corrupt GGUF header")


@pytest.mark.parametrize("change,match", [
    (("kv.general.name.len", 2**64 - 1),
     "key 'general.name': the value: string length 18446744073709551615 exceeds maximum"),
    (("kv.general.name.key_len", 2**40), "KV pair 1: the key: string length 1099511627776 exceeds maximum"),
    (("kv.general.name.key_len", 2**20), "KV pair 1: the key: string length 1048576 exceeds remaining"),
    (("kv.general.name.len", 2**31), "exceeds maximum 1073741824"),
    (("kv.tokenizer.ggml.tokens.n", 2**62), "key 'tokenizer.ggml.tokens': array of"),
    (("kv.tokenizer.ggml.tokens.n", 10**6), "key 'tokenizer.ggml.tokens': an array of 1000000 strings needs"),
    (("kv.tokenizer.ggml.scores.n", 10**8), "key 'tokenizer.ggml.scores': an array of 100000000 FLOAT32"),
    (("kv.tokenizer.ggml.tokens[3].len", 2**40), "string 3: string length 1099511627776"),
    (("kv.general.i8s.sub_type", F.ARRAY), "key 'general.i8s' has invalid GGUF type 9 .nested"),
    (("kv.general.i8s.sub_type", 13), "key 'general.i8s' has invalid GGUF type 13"),
    (("kv.general.d.type", 2**31), "key 'general.d' has invalid GGUF type 2147483648"),
    (("kv.general.name.key_len", 0), "KV pair 1: key 1 is empty"),
    (("tensor.token_embd.weight.type", 99), "tensor 'token_embd.weight' has invalid ggml type 99"),
    (("tensor.token_embd.weight.type", 2**32 - 1), "has invalid ggml type -1"),
    (("tensor.token_embd.weight.type", 4), "invalid ggml type 4 .Q4_2, removed from ggml"),
    (("tensor.token_embd.weight.type", 36), "invalid ggml type 36 .IQ4_NL_4_4"),
    (("tensor.token_embd.weight.type", F.GGML_Q8_0),
     "tensor 'token_embd.weight' of type 8 .Q8_0. has 8 elements per row, not a multiple of block size .32."),
    (("tensor.token_embd.weight.name_len", 0), "tensor 0 has an empty name"),
    (("version", 1), "GGUFv1 is not supported"),
    (("version", 4), "GGUF version 4 is not supported"),
    (("version", 0x03000000), "mismatch between the host and model endianness"),
    (("version", 0), "bad GGUF version"),
])
def test_corrupt_header(tmp_path, change, match):
    _refused(tmp_path, _patched(change), match)


def test_tensor_names(tmp_path):
    kv = [("general.architecture", F.STRING, "llama")]
    t = (4,), F.GGML_F32, bytes(16)
    _refused(tmp_path, F.gguf_bytes(kv, [("x" * 64, *t)]), "tensor name 0 is too long: 64 >= 64")
    _refused(tmp_path, F.gguf_bytes(kv, [("a", *t), ("a", *t)]), "duplicate tensor name 'a' for tensor 1")
    assert read_gguf(_write(tmp_path, F.gguf_bytes(kv, [("x" * 63, *t)])))[1][0].name == "x" * 63


def test_bad_magic_and_empty_file(tmp_path):
    _refused(tmp_path, b"", "not a GGUF file")
    _refused(tmp_path, b"GGUF\x03\0\0\0", "the file ends inside the 24-byte header")
    with pytest.raises(ModelError, match="bad magic 'GGML'"):
        read_gguf(_write(tmp_path, b"GGML" + MODEL[4:]))


def test_typed_model_keys(tmp_path):
    kv = [("general.architecture", F.ARRAY, (F.STRING, ["llama"]))]
    _refused(tmp_path, F.gguf_bytes(kv, []), "'general.architecture' must be of type STRING")
    kv = [("general.architecture", F.STRING, "llama"), ("split.tensors.count", F.STRING, "3")]
    _refused(tmp_path, F.gguf_bytes(kv, []), "'split.tensors.count' must be of type")


# ---- imatrix files ------------------------------------------------------------------------

def test_imatrix_keys_typed(tmp_path):
    kv = [("general.type", F.STRING, "imatrix"), ("imatrix.chunk_count", F.STRING, "4")]
    data = F.gguf_bytes(kv, [("a.in_sum2", (4,), F.GGML_F32, bytes(16)),
                             ("a.counts", (1,), F.GGML_F32, bytes(4))])
    _refused(tmp_path, data, "'imatrix.chunk_count' must be of type UINT32", "imatrix")


def test_imatrix_gguf_damaged_tensor(tmp_path):
    seed = F.imatrix_gguf()
    fields = F.field_map(F.gguf_fields(seed))
    name = "blk.0.attn_q.weight.in_sum2"
    _refused(tmp_path, F.patch(seed, fields[f"tensor.{name}.type"], F.GGML_F16), "imatrix.gguf: ", "imatrix")
    _refused(tmp_path, F.patch(seed, fields[f"tensor.{name}.ne0"], 0), f"tensor '{name}' dimension 0 is 0",
             "imatrix")


DAT = F.imatrix_dat()
DAT_FIELDS = F.field_map(F.dat_fields(DAT))


def _dat_entry(name: bytes, nval: int, values: int | None = None) -> bytes:
    n = nval if values is None else values
    return struct.pack("<i", len(name)) + name + struct.pack("<ii", 1, nval) + bytes(4 * n)


@pytest.mark.parametrize("data,match", [
    (struct.pack("<i", 2) + _dat_entry(b"a", 2) + _dat_entry(b"", 2), "entry 2 of 2 has an empty name"),
    (struct.pack("<i", 1) + _dat_entry(b"\0x", 2), "entry 1 of 1 has an empty name"),
    (struct.pack("<i", 1) + _dat_entry(b"a", 0, 1), r"entry 1 of 1 \(a\) has 0 values"),
    (struct.pack("<i", 1) + _dat_entry(b"a", -5, 1), r"entry 1 of 1 \(a\) has -5 values"),
    (struct.pack("<i", 2) + _dat_entry(b"a", 1) + _dat_entry(b"a", 1), "entry 2 of 2 repeats the name a"),
    (struct.pack("<i", 1) + _dat_entry(b"a", 2**31 - 1, 1), r"\(a\) has 2147483647 values, 4 bytes are left"),
    (struct.pack("<i", 2**31 - 1) + _dat_entry(b"a", 1), "2147483647 entries cannot fit"),
    (struct.pack("<i", 1) + struct.pack("<i", 2**31 - 1) + bytes(12), "has a name of 2147483647 bytes"),
    (struct.pack("<i", 1) + struct.pack("<i", -1) + bytes(12), "has a name of -1 bytes"),
])
def test_legacy_dat(tmp_path, data, match):
    _refused(tmp_path, data, match, "dat")


@pytest.mark.parametrize("field,value", [("n_entries", 2**31 - 1), ("entry0.len", 2**31 - 1),
                                         ("entry0.nval", 2**31 - 1), ("entry1.nval", 0),
                                         ("n_entries", 0)])
def test_legacy_dat_seed_fields(tmp_path, field, value):
    _refused(tmp_path, F.patch(DAT, DAT_FIELDS[field], value), "imatrix.dat", "dat")


# ---- safetensors --------------------------------------------------------------------------

def _st(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / "st"
    folder.mkdir(exist_ok=True)
    return _write(folder, data, "model.safetensors")


ST = {"a": ("F32", [2, 2], bytes(16)), "b": ("F16", [4], bytes(8))}


def _header(**changes) -> dict:
    """The header of ST with tensor entries replaced or added."""
    h = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}
    h.update(changes)
    return h


@pytest.mark.parametrize("header,match", [
    ([1, 2], "not a JSON object"),
    (_header(a={"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}), "tensor 'a': unknown dtype 'Q4'"),
    (_header(a={"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}), "tensor 'a': shape .* non-negative"),
    (_header(a={"dtype": "F32", "shape": [2, 2.0], "data_offsets": [0, 16]}), "tensor 'a': shape"),
    (_header(a={"dtype": "F32", "shape": [2, True], "data_offsets": [0, 16]}), "tensor 'a': shape"),
    (_header(a={"dtype": "F32", "shape": "22", "data_offsets": [0, 16]}), "tensor 'a': shape"),
    (_header(a={"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}), "tensor 'a': data_offsets"),
    (_header(a={"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16, 24]}), "tensor 'a': data_offsets"),
    (_header(a={"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}), "tensor 'a': data_offsets"),
    (_header(a=[1]), "tensor 'a': not an object"),
    (_header(a={"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 16]}), "'a': data_offsets 0..16 do not match"),
    (_header(b={"dtype": "F16", "shape": [4], "data_offsets": [8, 16]}), "'b': data_offsets 8..16 overlaps"),
    (_header(b={"dtype": "F16", "shape": [2], "data_offsets": [16, 20]}), "4 bytes after the last tensor"),
    (_header(b={"dtype": "F16", "shape": [2], "data_offsets": [20, 24]}), "'b': .* leaves a gap"),
    (_header(b={"dtype": "F16", "shape": [8], "data_offsets": [16, 32]}), "truncated .*tensor 'b' ends at byte 32"),
    (_header(c={"dtype": "F16", "shape": [2**62, 2**62], "data_offsets": [24, 24]}), "'c': data_offsets"),
    (_header(__metadata__={"format": 1}), "__metadata__ must map strings to strings"),
    (_header(b={"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}), "'b' has dtype I64; kquant reads"),
])
def test_safetensors_header(tmp_path, header, match):
    _refused(tmp_path, F.safetensors_bytes(ST, header=header), match, "safetensors")


def test_safetensors_duplicate_name(tmp_path):
    head = (b'{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
            b'"a": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}')
    data = struct.pack("<Q", len(head)) + head + bytes(24)
    _refused(tmp_path, data, "'a' is given twice", "safetensors")


@pytest.mark.parametrize("n", [2**64 - 1, 2**63, 10**9, 100_000_001])
def test_safetensors_header_length(tmp_path, n):
    data = F.safetensors_bytes(ST)
    _refused(tmp_path, struct.pack("<Q", n) + data[8:], "model.safetensors: truncated safetensors file",
             "safetensors")


def test_safetensors_deep_json(tmp_path):
    head = b"[" * 100_000 + b"]" * 100_000
    _refused(tmp_path, struct.pack("<Q", len(head)) + head, "bad safetensors header", "safetensors")


def test_safetensors_seed_loads(tmp_path):
    p = _st(tmp_path, F.safetensors_seed())
    ts = index_tensors(p.parent)
    assert {n: t.load().shape for n, t in ts.items()} == {
        "lm_head.weight": (5, 4), "model.embed_tokens.weight": (5, 4), "model.norm.weight": (4,)}
    assert read_header(p, metadata=(meta := {})) and meta == {"format": "pt"}


@pytest.mark.parametrize("part", ["../model.safetensors", "/etc/passwd", 3, ""])
def test_safetensors_index_outside_the_folder(tmp_path, part):
    p = _st(tmp_path, F.safetensors_seed())
    (p.parent / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": part}}))
    with pytest.raises(ModelError, match="'x' is mapped to .*not a file name of the folder"):
        index_tensors(p.parent)
