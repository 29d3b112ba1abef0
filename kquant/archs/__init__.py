"""The architectures kquant converts and runs, one file each, found by GGUF architecture name.

    from kquant.archs import get_arch, arch_for_hf_class
    get_arch("qwen2").rope_neox                    # True
    arch_for_hf_class("MistralForCausalLM").name   # "llama"

Each module here other than base.py and checks.py is named after a GGUF architecture
(general.architecture) and defines `ARCH`, an `Arch` record (kquant.archs.base) holding
everything kquant knows about it: how convert_hf_to_gguf.py converts its Hugging Face folders,
what the runtime's blocks look like, and the tensors llama.cpp's loader creates for it (which
checks.py checks a model against).  The registry imports every such module, so supporting a new
architecture is one new file here (and a fixture with its reference to test it).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Arch

__all__ = ["Arch", "ARCHS", "get_arch", "arch_for_hf_class", "arch_for_model_type", "hf_classes",
           "check_tensors", "model_dims"]

# the modules here that are no architecture
_NOT_ARCHS = ("base", "checks")


def _discover() -> dict[str, Arch]:
    archs: dict[str, Arch] = {}
    # sorted, so that lists shown to the user have one order
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module in _NOT_ARCHS or module.startswith("_"):
            continue
        arch = importlib.import_module(f"{__name__}.{module}").ARCH
        if arch.name != module:  # the file name is how get_arch finds it: keep them one
            raise ImportError(f"kquant/archs/{module}.py defines architecture {arch.name!r}")
        if not arch.tensors:  # every model of it would fail kquant.archs.checks
            raise ImportError(f"kquant/archs/{module}.py declares no tensors")
        archs[module] = arch
    return archs


# GGUF architecture name -> its record
ARCHS: dict[str, Arch] = _discover()
_BY_HF_CLASS = {cls: arch for arch in ARCHS.values() for cls in arch.hf_classes}
_BY_MODEL_TYPE = {mt: arch for arch in ARCHS.values() for mt in arch.config_defaults}


def get_arch(name: str) -> Arch:
    """The record of GGUF architecture `name` (KeyError if kquant does not know it)."""
    return ARCHS[name]


def arch_for_hf_class(hf_class: str | None) -> Arch | None:
    """The architecture config.json's "architectures" class converts to, if kquant converts it."""
    return _BY_HF_CLASS.get(hf_class) if isinstance(hf_class, str) else None


def arch_for_model_type(model_type: object) -> Arch | None:
    """The architecture whose transformers config defaults cover config.json's model_type."""
    return _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None


def hf_classes() -> list[str]:
    """Every Hugging Face class kquant converts, in registry order."""
    return list(_BY_HF_CLASS)


from .checks import check_tensors, model_dims  # noqa: E402  (it reads ARCHS)
