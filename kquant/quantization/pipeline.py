"""Quantize a whole model as llama-quantize does: the Python API under `kquant-quantize`.

    summary = quantize_model("model-f16.gguf", "model-Q4_K_M.gguf", "Q4_K_M", imatrix="imatrix.gguf")

The input is a GGUF file (F32/F16/BF16, split files too; quantized only with
allow_requantize) or a Hugging Face folder (converted on the fly by kquant.files.hf). Each tensor's
type comes from llama.cpp's mix rules (kquant.quantization.mixes); tensors are read, quantized and
written one at a time, so memory stays at about one tensor in and one out. The output file
has llama-quantize's metadata and tensor order, byte for byte; it is written to a temporary
file renamed into place only when complete.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType, LlamaFileType

from . import mixes
from ..codecs import CODECS
from ..files.gguf_read import SPLIT_KEYS, split_paths
from ..files.atomic import refuse_input_as_output
from ..files.gguf_write import gguf_header_size, write_gguf
from ..calibration.imatrix_file import load_imatrix, weights_for_quantize
from ..codecs.api import dequantize, numba_threads, quantize
from ..cluster import maybe_cluster
from ..codecs.warm import Unit, warm_codecs
from ..errors import ModelError
from ..runtime.device import resolve_device
from ..models import open_model
from ..files.source import KV, ModelSource, SourceTensor
from .allocation import Allocation, allocate_plan
from .gptq import GptqSettings
from .calibrated import (METHODS, Calibration, GptqReport, calibrate, gptq_types, load_calibration,
                         quantize_matrix)

_UNQUANTIZED = (T.F32, T.F16, T.BF16)
# llama-quantize's own keys for the imatrix it used (tools/quantize/quantize.cpp)
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"
GGML_QNT_VERSION = 2


@dataclass
class QuantizeOptions:
    """llama-quantize's options, with its names (see `kquant-quantize --help`)."""

    allow_requantize: bool = False
    leave_output_tensor: bool = False
    pure: bool = False
    imatrix: str | None = None
    include_weights: list[str] = field(default_factory=list)
    exclude_weights: list[str] = field(default_factory=list)
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    tensor_types: list[tuple[str, T]] = field(default_factory=list)
    override_kv: list[KV] = field(default_factory=list)
    prune_layers: list[int] = field(default_factory=list)
    keep_split: bool = False
    n_threads: int | None = None
    hf_outtype: str = "f16"  # a Hugging Face input is first converted as convert_hf_to_gguf would
    # "llama": llama-quantize's bytes; "gptq": the block matrices by GPTQ with Hessians from
    # `calibrate` (a text), same types and size (kquant.quantization.calibrated)
    method: str = "llama"
    calibrate: str | None = None
    hessian: str | None = None  # a Hessian file (kquant-imatrix --hessian-out) instead of calibrating
    calibrate_ctx: int = 512
    calibrate_chunks: int = -1
    # with --calibrate: block by block, each calibrated on the quantized blocks' outputs
    # (kquant.quantization.sequential); False: one calibration pass of the float model
    sequential: bool = True
    gptq: GptqSettings = field(default_factory=GptqSettings)  # the sweep's dampening and order
    device: str = "cpu"  # where --method gptq runs the model (auto, cpu, cuda; one-shot: the CPU)
    # per-tensor types chosen under a budget instead of by the mix (kquant.quantization.allocation):
    # bits per weight of all tensor data, or the file's bytes; at most one of them
    target_bpw: float | None = None
    target_size: int | None = None
    # a sensitivity file (sensitivity_file.py): read when it exists, else measured and written
    sensitivity: str | None = None
    # a Dask scheduler address or local:N: tensors (and --method gptq's calibration) on its workers
    cluster: str | None = None


@dataclass
class PlannedTensor:
    source: SourceTensor
    target: T
    imatrix: np.ndarray | None = None
    name: str = ""  # the output name (differs from source.name only with --prune-layers)
    hessian: np.ndarray | None = None  # with --method gptq: the layer Hessian of its input
    data: np.ndarray | None = None  # bytes made before writing (sequential GPTQ), written as they are
    gptq: GptqSettings = field(default_factory=GptqSettings)

    @property
    def new_nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.target]
        return self.source.n_elements // block * size


@dataclass
class Plan:
    """Everything decided before any tensor is touched: output metadata and tensor types."""

    source: ModelSource
    ftype: LlamaFileType
    kv: list[KV]
    tensors: list[PlannedTensor]

    @property
    def size_in(self) -> int:
        return sum(p.source.nbytes for p in self.tensors)

    @property
    def size_out(self) -> int:
        return sum(p.new_nbytes for p in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(p.source.n_elements for p in self.tensors)


@dataclass
class Summary:
    size_in: int
    size_out: int
    n_elements: int
    seconds: float
    n_tensors: int
    gptq: str = ""  # with --method gptq: its GptqReport line
    allocation: str = ""  # with a budget: Allocation.line()

    def line(self) -> str:
        mib = 1024 * 1024
        return (f"model size = {self.size_in / mib:.2f} MiB ({8 * self.size_in / self.n_elements:.2f} "
                f"BPW), quant size = {self.size_out / mib:.2f} MiB "
                f"({8 * self.size_out / self.n_elements:.2f} BPW), {self.n_tensors} tensors, "
                f"{self.seconds:.1f} s")


def _set(kv: list[KV], item: KV) -> None:
    """gguf_set_val_*: drop the key where it was, append it at the end."""
    kv[:] = [k for k in kv if k.key != item.key]
    kv.append(item)


def output_metadata(source: ModelSource, ftype: LlamaFileType, overrides: list[KV]) -> list[KV]:
    """llama_model_quantize_impl's metadata: the input's pairs in order, then
    quantization_version and file_type re-set (so moved last), split keys dropped, and the
    overrides (--override-kv, then the imatrix keys) set in turn."""
    kv = list(source.kv)
    _set(kv, KV("general.quantization_version", GGML_QNT_VERSION, GGUFValueType.UINT32))
    _set(kv, KV("general.file_type", int(ftype), GGUFValueType.UINT32))
    kv = [k for k in kv if k.key not in SPLIT_KEYS]
    for o in overrides:
        _set(kv, o)
    return kv


def check_architecture(source: ModelSource) -> None:
    """llama.cpp's loader refuses an architecture it does not know ("unknown model
    architecture"), so a file of one would be written for nothing: refuse it first."""
    if source.arch not in _KNOWN_ARCHS:
        raise ModelError(f"{source.path or 'the model'}: unknown model architecture: '{source.arch}' "
                         f"(llama.cpp would not load the result)")


_KNOWN_ARCHS = frozenset(gguf.MODEL_ARCH_NAMES.values())


def _model_info(source: ModelSource) -> mixes.ModelInfo:
    arch = source.arch

    def hparam(key: str) -> int:
        v = source.get(f"{arch}.{key}", 0)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else 0
        if not isinstance(v, (int, float)) or v != v:
            raise ModelError(f"{source.path}: metadata {arch}.{key} is {v!r}, not a number")
        return int(v or 0)

    return mixes.ModelInfo(arch=arch, n_layer=hparam("block_count"),
                           n_head=hparam("attention.head_count"),
                           n_head_kv=hparam("attention.head_count_kv"),
                           n_expert=hparam("expert_count"), n_embd=hparam("embedding_length"))


def _filter_imatrix(weights: dict[str, np.ndarray], include: list[str],
                    exclude: list[str]) -> dict[str, np.ndarray]:
    """--include-weights / --exclude-weights: substring matches on the entry names."""
    if exclude:
        weights = {k: v for k, v in weights.items() if not any(s in k for s in exclude)}
    if include:
        weights = {k: v for k, v in weights.items() if any(s in k for s in include)}
    return weights


def _imatrix_overrides(path: str, im, n_entries: int) -> list[KV]:
    out = [KV(KEY_IMATRIX_FILE, path[:127], GGUFValueType.STRING)]
    if im.datasets:
        out.append(KV(KEY_IMATRIX_DATASET, im.datasets[0][:127], GGUFValueType.STRING))
    out.append(KV(KEY_IMATRIX_ENTRIES, n_entries, GGUFValueType.UINT32))
    if im.chunk_count > 0:
        out.append(KV(KEY_IMATRIX_CHUNKS, int(im.chunk_count), GGUFValueType.UINT32))
    return out


def _check_imatrix(weights: dict[str, np.ndarray], tensors: dict[str, SourceTensor]) -> None:
    """Refuse an imatrix before any work: entries for tensors the model lacks (an imatrix
    of another model), lengths that do not fit (token_embd excepted, as llama.cpp), and
    non-finite values."""
    unknown = sorted(set(weights) - set(tensors))
    if unknown:
        raise ModelError(f"imatrix has entries for {len(unknown)} tensor(s) the model does not "
                         f"have, e.g. {unknown[0]}: was it computed for another model?")
    for name, w in weights.items():
        t = tensors[name]
        want = t.shape[0] * (t.shape[2] if len(t.shape) > 2 else 1)
        if w.size != want and not mixes.tensor_category(name) == mixes.Category.TOKEN_EMBD:
            raise ModelError(f"imatrix entry {name} has {w.size} values, the tensor needs {want}")
        _check_importance(name, w, t.shape[2] if len(t.shape) > 2 and w.size == want else 1)


def _check_importance(name: str, w: np.ndarray, n_mat: int) -> None:
    """Values a real imatrix cannot hold, which would ruin the tensor silently: non-finite ones
    (llama-quantize refuses them too), negative ones (sums of squares), and a matrix whose every
    value is zero (its scales would be fitted to nothing: 70x the perplexity on the tiny model)."""
    if not np.isfinite(w).all():
        bad = w[~np.isfinite(w)][0]
        raise ModelError(f"imatrix entry {name} contains non-finite value {bad} (at "
                         f"{int(np.flatnonzero(~np.isfinite(w))[0])})")
    if (w < 0).any():
        raise ModelError(f"imatrix entry {name} contains negative value {w[w < 0][0]:g} (at "
                         f"{int(np.flatnonzero(w < 0)[0])}): importance is a sum of squares")
    for j, part in enumerate(w.reshape(n_mat, -1)):
        if not part.any():
            which = f" (expert {j})" if n_mat > 1 else ""
            raise ModelError(f"imatrix entry {name}{which} is all zero: no importance to weight it "
                             f"by; recompute the imatrix, or leave the tensor out with "
                             f"--exclude-weights {name}")


def plan_quantization(source: ModelSource, ftype: str | int | LlamaFileType,
                      options: QuantizeOptions | None = None,
                      calibration: Calibration | None = None) -> Plan:
    """Choose every tensor's type and the output metadata, and check the imatrix.
    `ftype` "COPY" copies every tensor as it is (llama-quantize's COPY). With a calibration
    (--method gptq), its imatrix stands in for a missing --imatrix and its Hessians go with
    the matrices GPTQ can quantize."""
    opts = options or QuantizeOptions()
    check_architecture(source)
    only_copy = isinstance(ftype, str) and ftype.strip().upper() == "COPY"
    ftype = loader_ftype(source) if only_copy else mixes.parse_ftype(ftype)
    weights: dict[str, np.ndarray] = {}
    overrides = list(opts.override_kv)
    if opts.imatrix:
        im = load_imatrix(opts.imatrix)
        if not im.is_legacy and not im.has_metadata:
            raise ModelError(f"{opts.imatrix}: missing imatrix metadata")
        weights = _filter_imatrix(weights_for_quantize(im), opts.include_weights,
                                  opts.exclude_weights)
        if weights:
            overrides += _imatrix_overrides(opts.imatrix, im, len(weights))
    elif calibration is not None:
        weights = _filter_imatrix(weights_for_quantize(calibration.imatrix), opts.include_weights,
                                  opts.exclude_weights)
        overrides += _imatrix_overrides(calibration.text, calibration.imatrix, len(weights))
    by_name = {t.name: t for t in source.tensors}
    _check_imatrix(weights, by_name)
    kept, n_blocks = prune(source.tensors, opts.prune_layers)
    infos = [mixes.TensorInfo(new, t.shape, t.type) for new, t in kept]
    types = {i.name: i.type for i in infos} if only_copy else mixes.choose_types(
        _model_info(source), infos, ftype, pure=opts.pure,
        leave_output_tensor=opts.leave_output_tensor,
        output_tensor_type=opts.output_tensor_type,
        token_embedding_type=opts.token_embedding_type, tensor_types=opts.tensor_types,
        has_imatrix=bool(weights))
    tensor_weights = {}
    for new_name, t in kept:  # llama-quantize refuses a missing imatrix before anything else
        target = types[new_name]
        w = weights.get(t.name)
        if w is not None and w.size != t.shape[0] * (t.shape[2] if len(t.shape) > 2 else 1):
            w = None  # token_embd's mismatch is only a warning in llama.cpp
        if (target != t.type and w is None and mixes.requires_imatrix(t.name, target, ftype)):
            raise ModelError(f"{t.name}: type {target.name} needs an importance matrix (--imatrix)")
        if target != t.type and w is None and target in CODECS and CODECS[target].requires_imatrix:
            # token_embd / output (exempt above) in IQ1_S: llama-quantize passes no weights and
            # ggml aborts; kquant refuses before writing
            raise ModelError(f"{t.name}: type {target.name} needs importance weights and the "
                             "imatrix has none for this tensor (ggml aborts without them)")
        tensor_weights[new_name] = w
    planned = []
    for new_name, t in kept:
        target = types[new_name]
        if target != t.type:
            _check_convertible(t, target, opts.allow_requantize)
        w = tensor_weights[new_name]
        h = None
        if calibration is not None and target in gptq_types() and len(t.shape) == 2:
            h = calibration.hessians.of(t.name)
        planned.append(PlannedTensor(t, target, w, new_name, h, gptq=opts.gptq))
    kv = output_metadata(source, ftype, overrides)
    if opts.prune_layers:
        _set(kv, KV(f"{source.arch}.block_count", n_blocks, GGUFValueType.UINT32))
    return Plan(source, ftype, kv, planned)


KEY_TARGET_BPW = "quantize.kquant.target_bpw"
KEY_TARGET_SIZE = "quantize.kquant.target_size"


def apply_budget(plan: Plan, opts: QuantizeOptions, model_path: str | Path, n_threads: int | None = None,
                 progress: bool = False) -> Allocation | None:
    """With --target-bpw or --target-size: the allocator's types in the plan (in place), the
    budget recorded in the metadata. The mix's types stay where the options fix them. With
    calibration text, each tensor kind's sensitivity is measured on it (sensitivity.py)."""
    if opts.target_bpw is None and opts.target_size is None:
        return None
    if opts.target_bpw is not None:
        budget = int(opts.target_bpw * plan.n_elements // 8)
        _set(plan.kv, KV(KEY_TARGET_BPW, float(opts.target_bpw), GGUFValueType.FLOAT32))
    else:
        _set(plan.kv, KV(KEY_TARGET_SIZE, int(opts.target_size), GGUFValueType.UINT64))
        head = gguf_header_size(ModelSource(plan.source.arch, plan.kv, [
            SourceTensor(p.name, _ggml_dims(p.source.shape), p.target, None) for p in plan.tensors]))
        align = int(plan.source.get("general.alignment") or 32)
        f32 = head + sum(-(-4 * p.source.n_elements // align) * align for p in plan.tensors)
        if opts.target_size > f32:
            raise ModelError(f"--target-size {opts.target_size} is above the model's size at F32 "
                             f"({f32} bytes)")
        # each tensor's data is padded to the alignment: leave room for the most padding
        budget = opts.target_size - head - (align - 1) * len(plan.tensors)
        if budget <= 0:
            raise ModelError(f"--target-size {opts.target_size} is below the file's "
                             f"{head} bytes of metadata")
    patterns = [re.compile(p) for p, _ in opts.tensor_types]

    def fixed(name: str) -> bool:
        return (any(pt.search(name) for pt in patterns)
                or (opts.token_embedding_type is not None and mixes.tensor_category(name) == mixes.Category.TOKEN_EMBD)
                or (opts.output_tensor_type is not None and mixes.tensor_category(name) == mixes.Category.OUTPUT))

    measure = None
    if opts.calibrate or opts.sensitivity:
        def measure(planned, options):
            return _sensitivities(opts, model_path, planned, options, n_threads, progress)
    with numba_threads(n_threads):
        return allocate_plan(plan.tensors, budget, fixed, measure, n_threads, progress,
                             allowed=gptq_types() if opts.method == "gptq" else None)


def _sensitivities(opts: QuantizeOptions, model_path: str | Path, planned: list, options: list,
                   n_threads: int | None, progress: bool):
    """The tensors' sensitivities: from --sensitivity's file when it exists, else measured on
    the --calibrate text (and saved to the file when one is named)."""
    from .sensitivity import SENSITIVITY_CHUNKS, measure_sensitivities
    from .sensitivity_file import load_sensitivity, save_sensitivity, weights_key

    key = weights_key(options)
    if opts.sensitivity and Path(opts.sensitivity).exists():
        return load_sensitivity(opts.sensitivity, key, opts.calibrate)
    if not opts.calibrate:
        raise ModelError(f"{opts.sensitivity}: no such sensitivity file, and no --calibrate text to "
                         f"measure the sensitivities on")
    s = measure_sensitivities(model_path, opts.calibrate, planned, options, opts.calibrate_ctx,
                              n_threads=n_threads, progress=progress)
    if opts.sensitivity:
        save_sensitivity(opts.sensitivity, s, key, opts.calibrate, opts.calibrate_ctx, SENSITIVITY_CHUNKS)
    return s


_BLK = re.compile(r"blk\.(\d+)\.")


def prune(tensors: list[SourceTensor], layers: list[int]) -> tuple[list[tuple[str, SourceTensor]], int]:
    """--prune-layers: drop the blocks listed and renumber the rest, as llama.cpp's
    remap_layer does walking the tensors in the loader's order. Returns (new name, tensor)
    pairs in that order, and the new block count."""
    ordered = sorted(tensors, key=lambda t: mixes.weight_order_key(t.name))
    if not layers:
        return [(t.name, t) for t in ordered], 0
    prune_set, first = set(layers), min(layers)
    mapped: dict[int, str] = {}
    next_id = 0
    out = []
    for t in ordered:
        m = _BLK.search(t.name)
        if not m:
            out.append((t.name, t))
            continue
        blk = int(m[1])
        if blk not in mapped:
            if blk in prune_set:
                mapped[blk] = ""
            elif blk < first:
                mapped[blk], next_id = str(blk), blk + 1
            else:
                mapped[blk], next_id = str(next_id), next_id + 1
        if mapped[blk]:
            out.append((t.name[:m.start(1)] + mapped[blk] + t.name[m.end(1):], t))
    return out, next_id


LLAMA_FTYPE_GUESSED = 1024
# llama_model_loader's guess of a file's ftype from its most common tensor type
_GUESS = {T.F32: 0, T.F16: 1, T.BF16: 32, T.Q4_0: 2, T.Q4_1: 3, T.Q5_0: 8, T.Q5_1: 9, T.Q8_0: 7,
          T.Q2_K: 10, T.Q3_K: 12, T.Q4_K: 15, T.Q5_K: 17, T.Q6_K: 18}


def loader_ftype(source: ModelSource) -> int:
    """The file type llama.cpp's loader reports (what COPY writes as general.file_type):
    general.file_type if present, else guessed from the most common tensor type, flagged
    LLAMA_FTYPE_GUESSED."""
    stored = source.get("general.file_type")
    if stored is not None:
        return int(stored)
    counts: dict[T, int] = {}
    best, best_n = T.F32, 0
    for t in sorted(source.tensors, key=lambda t: mixes.weight_order_key(t.name)):
        counts[t.type] = counts.get(t.type, 0) + 1
        if counts[t.type] > best_n:
            best, best_n = t.type, counts[t.type]
    return _GUESS.get(best, 0) | LLAMA_FTYPE_GUESSED


def _check_convertible(t: SourceTensor, target: T, allow_requantize: bool) -> None:
    if target not in CODECS:
        raise ModelError(f"{t.name}: llama.cpp's rules choose {target.name}, which kquant does "
                         "not produce (K-quants, legacy quants, the i-quants and float types)")
    if t.type not in CODECS:
        raise ModelError(f"{t.name}: input type {t.type.name} is not supported")
    block = GGML_QUANT_SIZES[target][0]
    if t.shape[0] % block:
        raise ModelError(f"{t.name}: rows of {t.shape[0]} values are not a multiple of "
                         f"{target.name}'s {block}-value blocks")
    if t.type not in _UNQUANTIZED and not allow_requantize:
        raise ModelError(f"{t.name}: requantizing from type {t.type.name} is disabled "
                         "(use --allow-requantize)")


SLAB_VALUES = 1 << 22  # rows are converted in slabs of about this many values (16 MiB of f32)


def convert_tensor(p: PlannedTensor, n_threads: int | None = None,
                   report: GptqReport | None = None) -> np.ndarray:
    """The output bytes of one planned tensor: a copy, or dequantize-then-quantize with its
    imatrix (per expert for 3-D tensors), a slab of rows at a time so that the float32
    working copy stays small whatever the tensor's size; with a Hessian, GPTQ over the whole
    matrix (it moves errors across all rows' columns at once)."""
    if p.data is not None:
        return p.data
    t = p.source
    raw = t.load().view(np.uint8)
    if p.target == t.type:
        return raw.reshape(-1)
    if p.hessian is not None:
        x = _float_rows(raw.reshape(t.shape[1], -1), t, 0, n_threads)
        with numba_threads(n_threads):
            data = quantize_matrix(x, p.target, p.imatrix, p.hessian, p.name,
                                   report if report is not None else GptqReport(), p.gptq)
        return data.reshape(-1)
    n_per_row = t.shape[0]
    n_rows = t.n_elements // n_per_row
    n_expert = t.shape[2] if len(t.shape) > 2 else 1
    rows_in = raw.reshape(n_rows, -1)
    out = np.empty((n_rows, p.new_nbytes // n_rows), np.uint8)
    weights = None if p.imatrix is None else p.imatrix.reshape(-1, n_per_row)
    per_expert = n_rows // n_expert
    step = max(1, SLAB_VALUES // n_per_row)
    for e in range(n_expert):
        w = None if weights is None else weights[e if weights.shape[0] > 1 else 0]
        for r0 in range(e * per_expert, (e + 1) * per_expert, step):
            r1 = min(r0 + step, (e + 1) * per_expert)
            x = _float_rows(rows_in[r0:r1], t, r0, n_threads)
            out[r0:r1] = quantize(x, p.target, w, n_threads=n_threads)
    return out.reshape(-1)


def split_output_paths(out: Path, n_split: int) -> list[Path]:
    stem = str(out)[:-5] if str(out).endswith(".gguf") else str(out)
    return [Path(f"{stem}-{i + 1:05d}-of-{n_split:05d}.gguf") for i in range(n_split)]


def _write_split(result: ModelSource, plan: Plan, n_split: int, out: Path, progress: bool) -> None:
    """--keep-split's files, each written atomically; an error or a signal removes those
    already written, so that no incomplete set of parts is left."""
    written: list[Path] = []
    try:
        for part, path in zip(split_outputs(result, plan, n_split), split_output_paths(out, n_split)):
            written.append(write_gguf(part, path, progress=progress))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _float_rows(rows: np.ndarray, t: SourceTensor, r0: int, n_threads: int | None) -> np.ndarray:
    """Rows of a tensor's stored bytes as float32, refusing NaN / Inf (row numbers from r0)."""
    x = rows.view(np.float32) if t.type == T.F32 else dequantize(rows, t.type, n_threads=n_threads)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ModelError(f"tensor '{t.name}' has invalid data: non-finite weight {x[tuple(bad)]} at "
                         f"row {r0 + bad[0]}, column {bad[1]}")
    return x


def codec_units(plan: Plan) -> list[Unit]:
    """The codec kernels converting the plan's tensors calls: dequantizing the stored type
    (F32 is read as is), quantizing to the target (with an imatrix where one is given)."""
    units = []
    for p in plan.tensors:
        if p.data is None and p.target != p.source.type:
            if p.source.type != T.F32:
                units.append(Unit(p.source.type.name, dequantize=True))
            if p.target != T.F32:
                units.append(Unit(p.target.name, imatrix=p.imatrix is not None))
    return units


def output_source(plan: Plan, n_threads: int | None = None,
                  report: GptqReport | None = None) -> ModelSource:
    """The quantized model as a ModelSource whose tensors are converted as they are loaded."""
    def loader(p: PlannedTensor) -> Callable[[], np.ndarray]:
        return lambda: convert_tensor(p, n_threads, report)

    tensors = [SourceTensor(p.name, _ggml_dims(p.source.shape), p.target, loader(p), release=p.source.release)
               for p in plan.tensors]
    return ModelSource(plan.source.arch, plan.kv, tensors, plan.source.path)


def _ggml_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape llama-quantize writes (gguf_add_tensor: ggml_n_dims), trailing 1s dropped:
    qwen2moe's ffn_gate_inp_shexp, [n_embd, 1] as converted, is written [n_embd]."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def quantize_model(input_path: str | Path, output_path: str | Path,
                   ftype: str | int | LlamaFileType, options: QuantizeOptions | None = None,
                   progress: bool = True, log: Callable[[str], None] | None = None) -> Summary:
    """Quantize a model file or folder into a GGUF file, as llama-quantize would.
    `log` gets the one line said while a first run compiles kernels.

    With `options.keep_split`, a split input gives split outputs named
    `<output without .gguf>-0000i-of-0000n.gguf`, each with its split.* keys."""
    t0 = time.perf_counter()
    inp, out = Path(input_path), Path(output_path)
    opts = options or QuantizeOptions()
    refuse_input_as_output(out, [inp, opts.imatrix])
    if opts.method not in METHODS:
        raise ModelError(f"unknown --method {opts.method!r} ({' or '.join(METHODS)})")
    if opts.method == "gptq":
        if not opts.calibrate and not opts.hessian:
            raise ModelError("--method gptq needs calibration text (--calibrate TEXT) or saved "
                             "Hessians (--hessian F)")
        base = mixes.default_type(ftype)
        if base not in gptq_types() and base not in _UNQUANTIZED:
            # the sweeps know grids of levels under block scales; a lattice file would be plain
            raise ModelError(f"--method gptq does not support {base.name} files yet (K-quant, "
                             "legacy, IQ4_NL and IQ4_XS types only)")
        refuse_input_as_output(out, [opts.calibrate, opts.hessian])
    source = open_model(inp, opts.hf_outtype)
    n_split = 1 + max((t.split for t in source.tensors), default=0)
    if opts.keep_split and n_split > 1:
        for path in split_output_paths(out, n_split):
            refuse_input_as_output(path, split_paths(inp))
    plan = plan_quantization(source, ftype, opts)  # refuses a bad type or imatrix before calibrating
    if opts.method == "gptq" and (n_expert := source.get(f"{source.arch}.expert_count") or 0):
        # the sweeps and Hessians are per matrix: stacked experts have neither yet
        raise ModelError(f"{inp}: --method gptq does not support mixture-of-experts models "
                         f"({source.arch}, {n_expert} experts) yet")
    with maybe_cluster(opts.cluster, opts.n_threads, log) as cluster:
        report = None
        if opts.method == "gptq":
            report = GptqReport()
            plan = _calibrated_plan(inp, source, ftype, opts, plan, progress, cluster)
        # the budget's types, estimated with the imatrix the quantization uses
        allocation = apply_budget(plan, opts, inp, opts.n_threads, progress)
        if opts.method == "gptq" and opts.sequential and not opts.hessian:
            _quantize_sequentially(inp, plan, opts, report, progress)
        if cluster is None:
            warm_codecs(codec_units(plan), log)
        _write_output(plan, opts, out, n_split, report, progress, cluster, inp)
    return Summary(plan.size_in, plan.size_out, plan.n_elements, time.perf_counter() - t0,
                   len(plan.tensors), report.line() if report is not None else "",
                   allocation.line() if allocation is not None else "")


def _calibrated_plan(inp: Path, source: ModelSource, ftype, opts: QuantizeOptions, plan: Plan, progress: bool,
                     cluster) -> Plan:
    """--method gptq: the plan again with the calibration's imatrix and Hessians (from a
    Hessian file, or a calibration pass of the float model, on the cluster if there is one)."""
    if opts.hessian:
        calibration = load_calibration(opts.hessian, inp)
    elif not (opts.sequential and opts.imatrix):
        # the float model's pass: the imatrix (and, one-shot, the Hessians)
        with numba_threads(opts.n_threads):
            calibration = calibrate(inp, opts.calibrate, opts.calibrate_ctx, opts.calibrate_chunks,
                                    progress, hessians=not opts.sequential,
                                    device=resolve_device(opts.device), cluster=cluster)
    else:
        return plan
    return plan_quantization(source, ftype, opts, calibration)


def _write_output(plan: Plan, opts: QuantizeOptions, out: Path, n_split: int, report: GptqReport | None,
                  progress: bool, cluster, inp: Path) -> None:
    """The plan's tensors converted (here, or on the cluster) and written, split or not."""
    split = opts.keep_split and n_split > 1
    conversions = None
    if cluster is None:
        result = output_source(plan, opts.n_threads, report)
    else:
        from .on_cluster import ClusterConversions, cluster_output_source

        position = {t.name: k for k, t in enumerate(plan.source.tensors)}  # the writer's order
        order = (sorted(plan.tensors, key=lambda p: (p.source.split, position[p.source.name])) if split
                 else plan.tensors)
        conversions = ClusterConversions(cluster, plan, order, str(inp.resolve()), opts.hf_outtype,
                                         opts.n_threads, report)
        result = cluster_output_source(conversions, plan)
    try:
        if not split:
            write_gguf(result, out, progress=progress)
        else:
            _write_split(result, plan, n_split, out, progress)
    finally:
        if conversions is not None:
            conversions.close()


def _quantize_sequentially(inp: Path, plan: Plan, opts: QuantizeOptions, report: GptqReport,
                           progress: bool) -> None:
    """Sequential GPTQ of the block matrices: their bytes go into the plan before writing."""
    from .sequential import sequential_gptq

    planned = {p.source.name: p for p in plan.tensors if _BLK.match(p.source.name)}
    with numba_threads(opts.n_threads):
        data = sequential_gptq(inp, opts.calibrate, planned, lambda p: convert_tensor(p, opts.n_threads),
                               report, opts.calibrate_ctx, opts.calibrate_chunks, opts.n_threads,
                               progress, resolve_device(opts.device))
    for name, d in data.items():
        planned[name].data = d


def split_outputs(result: ModelSource, plan: Plan, n_split: int) -> list[ModelSource]:
    """--keep-split: one output per input file, tensors in file order; the metadata goes in
    the first file only (later ones hold just the split keys), as llama.cpp writes them."""
    position = {t.name: k for k, t in enumerate(plan.source.tensors)}  # file order
    pairs = sorted(zip(result.tensors, plan.tensors), key=lambda tp: position[tp[1].source.name])
    parts = []
    for i in range(n_split):
        kv = list(result.kv) if i == 0 else []
        _set(kv, KV("split.no", i, GGUFValueType.UINT16))
        _set(kv, KV("split.count", n_split, GGUFValueType.UINT16))
        _set(kv, KV("split.tensors.count", len(result.tensors), GGUFValueType.INT32))
        tensors = [t for t, p in pairs if p.source.split == i]
        parts.append(ModelSource(result.arch, kv, tensors, result.path))
    return parts


def default_output_name(input_path: str | Path, type_word: str) -> Path:
    """llama-quantize's default output: ggml-model-<TYPE>.gguf beside the input, TYPE as
    typed (upper case), or for a number the first option name with that number."""
    p = Path(input_path)
    folder = p if p.is_dir() else p.parent
    name = type_word.strip().upper()
    if name.isdigit():
        ftype = mixes.parse_ftype(name)
        name = next(k for k, v in mixes.FTYPES.items() if v == ftype)
    return folder / f"ggml-model-{name}.gguf"


_KV_OVERRIDE = re.compile(r"^(?P<key>[^=]+)=(?P<tag>int|float|bool|str):(?P<value>.*)$")


def parse_override_kv(s: str) -> KV:
    """--override-kv KEY=TYPE:VALUE (int, float, bool, str) as llama.cpp's
    string_parse_kv_override; ints are written as UINT32 of the absolute value, as
    llama_model_quantize does."""
    m = _KV_OVERRIDE.match(s)
    if not m or len(m["key"]) > 127:
        raise ModelError(f"invalid --override-kv {s!r}: expected KEY=int|float|bool|str:VALUE")
    key, tag, value = m["key"], m["tag"], m["value"]
    try:
        if tag == "int":
            return KV(key, abs(int(value)) & 0xFFFFFFFF, GGUFValueType.UINT32)
        if tag == "float":
            return KV(key, float(value), GGUFValueType.FLOAT32)
        if tag == "bool":
            if value not in ("true", "false"):
                raise ValueError(value)
            return KV(key, value == "true", GGUFValueType.BOOL)
    except ValueError:
        raise ModelError(f"invalid --override-kv {s!r}: bad {tag} value") from None
    if len(value) > 127:
        raise ModelError(f"invalid --override-kv {s!r}: string longer than 127 bytes")
    return KV(key, value, GGUFValueType.STRING)
