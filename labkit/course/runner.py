"""``labkit run``: execute the labs headless with papermill and write an HTML report of the run.

Each lab runs in a fresh kernel of *this* Python (a kernelspec pointing at ``sys.executable`` is
written into project-local or temporary Jupyter dirs, so it works as root and with a read-only
``~``), with ``notebooks/`` as working directory and a per-cell timeout (seconds). The executed
notebooks, ``report.html`` (self-contained: plots are embedded as base64 data URIs) and
``summary.json`` go to ``runs/<timestamp>/``. A failure names the notebook, the failing cell's
index (as the author sees it in Jupyter: papermill's injected-parameters cell is not counted),
its source and the error.

Several GPUs (``gpus=["0", "1"]``, ``labkit run --gpus 0,1``): labs run side by side, one per GPU
(each kernel sees only its card through ``CUDA_VISIBLE_DEVICES``); a lab whose notebook metadata
says ``{"labkit": {"gpus": "all"}}`` (lab 06: replicas and tensor parallelism) runs afterwards,
alone, with every listed GPU. Timings of labs that ran side by side share the host's CPUs.
"""

from __future__ import annotations

import ast
import contextlib
import json
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

from labkit.config import LAB_NOTEBOOKS, NOTEBOOKS_DIR
from labkit.course.kernels import local_kernel, prepare_kernel
from labkit.course.report import plots_of, render_report
from labkit.course.workers import side_by_side

INJECTED_TAG = "injected-parameters"  # papermill's tag for the cell it adds
ERROR_TAG = "papermill-error-cell-tag"  # papermill's tag for the error banners it adds
PROFILE_PARAMETER = "PROFILE"  # the notebooks' parameter that picks the ci or full sizes
CELL_TIMEOUT_S = 900.0  # default limit of one cell of a lab run (seconds)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------- executing one notebook
@dataclass
class Failure:
    """Why a notebook stopped: the cell (index as in the source notebook), its source, the error."""

    cell_index: int | None
    source: str
    ename: str
    evalue: str
    traceback: str = ""
    timed_out: bool = False

    def describe(self) -> str:
        where = f"cell {self.cell_index}" if self.cell_index is not None else "kernel"
        return f"{where}: {self.ename}: {self.evalue}"


@dataclass
class Execution:
    """Outcome of one papermill run: ``ok``, wall time (seconds), output path, failure if any."""

    ok: bool
    duration_s: float
    output: Path
    failure: Failure | None = None


def _is_counted(cell) -> bool:
    """True for cells of the original notebook (not papermill's additions)."""
    tags = cell.get("metadata", {}).get("tags", [])
    return INJECTED_TAG not in tags and ERROR_TAG not in tags


def source_index(nb, pos: int) -> int:
    """The index of executed cell ``pos`` in the notebook as its author sees it (papermill's
    injected-parameters cell and error banners not counted)."""
    return sum(1 for c in nb.cells[:pos] if _is_counted(c))


def locate_failure(nb, exc: BaseException) -> Failure:
    """The failing cell of an executed notebook ``nb`` after papermill raised ``exc``."""
    timed_out = isinstance(exc, TimeoutError)
    pos = None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        pm = cell.get("metadata", {}).get("papermill", {})
        if not timed_out and (any(o.get("output_type") == "error" for o in cell.get("outputs", []))
                              or pm.get("exception") is True):
            pos = i
            break
        if timed_out and pm.get("start_time"):
            pos = i  # the last cell that started is the one that ran out of time
    ename = "Timeout" if timed_out else getattr(exc, "ename", type(exc).__name__)
    evalue = str(exc) if timed_out else getattr(exc, "evalue", str(exc))
    tb = "\n".join(getattr(exc, "traceback", None) or [])
    if pos is None:
        return Failure(None, "", ename, evalue, _ANSI.sub("", tb), timed_out)
    cell = nb.cells[pos]
    return Failure(source_index(nb, pos), cell.source, ename, evalue, _ANSI.sub("", tb),
                   timed_out)


def execute(src: str | Path, dst: str | Path, *, parameters: dict, cwd: str | Path,
            cell_timeout_s: float | None = None, total_timeout_s: float | None = None,
            kernel_name: str | None = None, kernel_manager=None) -> Execution:
    """Run ``src`` with papermill into ``dst``; never raises for errors inside the notebook.

    ``cell_timeout_s`` bounds each cell, ``total_timeout_s`` the whole run in seconds, counted
    from this call (kernel start-up included; papermill also bounds start-up by 60 s).
    ``kernel_manager``: a jupyter_client kernel manager to start the kernel with (the grader's
    sandboxed one, ``labkit.course.kernels.sandboxed_kernel``), else ``local_kernel``'s (IPC
    sockets in a private temp folder, stopped here when the run ends).
    """
    import nbformat
    import papermill as pm

    t0 = time.perf_counter()
    deadline = None if total_timeout_s is None else t0 + total_timeout_s

    def timeout_for(_cell) -> float | None:
        limits = [x for x in (cell_timeout_s,
                              None if deadline is None else deadline - time.perf_counter())
                  if x is not None]
        return max(1.0, min(limits)) if limits else None

    managed = contextlib.nullcontext(kernel_manager) if kernel_manager is not None else \
        local_kernel(kernel_name or prepare_kernel())
    with managed as manager:
        try:
            # The kernel starts in ``cwd`` (nbclient's resources path). papermill's own ``cwd=``
            # would chdir this whole process, which races when labs run side by side in threads.
            pm.execute_notebook(str(src), str(dst), parameters=parameters,
                                resources={"metadata": {"path": str(cwd)}},
                                kernel_name=manager.kernel_name, language="python",
                                progress_bar=False, log_output=False, km=manager,
                                timeout_func=timeout_for, shutdown_kernel="immediate")
            return Execution(True, time.perf_counter() - t0, Path(dst))
        except Exception as exc:  # a notebook error, a timeout or a dead kernel: report, go on
            duration = time.perf_counter() - t0
            try:
                nb = nbformat.read(str(dst), as_version=4)
            except Exception:
                nb = nbformat.v4.new_notebook()
            return Execution(False, duration, Path(dst), locate_failure(nb, exc))


# --------------------------------------------------------------------------- run_labs and report
@dataclass
class LabResult:
    """One lab of a run: status ``ok`` or ``failed``, wall time (s), records, claims (each
    ``{"text", "holds", "evidence", "key", "otherwise"}``, ``labkit.claims``), failure."""

    notebook: str
    output: str
    status: str
    duration_s: float
    records: dict = field(default_factory=dict)
    plots: int = 0
    failure: Failure | None = None
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES of its kernel, when run with gpus=
    claims: list = field(default_factory=list)


@dataclass
class RunResult:
    """A whole ``labkit run``: where it wrote, and each lab's result."""

    out_dir: Path
    report: Path
    summary: Path
    labs: list[LabResult]

    @property
    def ok(self) -> bool:
        return all(lab.status == "ok" for lab in self.labs)

    def failure_message(self) -> str:
        """One line per failed lab, naming notebook and cell (empty when all passed)."""
        return "\n".join(f"{lab.notebook} failed at {lab.failure.describe()}"
                         for lab in self.labs if lab.failure is not None)


def parse_params(items: list[str] | None) -> dict:
    """``["K=V", "01:K=V", ...]`` -> dict; values parsed as JSON, then a Python literal, else kept
    as str. ``NN:K=V`` sets ``K`` for lab ``NN`` only (kept under the key ``"NN:K"``)."""
    params = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        lab, colon, name = key.rpartition(":")
        if not sep or not name.isidentifier() or (colon and not (len(lab) == 2 and lab.isdigit())):
            raise ValueError(f"bad parameter {item!r}; write NAME=VALUE (every lab) or "
                             "NN:NAME=VALUE (lab NN only), e.g. MAX_TOKENS=16 or "
                             "01:MODEL=synthetic-8b")
        try:
            value = json.loads(raw)
        except ValueError:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        params[key] = value
    return params


def lab_params(params: Mapping, notebook: str | Path) -> dict:
    """The parameters one lab gets: every plain ``K`` and, for lab ``NN``, each ``NN:K`` (which
    wins over a plain ``K``)."""
    lab = Path(notebook).name[:2]
    plain = {k: v for k, v in params.items() if ":" not in k}
    return {**plain, **{k[3:]: v for k, v in params.items() if k.startswith(f"{lab}:")}}


def default_notebooks() -> list[Path]:
    """Every ``notebooks/NN_*.ipynb``, sorted (from the current dir, else the project root)."""
    for base in (Path.cwd() / "notebooks", NOTEBOOKS_DIR):
        found = sorted(base.glob(LAB_NOTEBOOKS))
        if found:
            return found
    raise FileNotFoundError("no notebooks/NN_*.ipynb found in the current dir or the project")


def environment_facts() -> dict:
    """Device (``cpu`` or the GPU name) and versions of python, torch, transformers, vllm."""
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "vllm", "labkit"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    try:
        from labkit.device import device_name

        device = device_name()
    except Exception as exc:  # no torch: the report still says why
        device = f"unknown ({exc})"
    return {"device": device, "platform": platform.platform(), "versions": versions}


def parse_gpus(spec: str | Sequence[str] | None) -> list[str]:
    """``"0,1"`` or ``["0", "1"]`` -> ``["0", "1"]``; None or empty -> ``[]``. Each must be a
    CUDA device index (a non-negative integer), each at most once."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    gpus = [str(g).strip() for g in items if str(g).strip()]
    bad = [g for g in gpus if not g.isdigit()]
    if bad or len(set(gpus)) != len(gpus):
        raise ValueError(f"bad GPU list {spec!r}: give distinct device indices, e.g. 0,1")
    return gpus


def wants_all_gpus(path: Path) -> bool:
    """True if the notebook's metadata asks for every GPU of the run (``labkit.gpus == "all"``)."""
    meta = json.loads(Path(path).read_text()).get("metadata", {})
    return meta.get("labkit", {}).get("gpus") == "all"


def progress_line(lab: LabResult) -> str:
    """One line for a lab that ended: ``02_batching.ipynb: ok in 3.9 min, key claims 12/12
    held`` (plus the GPU it ran on, or where it failed)."""
    key = [c for c in lab.claims if c.get("key", True)]
    held = sum(bool(c.get("holds")) for c in key)
    gpu = f" on GPU {lab.gpus}" if lab.gpus else ""
    line = (f"{Path(lab.notebook).name}: {lab.status} in {lab.duration_s / 60:.1f} min{gpu}, "
            f"key claims {held}/{len(key)} held")
    if lab.failure is not None:
        line += f"; stopped at {lab.failure.describe()}"[:300]
    return line


def run_labs(notebooks: list[str] | None = None, profile: str = "ci", params: dict | None = None,
             out_dir: str | Path | None = None, timeout_s: float = CELL_TIMEOUT_S,
             gpus: str | Sequence[str] | None = None,
             progress: Callable[[str], None] | None = None) -> RunResult:
    """Execute labs (default: every notebooks/NN_*.ipynb) and write the report.

    ``profile`` becomes the PROFILE parameter (``params`` may override); ``timeout_s`` bounds each
    cell (seconds). Failures do not stop the run: every lab is tried and reported, in the order
    given. ``gpus``: run labs side by side, one per listed GPU (module doc); default one after
    the other on whatever the process sees. ``progress``: called with one line as each lab
    ends (``labkit run`` prints it): name, status, minutes, key claims held.
    """
    from labkit.claims import read_claims
    from labkit.config import PROFILES, choose
    from labkit.records import read_records

    params = {PROFILE_PARAMETER: choose(profile, PROFILES, "profile"), **(params or {})}
    gpu_list = parse_gpus(gpus)
    paths = [Path(p) for p in notebooks] if notebooks else default_notebooks()
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"notebook {str(p)!r} not found")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else Path("runs") / stamp
    out.mkdir(parents=True, exist_ok=True)

    def run_one(src: Path, env: dict) -> LabResult:
        ex = execute(src, out / src.name, parameters=lab_params(params, src),
                     cwd=src.resolve().parent, cell_timeout_s=timeout_s,
                     kernel_name=prepare_kernel(env))
        records = read_records(ex.output) if ex.output.exists() else {}
        claims = read_claims(ex.output) if ex.output.exists() else []
        lab = LabResult(str(src), str(ex.output), "ok" if ex.ok else "failed",
                        round(ex.duration_s, 3), records, len(plots_of(ex.output)), ex.failure,
                        env.get("CUDA_VISIBLE_DEVICES"), claims)
        if progress is not None:
            progress(progress_line(lab))
        return lab

    if len(gpu_list) < 2:
        env = {"CUDA_VISIBLE_DEVICES": gpu_list[0]} if gpu_list else {}
        labs = [run_one(src, env) for src in paths]
    else:  # one lab per GPU at a time; labs that want every GPU run alone afterwards
        solo = [i for i, p in enumerate(paths) if wants_all_gpus(p)]
        rest = [i for i in range(len(paths)) if i not in solo]
        results = dict(zip(rest, side_by_side(lambda i, env: run_one(paths[i], env), rest,
                                              gpus=gpu_list)))
        results.update({i: run_one(paths[i], {"CUDA_VISIBLE_DEVICES": ",".join(gpu_list)})
                        for i in solo})
        labs = [results[i] for i in range(len(paths))]
    facts = environment_facts()
    result = RunResult(out, out / "report.html", out / "summary.json", labs)
    summary = {"created": datetime.now().astimezone().isoformat(timespec="seconds"),
               "ok": result.ok, "profile": params[PROFILE_PARAMETER], "params": params,
               "gpus": gpu_list or None, **facts,
               "labs": [asdict(lab) for lab in labs]}
    from labkit.metrics import json_text

    result.summary.write_text(json_text(summary, default=str))
    result.report.write_text(render_report(summary, labs))
    return result


