"""Quantization through libraries: one registry of methods, each with why it cannot run here.

``METHODS`` maps a name to a ``Method``: the from-scratch schemes of ``labkit.quant``, dtype
casts (fp32 / bf16 / fp16), torchao (int8 weight-only, int8 dynamic, int4 weight-only),
bitsandbytes (LLM.int8(), NF4), vLLM's fp8 (run inside the vLLM engine) and the deprecated
``torch.ao.quantization.quantize_dynamic``, kept as a warning example. ``can_run(device)``
returns None or the reason (no CUDA, a package missing), so a lab or bench shows the row as
skipped instead of failing; ``get_method`` and ``cannot_run`` look a name up.

Used by the quantization lab (lab 04) and ``labkit.bench.quant``. Libraries are imported when a
method is applied: ``import labkit.quant_methods`` loads no torchao, bitsandbytes or vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from labkit.quant import DEFAULT_GROUP_SIZE, quantize_linears, target_linears


@dataclass(frozen=True)
class Method:
    """One way to make a model smaller. ``can_run(device)`` returns None or why not;
    ``apply(model)`` returns the quantized model (None for methods run inside an engine)."""

    name: str
    description: str
    can_run: Callable[[torch.device], str | None]
    apply: Callable[[nn.Module], nn.Module] | None = None
    engine: str | None = None  # run inside this labkit engine instead (apply is None)
    engine_kwargs: dict = field(default_factory=dict)


def _always(device: torch.device) -> None:
    return None


def _needs(*, cuda: bool = False, cpu: bool = False, module: str | None = None,
           pip: str | None = None):
    def check(device: torch.device) -> str | None:
        import importlib.util

        if cuda and device.type != "cuda":
            return f"needs a CUDA GPU (device here: {device.type})"
        if cpu and device.type != "cpu":
            return f"runs on CPU only (device here: {device.type})"
        if module and importlib.util.find_spec(module) is None:
            return f"needs the {module} package: pip install {pip or module}"
        return None
    return check


class _EnumNoticeFilter:
    """A logging filter dropping torch's 'is an Enum subclass and is now natively supported'."""

    def filter(self, log_record) -> bool:
        return "is an Enum subclass" not in log_record.getMessage()


def import_torchao():
    """``torchao.quantization``, imported with its import-time log lines (missing optional GPU
    kernels, pytree deprecation notices) silenced: they are timestamped noise on CPU."""
    import logging

    from labkit.models import NOISY_LOGGERS

    # torchao registers enums with torch's pytree later too (when transformers loads a model);
    # torch logs a deprecation line each time. Drop exactly that message, nothing else.
    pytree = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _EnumNoticeFilter) for f in pytree.filters):
        pytree.addFilter(_EnumNoticeFilter())
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return tq


def _torchao(config_name: str, dtype: torch.dtype | None = None,
             **kwargs) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        tq = import_torchao()
        if dtype is not None:  # e.g. int4 weight-only packs bf16 weights for its CUDA kernel
            model = model.to(dtype)
        targets = set(target_linears(model).values())
        tq.quantize_(model, getattr(tq, config_name)(**kwargs),
                     filter_fn=lambda mod, fqn: mod in targets)
        return model
    return apply


def _scratch(scheme: str, group_size: int = DEFAULT_GROUP_SIZE):
    return lambda model: quantize_linears(model, scheme, group_size)


def _bnb(kind: str) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        import bitsandbytes as bnb

        model = model.to(torch.float16 if kind == "int8" else torch.bfloat16)
        device = next(model.parameters()).device
        for name, lin in list(target_linears(model).items()):
            w = lin.weight.detach().to(torch.float16).cpu()
            has_bias = lin.bias is not None  # Qwen2-style q/k/v biases must survive
            if kind == "int8":
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias,
                                        compute_dtype=torch.bfloat16, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            if has_bias:
                new.bias = nn.Parameter(lin.bias.detach().to(model.dtype).cpu(),
                                        requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    new.to(device))  # moving to the GPU is what quantizes the weight
        return model
    return apply


def _legacy_dynamic(model: nn.Module) -> nn.Module:
    """torch.ao's deprecated eager-mode dynamic int8 (per-tensor weights): a warning example."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        names = set(target_linears(model))
        return quantize_dynamic(model.float(), {n: torch.ao.quantization.default_dynamic_qconfig
                                                for n in names}, dtype=torch.qint8)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("fp32", "full precision (float32)", _always, lambda m: m.float()),
    Method("bf16", "bfloat16 weights and activations", _always, lambda m: m.to(torch.bfloat16)),
    Method("fp16", "float16 weights and activations", _always, lambda m: m.to(torch.float16)),
    Method("int8-tensor", "from scratch: int8, one scale per tensor", _always,
           _scratch("int8-tensor")),
    Method("int8-channel", "from scratch: int8, one scale per output row", _always,
           _scratch("int8-channel")),
    Method("int4-g32", "from scratch: int4 asymmetric, groups of 32", _always, _scratch("int4")),
    Method("int4-g32-sym", "from scratch: int4 symmetric, groups of 32", _always,
           _scratch("int4-sym")),
    Method("int4-g64", "from scratch: int4 asymmetric, groups of 64", _always,
           _scratch("int4", 64)),
    Method("int8-wo", "torchao int8 weight-only", _needs(module="torchao"),
           _torchao("Int8WeightOnlyConfig")),
    Method("int8-dyn", "torchao int8 dynamic activations, int8 weights",
           _needs(module="torchao"), _torchao("Int8DynamicActivationInt8WeightConfig")),
    # tile_packed_to_4d runs PyTorch's own tinygemm kernel (aten._weight_int4pack_mm); torchao's
    # default "plain" format needs the separate mslk kernel package (seen on the H200 run).
    Method("int4-wo", "torchao int4 weight-only, groups of 64 (tinygemm kernel)",
           _needs(cuda=True, module="torchao"), _torchao("Int4WeightOnlyConfig", torch.bfloat16,
                                                      group_size=64,
                                                      int4_packing_format="tile_packed_to_4d")),
    Method("bnb-int8", "bitsandbytes LLM.int8()", _needs(cuda=True, module="bitsandbytes"),
           _bnb("int8")),
    Method("bnb-nf4", "bitsandbytes 4-bit NormalFloat", _needs(cuda=True, module="bitsandbytes"),
           _bnb("nf4")),
    Method("fp8", "vLLM fp8 weights (quantization='fp8' in the vLLM engine)",
           _needs(cuda=True, module="vllm"), None, engine="vllm",
           engine_kwargs={"quantization": "fp8"}),
    Method("torch-ao-dynamic", "DEPRECATED torch.ao.quantization.quantize_dynamic (warning)",
           _needs(cpu=True), _legacy_dynamic),
]}

DEFAULT_METHODS = ("fp32", "bf16", "int8-wo", "int8-dyn", "int8-channel", "int4-g32",
                   "int4-wo", "bnb-int8", "bnb-nf4", "fp8")


def get_method(name: str) -> Method:
    """The registry entry for ``name``; a ValueError lists the known names."""
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; choose one of: "
                         f"{', '.join(METHODS)}")
    return METHODS[name]


def cannot_run(name: str, device: torch.device | str | None = None) -> str | None:
    """Why method ``name`` cannot run on ``device`` here, or None when it can."""
    from labkit.device import pick_device

    return get_method(name).can_run(pick_device(str(device) if device is not None else None))
