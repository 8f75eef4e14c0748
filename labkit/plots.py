"""The one plotting idiom of the labs: small matplotlib helpers that insist on units.

Every helper takes axis labels with their unit (``"prompt length (tokens)"``), draws on a given
``ax`` or a new figure, and returns the Axes so a notebook can add a line or a note. A figure
without a unit is a bug, so a label without one raises.

- ``line_plot``: one or more series against x (each series may have its own x); log axes.
- ``bar_chart``: one value per label.
- ``latency_throughput``: the serving trade-off, one point per setting, annotated.
- ``latency_vs_rate``: latency percentiles against offered load, with the SLO and the knee.
- ``roofline_plot``: attainable FLOP/s against arithmetic intensity, both ceilings, the ridge
  point and measured points (lab 01).

matplotlib is imported inside the functions, so ``import labkit.plots`` is cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SeriesData = Sequence[float] | tuple[Sequence[float], Sequence[float]]


def _check_label(label: str, what: str) -> str:
    if not label or "(" not in label or ")" not in label:
        raise ValueError(f"{what} {label!r} needs a unit in parentheses, e.g. 'latency (ms)' "
                         "or 'batch size (requests)'")
    return label


def _axes(ax, figsize=(6, 3.6)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def line_plot(x: Sequence[float] | None, series: Mapping[str, SeriesData], *, xlabel: str,
              ylabel: str, title: str | None = None, logx: bool = False, logy: bool = False,
              styles: Mapping[str, str] | None = None, ax=None):
    """Plot each ``series`` (label -> y values, or label -> (x, y)) against ``x``.

    ``styles`` maps a label to a matplotlib format string (``"o-"``, ``"--"``); default ``"o-"``.
    """
    ax = _axes(ax)
    for label, data in series.items():
        if isinstance(data, tuple) and len(data) == 2:
            xs, ys = data
        else:
            if x is None:
                raise ValueError(f"series {label!r} has no x values: pass x= or (x, y)")
            xs, ys = x, data
        if len(xs) != len(ys):
            raise ValueError(f"series {label!r}: {len(xs)} x values but {len(ys)} y values")
        ax.plot(list(xs), list(ys), (styles or {}).get(label, "o-"), label=label)
    ax.set_xlabel(_check_label(xlabel, "xlabel"))
    ax.set_ylabel(_check_label(ylabel, "ylabel"))
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(True, alpha=0.3)
    return ax


def bar_chart(labels: Sequence[str], values: Sequence[float], *, ylabel: str,
              title: str | None = None, annotate: str | None = "{:.3g}", ax=None):
    """One bar per label; ``annotate`` formats the value above each bar (None: no text)."""
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels but {len(values)} values")
    ax = _axes(ax)
    bars = ax.bar([str(v) for v in labels], list(values))
    if annotate:
        ax.bar_label(bars, labels=[annotate.format(v) for v in values])
    ax.set_ylabel(_check_label(ylabel, "ylabel"))
    if title:
        ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return ax


def latency_throughput(throughput: Sequence[float], latency: Sequence[float],
                       labels: Sequence[str] | None = None, *,
                       xlabel: str = "output throughput (tokens/s)",
                       ylabel: str = "p50 latency (s)", title: str | None = None,
                       series: str | None = None, ax=None):
    """The serving trade-off: one point per setting (batch size, concurrency, rate), joined in
    order and annotated with ``labels``. Call again with the same ``ax`` and another ``series``
    name to compare systems."""
    if len(throughput) != len(latency):
        raise ValueError(f"{len(throughput)} throughput values but {len(latency)} latencies")
    ax = _axes(ax)
    ax.plot(list(throughput), list(latency), "o-", label=series)
    for x, y, text in zip(throughput, latency, labels or []):
        ax.annotate(str(text), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(_check_label(xlabel, "xlabel"))
    ax.set_ylabel(_check_label(ylabel, "ylabel"))
    if title:
        ax.set_title(title)
    if series:
        ax.legend()
    ax.grid(True, alpha=0.3)
    return ax


def latency_vs_rate(series: Mapping[str, Sequence[Mapping]], slo: Mapping[str, float] | None = None,
                    knees: Mapping[str, float | None] | None = None, *,
                    metrics: Sequence[str] = ("ttft_s", "tpot_s"), title: str | None = None,
                    axes=None):
    """Latency under load (lab 05, section 7): one panel per metric (``ttft_s``, ``tpot_s``,
    ``e2e_s``), its p50 (dashed) and p99 (solid) in ms against the offered rate (requests/s, log
    scale), for each series (label -> bench ``runs[]`` entries with ``request_rate``); each SLO
    limit of ``slo`` (seconds) as a red line, each series' knee (req/s) as a dotted line.
    Returns the list of Axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.6),
                               layout="constrained", squeeze=False)
        axes = list(axes[0])
    for ax, metric in zip(axes, metrics):
        for i, (label, runs) in enumerate(series.items()):
            runs = sorted(runs, key=lambda r: r["request_rate"])
            rates = [r["request_rate"] for r in runs]
            color = f"C{i}"
            for stat, style in (("p99", "o-"), ("p50", "o--")):
                values = [r[metric][stat] for r in runs]
                ax.plot(rates, [v * 1e3 if v is not None else float("nan") for v in values],
                        style, color=color, label=f"{label} {stat}", alpha=1 if stat == "p99"
                        else 0.6)
            knee = (knees or {}).get(label)
            if knee is not None:
                ax.axvline(knee, color=color, linestyle=":", label=f"{label} knee {knee:g} req/s")
        if slo and metric in slo:
            ax.axhline(slo[metric] * 1e3, color="red", linewidth=1, label="SLO")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(_check_label("offered rate (requests/s)", "xlabel"))
        ax.set_ylabel(_check_label(f"{metric.removesuffix('_s').upper()} (ms)", "ylabel"))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        axes[0].figure.suptitle(title)
    return axes


def roofline_plot(peak_flops_per_s: float, bandwidth_bytes_per_s: float,
                  points: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                  labels: Mapping[str, Sequence[str]] | None = None, title: str | None = None,
                  ax=None):
    """The roofline (log-log): the bandwidth ceiling ``intensity * bandwidth`` rising to the
    compute ceiling ``peak``, the ridge point where they meet (dotted, annotated), and each
    series of ``points`` (label -> (FLOP/byte, achieved FLOP/s)), its points annotated with
    ``labels[label]`` (e.g. batch sizes). Axes in FLOP/byte and TFLOP/s."""
    import numpy as np

    ax = _axes(ax, figsize=(6.4, 4.0))
    ridge = peak_flops_per_s / bandwidth_bytes_per_s
    xs = [x for data in points.values() for x in data[0]] + [ridge]
    grid = np.logspace(np.log10(min(xs) / 4), np.log10(max(xs) * 4), 200)
    ax.plot(grid, np.minimum(grid * bandwidth_bytes_per_s, peak_flops_per_s) / 1e12, "k-", lw=1.5,
            label="roofline: min(compute peak, intensity x bandwidth)")
    slope = grid[grid <= 4 * ridge]  # each ceiling on its own, dotted, a little past the ridge
    ax.plot(slope, slope * bandwidth_bytes_per_s / 1e12, "k:", lw=0.8, alpha=0.5)
    ax.axhline(peak_flops_per_s / 1e12, color="k", ls=":", lw=0.8, alpha=0.5)
    ax.axvline(ridge, color="gray", ls="--", lw=1)
    ax.annotate(f"ridge {ridge:.3g} FLOP/byte", (ridge, peak_flops_per_s / 1e12),
                xytext=(-6, 6), textcoords="offset points", fontsize=8, ha="right")
    for i, (label, (intensity, flops)) in enumerate(points.items()):
        if len(intensity) != len(flops):
            raise ValueError(f"points {label!r}: {len(intensity)} x values but {len(flops)} y")
        ys = [f / 1e12 for f in flops]
        ax.plot(list(intensity), ys, "o", color=f"C{i}", label=label)
        for x, y, text in zip(intensity, ys, (labels or {}).get(label, [])):
            ax.annotate(str(text), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_check_label("arithmetic intensity (FLOP/byte)", "xlabel"))
    ax.set_ylabel(_check_label("attainable / achieved (TFLOP/s)", "ylabel"))
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.2)
    return ax
