"""Quantized matrices kept as ggml blocks in GPU memory, multiplied by kquant.matmul.cuda.

On `--device cuda` the runtime's array module is CuPy; without this, every quantized matrix
would be dequantized to a float32 copy on the GPU (4-8x the memory of its blocks, and 4-8x
the bytes each product reads). `GpuBlocks` loads the quantized matrices as `GpuMatrix`es
instead: the file's block bytes on the device (kquant.matmul.cuda.DeviceWeights), which the
forward pass multiplies with the Numba-CUDA block kernels (the warp kernel up to 8 tokens,
the tiled kernel above).

Numerics are the CPU default path's: the forward pass first rounds the activations as ggml
rounds them for the weight's vec_dot type (round_activations, plus min_term_correction for
Q4_1/Q5_1), then the kernels multiply them with the exact dequantized weights in float32.
So a GPU product equals the CPU one up to float32 summation order.

The kernels take CuPy arrays through __cuda_array_interface__ (no copies) and write into a
CuPy output; with numpy activations (the tests, on Numba's CUDA simulator: NUMBA_ENABLE_CUDASIM=1,
with a numpy-like array module) each product copies in and out instead.

kquant.matmul.cuda is imported on first use: the CPU runtime never loads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

F32 = np.float32

# float matrices stay CuPy float32 arrays, multiplied by cuBLAS (as fast, and exact)
_FLOAT_TYPES = (T.F32, T.F16, T.BF16)


@dataclass(frozen=True)
class GpuMatrix:
    """A quantized weight matrix (rows, cols) as its ggml blocks on the device."""

    blocks: Any  # kquant.matmul.cuda.DeviceWeights
    qtype: T

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols), as the float matrix it stands for (what shape checks read)."""
        return self.blocks.rows, self.blocks.cols

    @property
    def ndim(self) -> int:
        return 2

    def product(self, x: Any, xp: Any) -> Any:
        """x @ W.T for float32 activations x (tokens, cols), already rounded as ggml rounds
        them for this type; a float32 (tokens, rows) array of x's kind."""
        from ..matmul import cuda as kernels

        x = xp.ascontiguousarray(x, dtype=F32)
        name = self.blocks.weight_type
        if isinstance(x, np.ndarray):  # host activations (the simulator): copied per product
            return kernels.matmul(self.blocks, name, x)
        out = xp.empty((x.shape[0], self.blocks.rows), F32)  # CuPy's pool, not Numba's
        kernels.matmul(self.blocks, name, x, out=out)
        return out

    def dequantized(self) -> np.ndarray:
        """The float32 matrix on the host (what GPTQ's sweep starts from)."""
        from ..codecs.api import dequantize

        raw = self.blocks.raw.copy_to_host()
        return dequantize(np.ascontiguousarray(raw), self.qtype)


class GpuBlocks:
    """Loads quantized matrices onto the device as GpuMatrix (the weights loader asks `keeps`
    for each 2-D tensor's type)."""

    def keeps(self, qtype: T) -> bool:
        """Whether a matrix of this type stays quantized on the device (every type with a
        block kernel but the float ones)."""
        from ..matmul.cuda_blocks import FAMILIES

        return qtype not in _FLOAT_TYPES and T(qtype).name in FAMILIES

    def load(self, raw: np.ndarray, qtype: T, xp: Any) -> GpuMatrix:
        """raw: uint8 (rows, row_bytes), the tensor's blocks as stored. With CuPy the bytes are
        copied by CuPy (its memory pool holds them) and the kernels read them in place."""
        from ..matmul import cuda as kernels

        dev = xp.asarray(np.ascontiguousarray(raw).view(np.uint8))
        return GpuMatrix(kernels.to_device(dev, T(qtype).name), T(qtype))
