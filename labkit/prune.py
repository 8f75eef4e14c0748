"""Pruning from scratch: magnitude (per layer or global), 2:4 semi-structured, and what it buys.

- ``magnitude_mask``: keep the largest ``|w|``; ``prune_linears`` applies it to a model's linear
  layers, each layer to the same sparsity (``scope="layer"``) or one threshold for all
  (``scope="global"``: layers with many small weights lose more of them).
- ``mask_2_4``: of every 4 consecutive weights along the input dimension keep the 2 largest, the
  pattern NVIDIA's sparse tensor cores (Ampere and newer) run at up to twice the dense rate.
- ``storage_bytes``: what a pruned weight costs to keep. A dense tensor full of zeros costs
  exactly what it did: sparsity saves memory only in a sparse format, and those carry indices.
- ``sparsity_sweep`` and ``sensitivity_scan``: perplexity (``labkit.quality``) as sparsity grows,
  and when one layer type alone is pruned.
- Named methods for the quant bench's pruning rows: ``magnitude-<percent>`` (per layer),
  ``global-<percent>``, ``2:4`` and ``2:4+int8`` (2:4, then ``labkit.quant``'s per-channel int8).

Pruned weights stay dense tensors with zeros here (a mask applied in place), so quality can be
measured with any engine; the speed of real 2:4 sparse kernels is measured by
``labkit.bench.prune``. The layers pruned are ``labkit.quant.target_linears`` (``lm_head``
skipped), the same ones quantization acts on. Used by the model-optimization lab (lab 04).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from labkit.quant import DEFAULT_SKIP, QuantLinear, quantize_linears, target_linears
from labkit.widgets import Progress

SCOPES = ("layer", "global")
FORMATS = ("dense", "csr", "2:4")
INDEX_BYTES = 4  # a 32-bit column index per kept weight in CSR
ROW_POINTER_BYTES = 8  # a 64-bit offset per row (+ 1) in CSR
DEFAULT_METHODS = ("magnitude-30", "magnitude-50", "magnitude-70", "global-50", "2:4",
                   "2:4+int8")
METHOD_FORMS = "magnitude-<percent> (per layer), global-<percent>, 2:4, 2:4+int8"


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), "
                         f"got {sparsity!r}")


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of ``w``'s shape: False for the ``round(sparsity * w.numel())`` weights of
    smallest magnitude, True for the rest. Weights tied at the threshold are pruned in order of
    position (earlier first), so the count is exact even in weights with many equal values."""
    _check_sparsity(sparsity)
    k = round(sparsity * w.numel())
    flat = w.detach().abs().flatten().float()
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    threshold = _kth_smallest(flat, k)
    keep = flat > threshold
    tied = (flat == threshold).nonzero().flatten()
    below = flat.numel() - int(torch.count_nonzero(keep)) - tied.numel()
    keep[tied[k - below:]] = True  # prune all below, then the first (k - below) tied ones
    return keep.view_as(w)


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value of a 1-D tensor (1-based), exactly. Over ``2**16`` values, a
    strided sample of ``2**16`` to ``2**17`` of them brackets it first (its values 1 percentile
    either side of the k-th), so ``kthvalue`` runs only on the values in the bracket, a few
    percent of a layer or of a whole model; if the bracket misses, on all of them."""
    n = flat.numel()
    if n > 1 << 16:
        sample = flat[::n >> 16]
        m = sample.numel()
        lo = sample.kthvalue(max(1, int((k / n - 0.01) * m))).values
        hi = sample.kthvalue(min(m, int((k / n + 0.01) * m) + 1)).values
        below = int(torch.count_nonzero(flat < lo))
        inside = flat[(flat >= lo) & (flat <= hi)]
        if below < k <= below + inside.numel():
            return inside.kthvalue(k - below).values
    return flat.kthvalue(k).values


def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Boolean 2:4 mask: in every group of 4 consecutive weights of a row (the input dimension,
    the last one), True for the 2 of largest magnitude. The last dimension must divide by 4."""
    if w.shape[-1] % 4:
        raise ValueError(f"2:4 pruning needs the last dimension to divide by 4, got shape "
                         f"{tuple(w.shape)}")
    groups = w.detach().abs().float().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.view_as(w)


def prunable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP,
                     only: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """``labkit.quant.target_linears(model, skip, only)``, refusing a model whose layers are
    already quantized (prune first, then quantize: the zeros survive symmetric int8)."""
    layers = target_linears(model, skip, only)
    quantized = [name for name, m in layers.items() if isinstance(m, QuantLinear)]
    if quantized:
        raise ValueError(f"layer {quantized[0]!r} is already quantized; prune before quantizing")
    if not layers:
        raise ValueError(f"the model has no linear layer outside skip={tuple(skip)!r}"
                         + (f" among only={tuple(only)!r}" if only is not None else ""))
    return layers


def prune_linears(model: nn.Module, sparsity: float, scope: str = "layer",
                  skip: Iterable[str] = DEFAULT_SKIP,
                  only: Iterable[str] | None = None) -> dict[str, float]:
    """Zero the smallest-magnitude weights of the model's linear layers in place.

    ``scope="layer"``: each layer loses ``sparsity`` of its weights; ``"global"``: one magnitude
    threshold over all of them, so the total reaches ``sparsity`` and layers differ. ``only``
    (layer name endings such as ``("up_proj",)``) limits pruning to those layers. Returns each
    pruned layer's sparsity afterwards (fraction of zeros).
    """
    _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    layers = prunable_linears(model, skip, only)
    with torch.no_grad():
        if scope == "layer":
            for m in layers.values():
                m.weight.mul_(magnitude_mask(m.weight, sparsity))
        else:
            flat = torch.cat([m.weight.detach().flatten() for m in layers.values()])
            mask = magnitude_mask(flat, sparsity)
            start = 0
            for m in layers.values():
                n = m.weight.numel()
                m.weight.mul_(mask[start:start + n].view_as(m.weight))
                start += n
    return {name: sparsity_of(m.weight) for name, m in layers.items()}


def prune_2_4(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP,
              only: Iterable[str] | None = None) -> dict[str, float]:
    """Apply ``mask_2_4`` to every target linear layer in place; returns each layer's sparsity
    (0.5 unless a group already held zeros)."""
    layers = prunable_linears(model, skip, only)
    with torch.no_grad():
        for m in layers.values():
            m.weight.mul_(mask_2_4(m.weight))
    return {name: sparsity_of(m.weight) for name, m in layers.items()}


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of exact zeros in a tensor."""
    return int((w == 0).sum()) / w.numel()


def model_sparsity(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> float:
    """Fraction of zeros over all target linear weights together (quantized layers: their
    dequantized weights)."""
    weights = [m.dequantized_weight() if isinstance(m, QuantLinear) else m.weight
               for m in target_linears(model, skip).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def storage_bytes(w: torch.Tensor, fmt: str = "dense", value_bytes: int | None = None) -> int:
    """Bytes to store ``w`` as ``fmt``: ``"dense"`` (zeros cost as much as any value), ``"csr"``
    (each nonzero: value + 4-byte column index; one 8-byte row pointer per row + 1) or ``"2:4"``
    (half the values, plus 2 bits of position metadata per kept value, as cuSPARSELt stores it;
    ``w`` must follow the 2:4 pattern). ``value_bytes`` defaults to the tensor's element size."""
    vb = value_bytes or w.element_size()
    if fmt == "dense":
        return w.numel() * vb
    if fmt == "csr":
        nnz = int((w != 0).sum())
        return nnz * (vb + INDEX_BYTES) + ROW_POINTER_BYTES * (w.shape[0] + 1)
    if fmt == "2:4":
        kept = w.numel() // 2
        return kept * vb + (kept * 2 + 7) // 8
    raise ValueError(f"unknown storage format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def model_storage_bytes(model: nn.Module, fmt: str = "dense", value_bytes: int | None = None,
                        skip: Iterable[str] = DEFAULT_SKIP) -> int:
    """``storage_bytes`` summed over the model's target linear weights."""
    return sum(storage_bytes(m.weight, fmt, value_bytes)
               for m in prunable_linears(model, skip).values())


# --- named methods: the quant bench's pruning rows -----------------------------------------------

def parse_method(name: str) -> tuple[str, float] | None:
    """``"magnitude-50"`` -> ``("layer", 0.5)``, ``"global-30"`` -> ``("global", 0.3)``,
    ``"2:4"`` / ``"2:4+int8"`` -> ``(name, 0.5)``; None for a name that is no pruning method."""
    if name in ("2:4", "2:4+int8"):
        return name, 0.5
    found = re.fullmatch(r"(magnitude|global)-(\d{1,2})", name)
    if found is None:
        return None
    return ("layer" if found[1] == "magnitude" else "global"), int(found[2]) / 100


def is_method(name: str) -> bool:
    """Whether ``name`` is a pruning method (see ``parse_method``)."""
    return parse_method(name) is not None


def method_spec(name: str) -> tuple[str, float]:
    """``parse_method(name)``, or a ValueError naming the method forms allowed."""
    parsed = parse_method(name)
    if parsed is None:
        raise ValueError(f"unknown pruning method {name!r}; choose one of: {METHOD_FORMS}")
    return parsed


def describe(name: str) -> str:
    """One line saying what a pruning method does."""
    kind, sparsity = method_spec(name)
    if kind == "2:4":
        return "2:4 semi-structured: the 2 largest of every 4 weights kept"
    if kind == "2:4+int8":
        return "2:4 semi-structured, then int8 per output row (from scratch)"
    where = "each layer" if kind == "layer" else "one threshold over all layers"
    return f"magnitude pruning to {sparsity:.0%} zeros, {where}"


def apply_method(model: nn.Module, name: str) -> nn.Module:
    """Prune ``model`` in place by the named method (``2:4+int8`` also swaps in ``QuantLinear``
    int8 per-channel layers); returns the model."""
    kind, sparsity = method_spec(name)
    if kind in ("2:4", "2:4+int8"):
        prune_2_4(model)
        if kind == "2:4+int8":
            quantize_linears(model, "int8-channel")
    else:
        prune_linears(model, sparsity, kind)
    return model


# --- measured: perplexity as sparsity grows, and per layer type ----------------------------------

def layer_types(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """The distinct last name parts of the target linear layers (``q_proj``, ``up_proj``, ...),
    in the order they first appear."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in target_linears(model, skip)))


def sparsity_sweep(model: nn.Module, token_ids: Sequence[int], sparsities: Sequence[float],
                   scopes: Sequence[str] = SCOPES, window: int = 512, stride: int = 256,
                   progress: bool = True) -> list[dict]:
    """Perplexity of a pruned copy of ``model`` for every scope and sparsity (``model`` is left
    untouched). Rows: ``scope``, ``sparsity`` (requested), ``measured_sparsity`` (zeros over
    all target weights), ``by_type`` (``{layer type: mean sparsity of its layers}``: uneven
    under a global threshold) and ``perplexity`` on ``token_ids``; sparsity 0 is the dense
    model."""
    from labkit.quality import perplexity

    rows = []
    for scope, sparsity in Progress.wrap([(sc, s) for sc in scopes for s in sparsities],
                                         "sparsity sweep", progress):
        pruned = copy.deepcopy(model)
        per_layer = prune_linears(pruned, sparsity, scope)
        by_type: dict[str, list[float]] = {}
        for name, zeros in per_layer.items():
            by_type.setdefault(name.rpartition(".")[2], []).append(zeros)
        rows.append({"scope": scope, "sparsity": sparsity,
                     "measured_sparsity": model_sparsity(pruned),
                     "by_type": {k: sum(v) / len(v) for k, v in by_type.items()},
                     "perplexity": perplexity(pruned, token_ids, window, stride)})
        del pruned
    return rows


def sensitivity_scan(model: nn.Module, token_ids: Sequence[int], sparsity: float = 0.5,
                     window: int = 512, stride: int = 256,
                     progress: bool = True) -> dict[str, float]:
    """Perplexity when only one layer type (every ``q_proj``, every ``up_proj``, ...) is pruned
    per layer to ``sparsity``, the others left dense: ``{layer type: perplexity}``. The types
    whose pruning raises perplexity most are the ones to prune least."""
    from labkit.quality import perplexity

    out = {}
    for kind in Progress.wrap(layer_types(model), "sensitivity", progress):
        pruned = copy.deepcopy(model)
        prune_linears(pruned, sparsity, "layer", only=(kind,))
        out[kind] = perplexity(pruned, token_ids, window, stride)
        del pruned
    return out
