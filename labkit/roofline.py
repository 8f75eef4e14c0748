"""The roofline, with both ceilings: how fast the hardware lets a step of a model run.

A step that does ``F`` FLOPs and moves ``B`` bytes has arithmetic intensity ``I = F / B``
(FLOP/byte). It can run no faster than ``min(peak FLOP/s, I * bandwidth)``: below the **ridge
point** ``peak / bandwidth`` the memory system is the limit (bandwidth-bound), above it the
arithmetic units are (compute-bound).

- ``memory_bandwidth`` / ``compute_peak``: the two ceilings in bytes/s and FLOP/s: a known GPU's
  datasheet figures (``labkit.device.gpu_spec``), else measured here (a STREAM-like copy, a large
  matmul); the source string says which.
- ``ridge_point``, ``attainable_flops``: the roofline itself.
- ``matmul_params``, ``flops_per_token``: the FLOPs a transformer spends on one token (2 per
  weight of every matmul, plus attention over the context).
- ``decode_intensity`` / ``prefill_intensity``: where a decode step of a batch and a prefill of a
  prompt sit on the x axis.
- ``decode_roofline``: the bound on decode tokens/s, from bandwidth and, given the FLOPs per
  token and the compute peak, from compute too.

Used by the profiling lab (lab 01) and its latency bench (``labkit.bench.latency``); lab 00 reads
the datasheet figures. torch is imported inside functions, so the import is cheap.
"""

from __future__ import annotations

from labkit.profiling import config_field, time_fn

# --- the two ceilings ---------------------------------------------------------------------------

def measure_memory_bandwidth(size_bytes: int = 256 * 2**20, repeats: int = 5,
                             device=None) -> float:
    """Measured copy bandwidth in bytes/s: ``dst.copy_(src)`` of ``size_bytes``, best of repeats.

    Each copy reads and writes the buffer, so bytes moved = 2 * size (as STREAM's Copy counts).
    Use it where no datasheet figure exists (CPUs); it is below a GPU's datasheet HBM figure.
    """
    import torch

    from labkit.device import pick_device

    dev = pick_device(device)
    n = max(1, int(size_bytes) // 4)
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    result = time_fn(lambda: dst.copy_(src), warmup=1, repeats=repeats, device=dev)
    return 2 * n * 4 / result.min_s


def memory_bandwidth(device=None) -> tuple[float, str]:
    """(bytes/s, where it came from): a known GPU's datasheet HBM figure, else a measured copy.

    CPUs have no spec table here, so on CPU (or an unknown GPU) this measures with
    ``measure_memory_bandwidth``; the source string says which.
    """
    from labkit.device import device_name, gpu_spec, pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        spec = gpu_spec(device_name(dev))
        if spec is not None:
            return spec.hbm_bytes_per_s, f"datasheet ({spec.name})"
    return measure_memory_bandwidth(device=dev), "measured copy"


def measure_matmul_flops(n: int = 1024, dtype=None, repeats: int = 5, device=None) -> float:
    """Measured matmul throughput in FLOP/s: an ``n x n`` by ``n x n`` product (``2 n**3``
    FLOPs) in ``dtype`` (default: the device's, ``labkit.device.default_dtype``), best of repeats.
    """
    import torch

    from labkit.device import default_dtype, pick_device

    dev = pick_device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype or default_dtype(dev))
    b = torch.randn_like(a)
    result = time_fn(lambda: a @ b, warmup=2, repeats=repeats, device=dev)
    return 2 * n**3 / result.min_s


def compute_peak(device=None, dtype=None) -> tuple[float, str]:
    """(FLOP/s, where it came from): a known GPU's dense bf16 datasheet peak, else a measured
    matmul in ``dtype`` (``measure_matmul_flops``); the source string says which."""
    from labkit.device import device_name, gpu_spec, pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        spec = gpu_spec(device_name(dev))
        if spec is not None:
            return spec.bf16_flops_per_s, f"datasheet bf16 ({spec.name})"
    return measure_matmul_flops(dtype=dtype, device=dev), "measured matmul"


# --- the roofline --------------------------------------------------------------------------------

def ridge_point(peak_flops_per_s: float, bandwidth_bytes_per_s: float) -> float:
    """The arithmetic intensity (FLOP/byte) where the two ceilings meet: ``peak / bandwidth``.
    A step below it is bandwidth-bound, above it compute-bound."""
    if peak_flops_per_s <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError(f"need peak > 0 and bandwidth > 0, got peak={peak_flops_per_s!r}, "
                         f"bandwidth={bandwidth_bytes_per_s!r}")
    return peak_flops_per_s / bandwidth_bytes_per_s


def attainable_flops(intensity: float, peak_flops_per_s: float,
                     bandwidth_bytes_per_s: float) -> float:
    """The roofline: the most FLOP/s a step of ``intensity`` FLOP/byte can reach,
    ``min(peak, intensity * bandwidth)``."""
    return min(peak_flops_per_s, intensity * bandwidth_bytes_per_s)


def matmul_params(model) -> int:
    """Weights that take part in a matmul for every token: every ``nn.Linear``'s weight, a tied
    ``lm_head`` included (it is a matmul even if it shares the embedding's storage)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(config, matmul_params: int, context_tokens: float) -> float:
    """FLOPs one token costs in a forward pass: ``2 * matmul_params`` (a multiply and an add per
    weight) plus attention over ``context_tokens`` earlier tokens, ``4 * layers * heads *
    head_dim * context`` (the scores ``q k^T`` and the weighted sum of values)."""
    layers = config_field(config, "num_hidden_layers")
    heads = config_field(config, "num_attention_heads")
    head_dim = config_field(config, "head_dim") or config_field(config, "hidden_size") // heads
    return 2.0 * matmul_params + 4.0 * layers * heads * head_dim * context_tokens


def decode_intensity(batch_size: int, flops_per_token: float, weight_bytes: float,
                     kv_bytes_per_token: float, context_tokens: float) -> float:
    """FLOP/byte of one decode step: ``batch_size`` tokens of FLOPs over the bytes it reads, the
    weights once (shared by the batch) and each sequence's KV cache of ``context_tokens``."""
    step_bytes = weight_bytes + batch_size * kv_bytes_per_token * context_tokens
    return batch_size * flops_per_token / step_bytes


def prefill_intensity(prompt_tokens: int, flops_per_token: float, weight_bytes: float,
                      kv_bytes_per_token: float) -> float:
    """FLOP/byte of a prefill: every prompt token's FLOPs over one read of the weights plus the
    KV cache it writes (``prompt_tokens * kv_bytes_per_token``)."""
    return prompt_tokens * flops_per_token / (weight_bytes + prompt_tokens * kv_bytes_per_token)


def decode_roofline(weight_bytes: float, kv_bytes_per_token: float, context_tokens: float,
                    batch_size: int, bandwidth_bytes_per_s: float, *,
                    peak_flops_per_s: float | None = None,
                    flops_per_token: float | None = None) -> float:
    """Upper bound on decode tokens/s.

    Bandwidth: one decode step reads all weights once (shared by the batch) and each sequence's
    KV cache (``kv_bytes_per_token * context_tokens``), and emits ``batch_size`` tokens:
    ``batch_size * bandwidth / (weights + batch_size * kv_bytes_per_token * context_tokens)``.
    At batch 1 that is ``bandwidth / (weights + KV read per step)``. With ``peak_flops_per_s``
    and ``flops_per_token`` the compute ceiling ``peak / flops_per_token`` caps it too (the
    bound is the lower of the two); without them compute is ignored, so at large batches the
    real ceiling can be lower.
    """
    if batch_size < 1 or bandwidth_bytes_per_s <= 0 or weight_bytes < 0 or context_tokens < 0:
        raise ValueError(f"need batch_size >= 1, bandwidth > 0, weights >= 0, context >= 0; got "
                         f"batch_size={batch_size!r}, bandwidth={bandwidth_bytes_per_s!r}, "
                         f"weight_bytes={weight_bytes!r}, context_tokens={context_tokens!r}")
    step_bytes = weight_bytes + batch_size * kv_bytes_per_token * context_tokens
    bound = batch_size * bandwidth_bytes_per_s / step_bytes
    if (peak_flops_per_s is None) != (flops_per_token is None):
        raise ValueError("the compute ceiling needs both peak_flops_per_s and flops_per_token")
    if peak_flops_per_s is not None:
        bound = min(bound, peak_flops_per_s / flops_per_token)
    return bound
