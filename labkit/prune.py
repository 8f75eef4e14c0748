"""Pruning from scratch: magnitude (per layer or global), 2:4 semi-structured, and what it buys.

- ``magnitude_mask``: keep the largest ``|w|``; ``prune_linears`` applies it to a model's linear
  layers, each layer to the same sparsity (``scope="layer"``) or one threshold for all
  (``scope="global"``: layers with many small weights lose more of them).
- ``mask_2_4``: of every 4 consecutive weights along the input dimension keep the 2 largest, the
  pattern NVIDIA's sparse tensor cores (Ampere and newer) run at up to twice the dense rate.
- ``storage_bytes``: what a pruned weight costs to keep. A dense tensor full of zeros costs
  exactly what it did: sparsity saves memory only in a sparse format, and those carry indices.
- ``semi_structured_speedup``: dense vs 2:4 sparse matmul time through PyTorch's
  ``to_sparse_semi_structured`` (cuSPARSELt or CUTLASS kernels) at given layer shapes and token
  counts; on a CPU, or a GPU before Ampere, every row is skipped with the reason.

Pruned weights stay dense tensors with zeros here (a mask applied in place), so quality can be
measured with any engine; the speed of real sparse kernels is measured separately. torch is
imported inside functions: ``import labkit.prune`` is cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SCOPES = ("layer", "global")
DEFAULT_SKIP = ("lm_head",)  # the output projection is tied to the embedding in small models
INDEX_BYTES = 4  # a 32-bit column index per kept weight in CSR


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), "
                         f"got {sparsity!r}")


def magnitude_mask(w, sparsity: float):
    """Boolean mask of ``w``'s shape, False for the ``round(sparsity * w.numel())`` weights of
    smallest magnitude (ties broken by position), True for the rest."""
    import torch

    _check_sparsity(sparsity)
    k = round(sparsity * w.numel())
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if k:
        mask[torch.topk(w.detach().abs().flatten().float(), k, largest=False).indices] = False
    return mask.view_as(w)


def mask_2_4(w):
    """Boolean 2:4 mask: in every group of 4 consecutive weights of a row (the input dimension,
    the last one), True for the 2 of largest magnitude. The last dimension must divide by 4."""
    import torch

    if w.shape[-1] % 4:
        raise ValueError(f"2:4 pruning needs the last dimension to divide by 4, got shape "
                         f"{tuple(w.shape)}")
    groups = w.detach().abs().float().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.view_as(w)


def target_linears(model, skip: Iterable[str] = DEFAULT_SKIP) -> dict:
    """``{name: module}`` of the model's ``nn.Linear`` layers whose name has no part in ``skip``."""
    from torch import nn

    skip = tuple(skip)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)}


def prune_linears(model, sparsity: float, scope: str = "layer",
                  skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, float]:
    """Zero the smallest-magnitude weights of the model's linear layers in place.

    ``scope="layer"``: each layer loses ``sparsity`` of its weights; ``"global"``: one magnitude
    threshold over all of them, so the total reaches ``sparsity`` and layers differ. Returns each
    layer's sparsity after pruning (fraction of zeros).
    """
    import torch

    _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    layers = target_linears(model, skip)
    if not layers:
        raise ValueError(f"the model has no linear layer outside skip={tuple(skip)!r}")
    with torch.no_grad():
        if scope == "layer":
            for m in layers.values():
                m.weight.mul_(magnitude_mask(m.weight, sparsity))
        else:
            flat = torch.cat([m.weight.detach().abs().flatten().float() for m in layers.values()])
            mask = magnitude_mask(flat, sparsity)
            start = 0
            for m in layers.values():
                n = m.weight.numel()
                m.weight.mul_(mask[start:start + n].view_as(m.weight).to(m.weight.device))
                start += n
    return {name: sparsity_of(m.weight) for name, m in layers.items()}


def prune_2_4(model, skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, float]:
    """Apply ``mask_2_4`` to every target linear layer in place; returns each layer's sparsity
    (0.5 unless a group already held zeros)."""
    import torch

    layers = target_linears(model, skip)
    with torch.no_grad():
        for m in layers.values():
            m.weight.mul_(mask_2_4(m.weight))
    return {name: sparsity_of(m.weight) for name, m in layers.items()}


def sparsity_of(w) -> float:
    """Fraction of exact zeros in a tensor."""
    return float((w == 0).sum().item()) / w.numel()


def model_sparsity(model, skip: Iterable[str] = DEFAULT_SKIP) -> float:
    """Fraction of zeros over all target linear weights together."""
    layers = target_linears(model, skip).values()
    zeros = sum(int((m.weight == 0).sum().item()) for m in layers)
    return zeros / sum(m.weight.numel() for m in target_linears(model, skip).values())


def storage_bytes(w, fmt: str = "dense", value_bytes: int | None = None) -> int:
    """Bytes to store ``w`` as ``fmt``: ``"dense"`` (zeros cost as much as any value), ``"csr"``
    (each nonzero: value + 4-byte column index; one 8-byte row pointer per row + 1) or ``"2:4"``
    (half the values, plus 2 bits of position metadata per kept value, as cuSPARSELt stores it).
    ``value_bytes`` defaults to the tensor's element size."""
    vb = value_bytes or w.element_size()
    if fmt == "dense":
        return w.numel() * vb
    if fmt == "csr":
        nnz = int((w != 0).sum().item())
        return nnz * (vb + INDEX_BYTES) + 8 * (w.shape[0] + 1)
    if fmt == "2:4":
        kept = w.numel() // 2
        return kept * vb + (kept * 2 + 7) // 8
    raise ValueError(f"unknown storage format {fmt!r}; choose one of: dense, csr, 2:4")


def semi_structured_skip_reason(device=None) -> str | None:
    """Why 2:4 sparse kernels cannot run here, or None when they can (CUDA, compute >= 8.0)."""
    import torch

    if not torch.cuda.is_available():
        return "2:4 sparse kernels need an NVIDIA GPU (Ampere or newer); this run has no CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"2:4 sparse kernels need compute capability >= 8.0 (Ampere); this GPU has "
                f"{major}.{minor}")
    return None


def _graphed(fn):
    """``fn`` captured once in a CUDA graph; the returned callable replays it (no host work per
    call beyond the launch of the graph)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph (library handles, workspace)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def semi_structured_speedup(shapes: Sequence[tuple[int, int]], tokens: Sequence[int] = (1, 16, 256),
                            dtype: str = "bfloat16", warmup: int = 5, repeats: int = 50,
                            seed: int = 0) -> list[dict]:
    """Time ``y = x @ W.T`` with ``W`` dense and ``W`` 2:4-sparse, for each weight shape
    ``(out_features, in_features)`` and each number of tokens (rows of ``x``).

    Each matmul is timed twice (median of ``repeats`` synchronized calls after ``warmup``,
    ``labkit.profiling.time_fn``): called from Python (``*_eager_ms``) and replayed from a CUDA
    graph (``dense_ms``, ``sparse_ms``), which removes the host-side cost of each call (PyTorch's
    sparse tensor subclass and cuSPARSELt's per-call set-up take a large, fixed part of a small
    matmul). ``matmul_speedup`` = dense_ms / sparse_ms (both graphed: the kernels' own speed);
    ``eager_speedup`` the same from Python. ``max_abs_error``: the sparse result against the
    dense matmul of the same pruned weight (bf16 rounding). Rows that cannot run have
    ``skipped`` (the reason) instead.
    """
    import torch

    from labkit.profiling import time_fn

    reason = semi_structured_skip_reason()
    if reason is not None:
        return [{"shape": list(s), "tokens": t, "skipped": reason} for s in shapes for t in tokens]
    from torch.sparse import to_sparse_semi_structured

    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    linear = torch.nn.functional.linear
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device="cuda", dtype=dt, generator=gen)
        w = w * mask_2_4(w)
        for t in tokens:
            x = torch.randn(t, in_f, device="cuda", dtype=dt, generator=gen)
            row = {"shape": [out_f, in_f], "tokens": t}
            try:
                w_sparse = to_sparse_semi_structured(w)
                ms = {}
                for name, weight in (("dense", w), ("sparse", w_sparse)):
                    def fn(x=x, weight=weight):
                        return linear(x, weight)

                    ms[f"{name}_eager_ms"] = time_fn(fn, warmup, repeats, "cuda").median_s * 1e3
                    ms[f"{name}_ms"] = time_fn(_graphed(fn), warmup, repeats,
                                               "cuda").median_s * 1e3
                err = (linear(x, w_sparse).float() - linear(x, w).float()).abs().max().item()
            except (RuntimeError, ValueError) as exc:
                rows.append({**row, "skipped": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append({**row, "dtype": dtype, **ms,
                         "matmul_speedup": ms["dense_ms"] / ms["sparse_ms"],
                         "eager_speedup": ms["dense_eager_ms"] / ms["sparse_eager_ms"],
                         "max_abs_error": err})
    return rows
