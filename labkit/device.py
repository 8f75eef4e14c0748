"""One way to pick the device, synchronize it, and look up what the hardware can do.

The spec table holds vendor datasheet figures: HBM bandwidth (bytes/s) and dense bf16 tensor-core
peak (FLOP/s, without sparsity). They set the roofline bounds of the profiling lab.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet figures of one GPU model."""

    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    memory_bytes: float


# Matched by substring against torch.cuda.get_device_name(), most specific first.
GPU_SPECS: tuple[tuple[str, GPUSpec], ...] = (
    ("H200", GPUSpec("NVIDIA H200", 4.8e12, 989e12, 141e9)),
    ("H100 NVL", GPUSpec("NVIDIA H100 NVL", 3.9e12, 835e12, 94e9)),
    ("H100 PCIe", GPUSpec("NVIDIA H100 PCIe", 2.0e12, 756e12, 80e9)),
    ("H100", GPUSpec("NVIDIA H100 SXM", 3.35e12, 989e12, 80e9)),
    ("A100-SXM4-80GB", GPUSpec("NVIDIA A100 80GB SXM", 2.039e12, 312e12, 80e9)),
    ("A100 80GB PCIe", GPUSpec("NVIDIA A100 80GB PCIe", 1.935e12, 312e12, 80e9)),
    ("A100", GPUSpec("NVIDIA A100 40GB", 1.555e12, 312e12, 40e9)),
    ("L40S", GPUSpec("NVIDIA L40S", 864e9, 362e12, 48e9)),
    ("L4", GPUSpec("NVIDIA L4", 300e9, 121e12, 24e9)),
    ("A10G", GPUSpec("NVIDIA A10G", 600e9, 70e12, 24e9)),
    ("T4", GPUSpec("NVIDIA T4 (fp16)", 320e9, 65e12, 16e9)),
)


def has_cuda() -> bool:
    """True when a CUDA GPU is visible to torch."""
    return torch.cuda.is_available()


def pick_device(device: str | None = None) -> torch.device:
    """The device labs run on: ``device`` if given, else LABKIT_DEVICE, else cuda if present."""
    name = device or os.environ.get("LABKIT_DEVICE") or ("cuda" if has_cuda() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not has_cuda():
        raise RuntimeError(f"device {name!r} asked for, but torch sees no CUDA GPU; use 'cpu'")
    return dev


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work to finish (no-op on CPU). Call before reading a clock."""
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(device: torch.device | str | None = None) -> str:
    """``"cpu"`` or the GPU's name as the driver reports it (e.g. ``NVIDIA H100 80GB HBM3``)."""
    dev = torch.device(device) if device is not None else pick_device()
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def gpu_spec(name: str | None = None) -> GPUSpec | None:
    """Datasheet figures for a GPU name (default: the current GPU); None if not in the table."""
    name = name or (device_name() if has_cuda() else "")
    for key, spec in GPU_SPECS:
        if key.lower() in name.lower():
            return spec
    return None


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on a GPU (what serving uses), fp32 on CPU (exact enough for equality tests)."""
    dev = torch.device(device) if device is not None else pick_device()
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def to_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None):
    """Turn ``"auto"``, ``"bfloat16"`` … or a torch dtype into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return default_dtype(device)
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(allowed)}")
    return allowed[dtype]
