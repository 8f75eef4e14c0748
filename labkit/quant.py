"""Quantization from scratch: int8 per-tensor / per-channel, int4 group-wise, a QuantLinear layer.

From scratch, for reading (all scales and zero points stored in fp16, 2 bytes each):

- int8 symmetric: ``q = round(w / s)`` clamped to [-127, 127], ``w ≈ q * s``. One ``s`` for the
  whole tensor (per-tensor) or one per output row (per-channel). ``s = max|w| / 127``, so one
  outlier weight stretches the grid of every weight that shares its scale.
- int4 group-wise: one scale (and, asymmetric, one zero) per ``group_size`` consecutive weights
  of a row. Symmetric: ``q`` in [-7, 7], ``w ≈ q * s``. Asymmetric: ``q`` in [0, 15],
  ``w ≈ q * s + z`` with ``z`` the group minimum (a zero point in the float domain). Two 4-bit
  codes are packed into one byte.

``QuantLinear`` really stores the int8 / packed int4 codes and dequantizes in ``forward`` (no
fused kernel: it teaches bytes and error, not speed); ``quantize_linears`` swaps it in for the
layers ``target_linears`` names: the decoder's ``nn.Linear`` layers, ``lm_head`` skipped by
default (in SmolLM2 it is tied to the input embedding, and keeping it in full precision is
usual). ``labkit.sizes.weight_bytes(model, layers="linear")`` counts what those layers hold.

Used by the quantization lab (lab 04). The library methods (torchao, bitsandbytes, vLLM fp8,
the deprecated torch.ao path) and their registry are in ``labkit.quant_methods``;
``labkit.bench.quant`` measures each one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

INT8_QMAX = 127
INT4_SYM_QMAX = 7
INT4_ASYM_QMAX = 15
DEFAULT_GROUP_SIZE = 32
DEFAULT_SKIP = ("lm_head",)
SCALE_DTYPE = torch.float16  # scales and zero points are stored in fp16 (2 bytes each)


# --- int8 --------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and fp16 scales of a 2-D weight ``[out, in]``.

    Returns ``(q, scale)``: ``q`` int8 of ``w``'s shape; ``scale`` fp16 of shape ``[out, 1]``
    (per output row) or ``[]`` (one for the tensor). An all-zero row gets scale 1.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_int8 expects a 2-D [out, in] weight, got {tuple(w.shape)}")
    w = w.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = torch.where(amax > 0, amax / INT8_QMAX, torch.ones_like(amax)).to(SCALE_DTYPE)
    q = torch.clamp(torch.round(w / scale.float()), -INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in fp32 (scale broadcasts: per-tensor ``[]`` or per-row ``[out, 1]``)."""
    return q.float() * scale.float()


def int8_bytes(shape: tuple[int, int], per_channel: bool = True) -> int:
    """Bytes of an int8-quantized ``[out, in]`` weight: 1 per code + 2 per fp16 scale."""
    out_f, in_f = shape
    return out_f * in_f + 2 * (out_f if per_channel else 1)


# --- int4 --------------------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (integers in [0, 15], last dim even) two per uint8 byte.

    Element ``2k`` goes in the low nibble of byte ``k``, element ``2k + 1`` in the high nibble.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError(f"int4 codes must be in [0, 15], got [{int(c.min())}, {int(c.max())}]")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 ``[..., n/2]`` -> codes in [0, 15] as uint8 ``[..., n]``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


@dataclass
class Int4Weight:
    """A group-wise int4 weight: packed codes, fp16 scales (and zero points when asymmetric)."""

    packed: torch.Tensor  # uint8 [out, in/2]
    scale: torch.Tensor  # fp16 [out, in/group_size]
    zero: torch.Tensor | None  # fp16 [out, in/group_size] (asymmetric) or None (symmetric)
    shape: tuple[int, int]
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def nbytes(self) -> int:
        """Bytes actually held: packed codes + scales (+ zero points)."""
        tensors = [self.packed, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(t.numel() * t.element_size() for t in tensors)


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                  symmetric: bool = False) -> Int4Weight:
    """Group-wise int4 of a 2-D weight ``[out, in]``; ``in`` must be a multiple of group_size."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int4 expects a 2-D [out, in] weight, got {tuple(w.shape)}")
    out_f, in_f = w.shape
    if group_size < 2 or group_size % 2 or in_f % group_size:
        raise ValueError(f"group_size must be even and divide in_features={in_f}, "
                         f"got {group_size}")
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    if symmetric:
        amax = g.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / INT4_SYM_QMAX, torch.ones_like(amax)).to(SCALE_DTYPE)
        q = torch.clamp(torch.round(g / scale.float()), -INT4_SYM_QMAX, INT4_SYM_QMAX) + 8
        zero = None
    else:
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        span = hi - lo
        scale = torch.where(span > 0, span / INT4_ASYM_QMAX, torch.ones_like(span)).to(SCALE_DTYPE)
        zero = lo.to(SCALE_DTYPE)
        q = torch.clamp(torch.round((g - zero.float()) / scale.float()), 0, INT4_ASYM_QMAX)
        zero = zero.squeeze(-1)
    packed = pack_int4(q.to(torch.uint8).reshape(out_f, in_f))
    return Int4Weight(packed, scale.squeeze(-1), zero, (out_f, in_f), group_size)


def dequantize_int4(qw: Int4Weight) -> torch.Tensor:
    """The fp32 weight an ``Int4Weight`` stands for."""
    out_f, in_f = qw.shape
    codes = unpack_int4(qw.packed).float().reshape(out_f, in_f // qw.group_size, qw.group_size)
    if qw.zero is None:
        w = (codes - 8) * qw.scale.float().unsqueeze(-1)
    else:
        w = codes * qw.scale.float().unsqueeze(-1) + qw.zero.float().unsqueeze(-1)
    return w.reshape(out_f, in_f)


def int4_bytes(shape: tuple[int, int], group_size: int = DEFAULT_GROUP_SIZE,
               symmetric: bool = False) -> int:
    """Bytes of a group-wise int4 ``[out, in]`` weight: half a byte per code, 2 per fp16 scale,
    and (asymmetric) 2 per fp16 zero point, one scale/zero per group of ``group_size``."""
    out_f, in_f = shape
    groups = out_f * math.ceil(in_f / group_size)
    return math.ceil(out_f * in_f / 2) + groups * 2 * (1 if symmetric else 2)


# --- a linear layer that stores int8 / int4 ------------------------------------------------------

SCHEMES = ("int8-tensor", "int8-channel", "int4", "int4-sym")


class QuantLinear(nn.Module):
    """``nn.Linear`` whose weight is stored as int8 or packed int4 codes plus fp16 scales.

    ``forward`` dequantizes the whole weight to the input's dtype, then runs a dense matmul: the
    numbers are those of the quantized model, the speed is not that of a fused int kernel.
    """

    def __init__(self, linear: nn.Linear, scheme: str = "int8-channel",
                 group_size: int = DEFAULT_GROUP_SIZE) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
        self.scheme, self.group_size = scheme, group_size
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if scheme.startswith("int8"):
            q, scale = quantize_int8(w, per_channel=scheme == "int8-channel")
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
            self.zero = None
        else:
            qw = quantize_int4(w, group_size, symmetric=scheme == "int4-sym")
            self.register_buffer("qweight", qw.packed)
            self.register_buffer("scale", qw.scale)
            self.register_buffer("zero", qw.zero)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight the stored codes stand for."""
        if self.scheme.startswith("int8"):
            return dequantize_int8(self.qweight, self.scale)
        qw = Int4Weight(self.qweight, self.scale, self.zero,
                        (self.out_features, self.in_features), self.group_size)
        return dequantize_int4(qw)

    def weight_nbytes(self) -> int:
        """Bytes held for the weight: codes + scales (+ zero points); the bias is not counted."""
        held = [self.qweight, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(t.numel() * t.element_size() for t in held)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme}, group_size={self.group_size}")


def _name_ends_with(name: str, parts: tuple[str, ...]) -> bool:
    """Whether a module name's last dotted parts are one of ``parts`` (``"mlp.up_proj"`` ends
    with ``"up_proj"``, not with ``"proj"``)."""
    return any(name == p or name.endswith("." + p) for p in parts)


def target_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP,
                   only: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The layers quantization and pruning (``labkit.prune``) act on: every ``nn.Linear`` /
    ``QuantLinear`` whose name does not end with one of ``skip`` (default: ``lm_head``) and,
    when ``only`` is given, does end with one of ``only`` (``("up_proj",)``: every MLP up
    projection)."""
    skip = tuple(skip)
    only = None if only is None else tuple(only)
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, QuantLinear)) and not _name_ends_with(name, skip)
            and (only is None or _name_ends_with(name, only))}


def quantize_linears(model: nn.Module, scheme: str = "int8-channel",
                     group_size: int = DEFAULT_GROUP_SIZE,
                     skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Replace the target ``nn.Linear`` layers with ``QuantLinear`` (in place); returns model."""
    for name, mod in list(target_linears(model, skip).items()):
        if isinstance(mod, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, QuantLinear(mod, scheme, group_size))
    return model


def quantization_error(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """How far a dequantized weight is from the original: max and RMS absolute error, and the
    relative error ``||w - w_hat|| / ||w||`` (Frobenius norms)."""
    d = (w.float() - w_hat.float())
    return {"max_abs": float(d.abs().max()), "rms": float(d.pow(2).mean().sqrt()),
            "relative": float(d.norm() / w.float().norm().clamp_min(1e-30))}
