"""llama.cpp's own code, the reference kquant is checked against (tests and benchmarks only;
kquant itself never needs it).

- this module: the one loader of llama.cpp's shared libraries (libggml-base and libggml-cpu from
  llama-cpp-python, `pip install kquant[interop]`, or the builds named by $KQUANT_LIBGGML and
  $KQUANT_LIBGGML_CPU);
- `libggml`: ggml's quantizers and dequantizers (`GGML`), single ops on its CPU backend
  (`GGMLCompute`), and llama.cpp's `llama_model_quantize` (`llama_quantize`);
- `ggml_cpu`: ggml-cpu's per-type activation quantizers and vec_dot kernels (`GGMLCPU`);
- `repack`: ggml-cpu's weight repacking and its repacked GEMM/GEMV (`GGMLRepack`).

Every loader raises FileNotFoundError (with how to get the library) where it is missing, so
tests can skip on that one error.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

_NAMES = {"base": ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"),
          "cpu": ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll")}
_ENV = {"base": "KQUANT_LIBGGML", "cpu": "KQUANT_LIBGGML_CPU"}
_LOADED: dict[Path, ctypes.CDLL] = {}


def _llama_cpp_lib_folders() -> list[Path]:
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(folder) / "lib" for folder in spec.submodule_search_locations]


def find_library(which: str = "base", beside: Path | None = None) -> Path | None:
    """libggml-`which` ("base" or "cpu"): from its environment variable, else next to `beside`
    (for cpu: next to libggml-base), else in the installed llama_cpp package; None if absent."""
    env = os.environ.get(_ENV[which])
    if env:
        return Path(env) if Path(env).is_file() else None
    if which == "cpu" and beside is None:
        beside = find_library("base")
    folders = [beside.parent] if beside is not None else _llama_cpp_lib_folders()
    for folder in folders:
        for name in _NAMES[which]:
            if (folder / name).is_file():
                return folder / name
    return None


def find_libggml() -> Path | None:
    """libggml-base, or None."""
    return find_library("base")


def find_libggml_cpu() -> Path | None:
    """libggml-cpu, or None."""
    return find_library("cpu")


def load_library(which: str = "base", path: Path | str | None = None) -> ctypes.CDLL:
    """The loaded library (once per process; global symbols, which libggml-cpu needs from
    libggml-base). FileNotFoundError where it is missing."""
    if which == "cpu":
        load_library("base")
    found = Path(path) if path else find_library(which)
    if found is None or not found.is_file():
        raise FileNotFoundError(f"libggml-{which} not found: install llama-cpp-python==0.3.36 "
                                f"(pip install -e '.[interop]') or set {_ENV[which]}")
    if found not in _LOADED:
        _LOADED[found] = ctypes.CDLL(str(found), mode=ctypes.RTLD_GLOBAL)
    return _LOADED[found]
