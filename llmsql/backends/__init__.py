"""Backends registry: ``get_backend(spec)`` builds the backend a spec names.

Heavy libraries (torch, transformers, vllm) are imported only inside the backend modules,
when a backend is built, never at ``import llmsql``.
"""

from __future__ import annotations

import importlib
import importlib.util

from llmsql.backends.base import BackendSpec, Capabilities, LLMBackend, Request, Response
from llmsql.errors import ConfigError

# name -> "module:Class"; explicit, greppable dispatch.
BACKENDS: dict[str, str] = {
    "transformers": "llmsql.backends.transformers:TransformersBackend",
    "vllm": "llmsql.backends.vllm:VLLMBackend",
    "openai": "llmsql.backends.openai_compat:OpenAIBackend",
}

__all__ = [
    "BACKENDS",
    "BackendSpec",
    "Capabilities",
    "LLMBackend",
    "Request",
    "Response",
    "default_backend_kind",
    "get_backend",
]


def default_backend_kind() -> str:
    """``vllm`` when it is installed and an NVIDIA GPU is present, else ``transformers``."""
    if importlib.util.find_spec("vllm") is not None and _has_nvidia_gpu():
        return "vllm"
    return "transformers"


def _has_nvidia_gpu() -> bool:
    import os

    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus")


def get_backend(spec: BackendSpec) -> LLMBackend:
    """Build the backend named by ``spec.kind``.

    Raises:
        ConfigError: the kind is unknown, or its optional dependencies are missing.
    """
    target = BACKENDS.get(spec.kind)
    if target is None:
        msg = f"unknown backend {spec.kind!r}; choose one of: {', '.join(sorted(BACKENDS))}"
        raise ConfigError(msg)
    module_name, cls_name = target.split(":")
    module = importlib.import_module(module_name)
    backend: LLMBackend = getattr(module, cls_name)(spec)
    return backend
