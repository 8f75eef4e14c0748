"""What weights weigh, in bytes: one tensor, a model in memory, a checkpoint on disk.

- ``tensor_bytes``: bytes a tensor holds as stored, quantized tensor types included.
- ``weight_bytes(model)``: everything the model holds (``layers="all"``: parameters and buffers,
  tied weights once), what one decode step reads for the roofline of ``labkit.roofline``
  (lab 01); or only the weights of the layers quantization acts on (``layers="linear"``: the
  decoder's linear layers, ``lm_head`` skipped), codes, scales and zero points included, the
  size the quantization lab (lab 04) compares; ``as_dtype`` gives those layers' size in another
  dtype (``torch.float16``: the ``fp16_weight_bytes`` of the quant bench).
- ``checkpoint_bytes(path)``: the weights of a safetensors checkpoint counted from the file
  headers (nothing loaded), for an engine whose model lives in its own worker (vLLM).

torch is imported inside functions (as in ``labkit.profiling``), so the import is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from labkit.config import choose

LAYERS = ("all", "linear")


def tensor_bytes(t) -> int:
    """Bytes a tensor holds as stored. A tensor subclass (torchao's quantized weights) is the sum
    of its inner tensors; a bitsandbytes weight adds its scales (int8 ``SCB``, NF4 ``absmax``)."""
    import torch

    if t is None:
        return 0
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    total = t.numel() * t.element_size()
    scb = getattr(t, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    state = getattr(t, "quant_state", None)
    while state is not None:  # NF4: absmax per block, itself quantized with double quantization
        absmax = getattr(state, "absmax", None)
        if isinstance(absmax, torch.Tensor):
            total += absmax.numel() * absmax.element_size()
        state = getattr(state, "state2", None)
    return total


def weight_bytes(model, *, layers: str = "all", skip: Iterable[str] | None = None,
                 as_dtype=None) -> int:
    """Bytes of a model's weights as stored now.

    ``layers="all"``: every parameter and buffer the model holds (tied weights counted once,
    quantized ones as ``tensor_bytes`` counts them, e.g. ``QuantLinear`` codes in buffers).
    ``layers="linear"``: only the weights of ``labkit.quant.target_linears(model, skip)`` (the
    ``nn.Linear`` / ``QuantLinear`` layers, ``lm_head`` skipped by default; biases not counted):
    codes, scales and zero points for quantized layers (labkit's or torchao's), ``numel * element
    size`` for dense ones; with ``as_dtype`` (a torch dtype), the bytes of those layers' weights
    stored densely in that dtype, ``out_features * in_features * itemsize`` each. ``skip`` and
    ``as_dtype`` apply to ``layers="linear"`` only: a quantized tensor's element count is not
    its logical size, so "everything in another dtype" has no single answer.
    """
    choose(layers, LAYERS, "layers")
    if layers == "all":
        if skip is not None or as_dtype is not None:
            raise ValueError(f"skip and as_dtype apply to layers='linear' only; got skip={skip!r}, "
                             f"as_dtype={as_dtype!r} with layers='all'")
        seen, total = set(), 0
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += tensor_bytes(t)
        return total
    from labkit.quant import DEFAULT_SKIP, QuantLinear, target_linears

    targets = target_linears(model, DEFAULT_SKIP if skip is None else skip).values()
    if as_dtype is not None:
        return sum(as_dtype.itemsize * m.out_features * m.in_features for m in targets)
    return sum(m.weight_nbytes() if isinstance(m, QuantLinear) else tensor_bytes(m.weight)
               for m in targets)


def checkpoint_bytes(path: str | Path, *, element_bytes: int = 2,
                     linear_element_bytes: int | None = None) -> int:
    """Bytes of the tensors in the ``*.safetensors`` files of folder ``path``, counted from the
    files' headers (shapes only, nothing loaded), ``element_bytes`` per element (2: bf16, the
    dtype vLLM serves in). ``linear_element_bytes``: the decoder's linear weights (names ending
    ``_proj.weight``) take that many per element instead (1: vLLM's fp8 mode, whose per-tensor
    scales are negligible); embeddings, norms and the output layer keep ``element_bytes``."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                numel = math.prod(f.get_slice(name).get_shape())
                linear = linear_element_bytes is not None and name.endswith("_proj.weight")
                total += numel * (linear_element_bytes if linear else element_bytes)
    return total
