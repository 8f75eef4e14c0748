"""Measure before you optimise: timers that synchronize, the op profiler, memory, decode roofline.

- ``Timer`` / ``time_fn``: wall-clock seconds of work *finished* on the device. A GPU runs kernels
  asynchronously: a Python call returns once its kernels are queued, so a clock read without
  ``synchronize`` measures launch time, not compute. ``naive_time`` is that wrong way, kept
  only to show the trap. ``time_fn`` also warms up first, so lazy init and compilation stay out.
- ``profile_ops``: torch.profiler's per-op table (time in ms) and an optional Chrome trace.
- ``memory_usage``: CUDA allocated/peak bytes from torch, or the process RSS on CPU (/proc).
- ``kv_cache_bytes_per_token``, ``decode_roofline``: decoding one token reads every weight
  (``labkit.sizes.weight_bytes``) and the whole KV cache once, so memory bandwidth bounds tokens/s.
- ``memory_bandwidth``: the datasheet HBM figure on a known GPU; on CPU (no spec table) a measured
  STREAM-like copy bandwidth from ``measure_memory_bandwidth``.

torch is imported inside functions, so ``import labkit.profiling`` stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TimingResult:
    """Wall-clock times of ``repeats`` calls after warm-up, in seconds."""

    median_s: float
    mean_s: float
    stdev_s: float
    min_s: float
    samples_s: tuple[float, ...]


def _sync(device) -> None:
    from labkit.device import synchronize

    synchronize(device)


class Timer:
    """Context manager timing a block in seconds, synchronizing the device at both ends.

    >>> with Timer() as t:
    ...     y = model(x)
    >>> t.elapsed_s
    """

    def __init__(self, device=None) -> None:
        self.device = device
        self.start_s = 0.0
        self.elapsed_s = float("nan")

    def __enter__(self) -> Timer:
        _sync(self.device)  # earlier queued work must not be billed to this block
        self.start_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)  # wait until the block's kernels have actually run
        self.elapsed_s = time.perf_counter() - self.start_s


def time_fn(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5,
            device=None) -> TimingResult:
    """Call ``fn()`` ``warmup`` times untimed, then time ``repeats`` calls, each synchronized.

    ``warmup=0`` keeps the first (cold) call in ``samples_s[0]``: that is how to see the
    first-call trap. Times are seconds of wall clock per call.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup!r}, "
                         f"repeats={repeats!r}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        samples.append(t.elapsed_s)
    return TimingResult(median_s=statistics.median(samples), mean_s=statistics.fmean(samples),
                        stdev_s=statistics.stdev(samples) if len(samples) > 1 else 0.0,
                        min_s=min(samples), samples_s=tuple(samples))


def naive_time(fn: Callable[[], Any]) -> float:
    """THE WRONG WAY, for the lesson only: one call, no warm-up, no device synchronize (s).

    On a GPU this returns as soon as the kernels are *queued*: it measures launch overhead and can
    be orders of magnitude below the real time. On CPU work is synchronous, so it only misses the
    warm-up. Use ``time_fn`` or ``Timer`` for every number you report.
    """
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- the op profiler ---------------------------------------------------------------------------

PROFILE_COLUMNS = ("op", "calls", "self_cpu_ms", "cpu_total_ms", "cuda_total_ms", "self_cuda_ms")


KINETO_BANNERS = ("USDT:", "STAGE:")  # kineto's native start/stop lines, not errors


@contextlib.contextmanager
def _without_kineto_banners():
    """Hold native stderr (fd 2) while the profiler runs and pass on every line except kineto's
    ``USDT:``/``STAGE:`` banners, which ``KINETO_LOG_LEVEL`` does not silence."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(True)
                    if not line.startswith(KINETO_BANNERS)]
            if kept:
                sys.stderr.write("".join(kept))


def profile_ops(fn: Callable[[], Any], top: int = 15, trace_path: str | Path | None = None,
                device=None, warmup: int = 1):
    """Profile one call of ``fn`` with torch.profiler; the ``top`` ops as a DataFrame.

    Columns: op, calls, self_cpu_ms, cpu_total_ms and, when CUDA was used, cuda_total_ms and
    self_cuda_ms (all milliseconds). Sorted by device time on a GPU, self CPU time otherwise.
    ``trace_path`` writes a Chrome trace (open it in chrome://tracing or ui.perfetto.dev).
    """
    import pandas as pd
    import torch
    from torch.profiler import ProfilerActivity, profile

    from labkit.device import pick_device

    dev = pick_device(device)
    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for _ in range(warmup):
        fn()
    _sync(dev)
    with _without_kineto_banners(), torch.inference_mode(), \
            profile(activities=activities, record_shapes=False) as prof:
        fn()
        _sync(dev)
    rows = []
    for ev in prof.key_averages():
        row = {"op": ev.key, "calls": int(ev.count),
               "self_cpu_ms": ev.self_cpu_time_total / 1e3,
               "cpu_total_ms": ev.cpu_time_total / 1e3}
        if dev.type == "cuda":
            row["cuda_total_ms"] = getattr(ev, "device_time_total", 0.0) / 1e3
            row["self_cuda_ms"] = getattr(ev, "self_device_time_total", 0.0) / 1e3
        rows.append(row)
    frame = pd.DataFrame(rows)
    sort_by = "self_cuda_ms" if dev.type == "cuda" else "self_cpu_ms"
    frame = frame.sort_values(sort_by, ascending=False).head(top).reset_index(drop=True)
    if trace_path is not None:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    return frame


# --- memory ------------------------------------------------------------------------------------

def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_usage(device=None) -> dict[str, int | str]:
    """Current and peak memory of this process on ``device``, in bytes.

    CUDA: ``allocated_bytes`` / ``peak_allocated_bytes`` (tensors torch holds) and
    ``reserved_bytes`` (its caching allocator's pool). CPU: ``rss_bytes`` / ``peak_rss_bytes`` of
    the whole process from /proc/self/status (VmRSS / VmHWM), falling back to getrusage's peak.
    """
    from labkit.device import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        import torch

        return {"device": str(dev), "allocated_bytes": torch.cuda.memory_allocated(dev),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
                "reserved_bytes": torch.cuda.memory_reserved(dev)}
    rss, peak = _proc_status_bytes("VmRSS"), _proc_status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    return {"device": "cpu", "rss_bytes": rss if rss is not None else peak,
            "peak_rss_bytes": peak}


def reset_peak_memory(device=None) -> None:
    """Start a new CUDA peak-memory window (CPU's peak RSS cannot be reset)."""
    from labkit.device import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(dev)


def _cfg(config, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def kv_cache_bytes_per_token(config, dtype_bytes: int | float) -> int:
    """Bytes of KV cache one token adds: 2 (K and V) * layers * kv_heads * head_dim * dtype bytes.

    ``config`` is a transformers config or a dict with ``num_hidden_layers``,
    ``num_key_value_heads`` (default: ``num_attention_heads``, i.e. no GQA) and ``head_dim``
    (default: ``hidden_size // num_attention_heads``). bf16/fp16: ``dtype_bytes=2``.
    """
    text = _cfg(config, "text_config")  # multimodal configs nest the language model's
    if text is not None and _cfg(config, "num_hidden_layers") is None:
        config = text
    layers, heads = _cfg(config, "num_hidden_layers"), _cfg(config, "num_attention_heads")
    if layers is None or heads is None:
        raise ValueError("config needs num_hidden_layers and num_attention_heads; got "
                         f"{type(config).__name__} without them")
    kv_heads = _cfg(config, "num_key_value_heads") or heads
    head_dim = _cfg(config, "head_dim") or _cfg(config, "hidden_size") // heads
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be > 0 (e.g. 2 for bf16), got {dtype_bytes!r}")
    return int(2 * layers * kv_heads * head_dim * dtype_bytes)


def kv_cache_tensor_bytes(past_key_values) -> int:
    """Bytes actually held by a transformers KV cache (a forward's ``past_key_values``)."""
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:
        pairs = [(layer.keys, layer.values) for layer in layers]
    else:  # legacy tuple of (k, v) per layer
        pairs = list(past_key_values)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


# --- the decode roofline -----------------------------------------------------------------------

def decode_roofline(weight_bytes: float, kv_bytes_per_token: float, context_tokens: float,
                    batch_size: int, bandwidth_bytes_per_s: float) -> float:
    """Upper bound on decode tokens/s when memory bandwidth is the limit.

    One decode step reads all weights once (shared by the batch) and each sequence's KV cache
    (``kv_bytes_per_token * context_tokens``), and emits ``batch_size`` tokens:
    ``batch_size * bandwidth / (weights + batch_size * kv_bytes_per_token * context_tokens)``.
    At batch 1 that is ``bandwidth / (weights + KV read per step)``. Compute limits are ignored,
    so at large batches the real ceiling is lower.
    """
    if batch_size < 1 or bandwidth_bytes_per_s <= 0 or weight_bytes < 0 or context_tokens < 0:
        raise ValueError(f"need batch_size >= 1, bandwidth > 0, weights >= 0, context >= 0; got "
                         f"batch_size={batch_size!r}, bandwidth={bandwidth_bytes_per_s!r}, "
                         f"weight_bytes={weight_bytes!r}, context_tokens={context_tokens!r}")
    step_bytes = weight_bytes + batch_size * kv_bytes_per_token * context_tokens
    return batch_size * bandwidth_bytes_per_s / step_bytes


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
