"""The engine registry: an engine's name (``hf``, ``hf-cb``, ``vllm``, ``auto``) to an Engine."""

from __future__ import annotations

import importlib.util

from labkit.config import DEFAULT_MODEL, ENGINES, choose
from labkit.engines.base import Engine


def vllm_available() -> bool:
    """True when the vllm package is installed (found without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(name: str) -> str:
    """The concrete engine for a name: ``auto`` becomes vllm (GPU + vLLM) or hf."""
    name = choose(name, ENGINES, "engine")
    if name != "auto":
        return name
    from labkit.device import has_cuda

    return "vllm" if has_cuda() and vllm_available() else "hf"


def get_engine(name: str = "auto", model: str = DEFAULT_MODEL, **kwargs) -> Engine:
    """Build an engine by name (see the table above); ``kwargs`` go to its constructor."""
    name = resolve_engine(name)
    if name == "hf":
        from labkit.engines.hf import HFEngine

        return HFEngine(model, **kwargs)
    if name == "hf-cb":
        from labkit.engines.hf_cb import HFContinuousEngine

        return HFContinuousEngine(model, **kwargs)
    from labkit.engines.vllm import VLLMEngine

    return VLLMEngine(model, **kwargs)


def as_engine(engine: str | Engine, model: str, **engine_kwargs) -> tuple[Engine, bool]:
    """``(engine, owned)``: an Engine passed in as it is (``owned=False``: the caller keeps
    it), or a new one built by name (``owned=True``: close it when done)."""
    if isinstance(engine, Engine):
        return engine, False
    return get_engine(engine, model=model, **engine_kwargs), True


def engine_device(engine: Engine) -> str | None:
    """The device name an engine runs on (``labkit.device.device_name``), or None if unknown
    (a ``ProcessEngine`` reports its child's)."""
    from labkit.device import device_name

    if getattr(engine, "device_label", None):
        return engine.device_label
    dev = getattr(engine, "device", None)
    try:
        return device_name(dev) if dev is not None else None
    except (RuntimeError, TypeError, ValueError):
        return None
