"""Live views in a notebook: a load test's progress, rolling p50/p99 latency and throughput
(``LoadTestView``), and progress bars whose saved output is their final state (``Progress``).

``LoadTestView`` shows an ipywidgets dashboard in a notebook with a frontend, and falls back to
plain printed lines elsewhere (a terminal, papermill, nbval, ipywidgets missing), so the same
code runs headless without errors. Feed it completions as they finish::

    view = LoadTestView(window=50)
    view.start(total=64, label="concurrency 16")
    ... view.update(completion) for each finished request (anything with ``e2e_s`` and
        ``output_tokens``) ...
    view.finish()

Latency is E2E over the last ``window`` requests (``labkit.metrics.stats``, shown in ms);
throughput is output tokens/s and requests/s since ``start``. Widget updates are throttled to
one per ``refresh_s`` seconds. Used by the serving lab's load tests (lab 05).
"""

from __future__ import annotations

import time
from collections import deque


def has_widget_frontend() -> bool:
    """True inside an IPython kernel with ipywidgets installed (a frontend may render them).

    Under papermill/nbval the widget still renders as its text form, without error.
    """
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class LoadTestView:
    """Progress bar, rolling p50/p99 E2E latency (ms) and throughput of a load test."""

    def __init__(self, window: int = 50, refresh_s: float = 0.25,
                 widgets: bool | None = None, print_every: int | None = None) -> None:
        self.window, self.refresh_s = window, refresh_s
        self.use_widgets = has_widget_frontend() if widgets is None else widgets
        self.print_every = print_every
        self.history: list[dict] = []  # one row per refresh: t_s, done, p50_ms, p99_ms, tok/s
        self._bar = self._text = None
        self.total, self.label = 0, ""

    def start(self, total: int, label: str = "load test") -> None:
        """Begin a run of ``total`` requests."""
        self.total, self.label, self.done, self.tokens, self.failed = total, label, 0, 0, 0
        self._lat: deque[float] = deque(maxlen=self.window)
        self._t0 = self._last = time.perf_counter()
        self._every = self.print_every or max(1, total // 4)
        if self.use_widgets:
            import ipywidgets as w
            from IPython.display import display

            self._bar = w.IntProgress(min=0, max=max(total, 1), description=label[:20],
                                      layout=w.Layout(width="60%"))
            self._text = w.HTML()
            display(w.VBox([self._bar, self._text]))

    def update(self, completion) -> None:
        """Count one finished request (``e2e_s`` s, ``output_tokens``; ``error`` if failed)."""
        self.done += 1
        if getattr(completion, "error", None):
            self.failed += 1
        else:
            self._lat.append(completion.e2e_s)
            self.tokens += completion.output_tokens
        t = time.perf_counter()
        if self.done == self.total or t - self._last >= self.refresh_s or \
                (not self.use_widgets and self.done % self._every == 0):
            self._last = t
            self._refresh(t)

    def snapshot(self, t: float | None = None) -> dict:
        """The current numbers: done, failed, p50/p99 E2E (ms), output tokens/s, requests/s."""
        from labkit.metrics import stats

        t = time.perf_counter() if t is None else t
        e2e = stats(self._lat)  # seconds; NaN before the first request is done
        elapsed = max(t - self._t0, 1e-9)
        return {"t_s": elapsed, "done": self.done, "failed": self.failed,
                "p50_ms": e2e["p50"] * 1e3, "p99_ms": e2e["p99"] * 1e3,
                "output_tokens_per_s": self.tokens / elapsed,
                "requests_per_s": self.done / elapsed}

    def _line(self, s: dict) -> str:
        return (f"[{self.label}] {s['done']}/{self.total} done ({s['failed']} failed) | "
                f"E2E p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms (last {self.window}) | "
                f"{s['output_tokens_per_s']:.1f} tok/s, {s['requests_per_s']:.2f} req/s")

    def _refresh(self, t: float) -> None:
        s = self.snapshot(t)
        self.history.append(s)
        if self.use_widgets:
            self._bar.value = self.done
            self._text.value = f"<code>{self._line(s)}</code>"
        elif self.done < self.total:
            print(self._line(s), flush=True)

    def finish(self) -> dict:
        """Final numbers; printed as one line (also under a frontend, so saved outputs keep it)."""
        s = self.snapshot()
        if self.use_widgets and self._bar is not None:
            self._bar.value = self.done
            self._bar.bar_style = "success" if not self.failed else "warning"
        print(self._line(s), flush=True)
        return s


class Progress:
    """A ``tqdm.auto`` bar whose saved notebook output is its final state.

    In a kernel, tqdm draws an ipywidget whose text copy (what papermill saves, what the HTML
    report and a viewer without widgets show) is the bar's *first* state, "0%". This bar is
    shown under a display id and shown again when it closes, so the saved copy is the finished
    bar. Elsewhere it is plain tqdm. ``Progress.wrap(items, desc)`` iterates with a bar.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        import sys

        from tqdm.auto import tqdm

        notebook = sys.modules.get("tqdm.notebook")  # imported by tqdm.auto in a kernel
        self.widget = enabled and notebook is not None and issubclass(tqdm, notebook.tqdm)
        self.bar = tqdm(total=total, desc=desc, disable=not enabled,
                        **({"display": False} if self.widget else {}))
        if self.widget:
            from IPython.display import display

            self.handle = display(self.bar.container, display_id=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.widget:
            self.handle.update(self.bar.container)

    @classmethod
    def wrap(cls, items, desc: str, enabled: bool = True):
        """Yield each of ``items`` (a sized iterable) while the bar counts them."""
        items = list(items)
        bar = cls(len(items), desc, enabled)
        try:
            for item in items:
                yield item
                bar.update()
        finally:
            bar.close()
