"""Run a submission's code where it cannot reach anything else: bubblewrap plus resource limits.

``labkit grade`` runs each submission's Jupyter kernel, and the fresh interpreter of its trusted
checks, through ``command(box, argv, limits)``: util-linux ``prlimit`` sets the limits, then
bubblewrap (``bwrap``, Debian's ``bubblewrap`` package) starts ``argv`` in new PID, network, IPC
and UTS namespaces (its own PID 1, so every process it starts dies with it; a loopback with no
route out), with a new session, killed when the grader goes away, and an empty environment but
for the variables given. The file system is an allowlist, read-only: the system (``/usr``,
``/etc``), this Python and its packages, labkit's source and data (the rubrics hidden under an
empty tmpfs) and the model cache; ``/tmp`` and ``/dev/shm`` are private tmpfs of bounded size;
the only writable folder the grader can see afterwards is the submission's own ``Box``, bound at
its own path. As root the grader also switches to a user id of the box's own (``setpriv``), so
the process-count limit counts that submission only and files it did not create stay read-only.

Limits (``Limits``, from a rubric's ``[limits]`` table): ``memory_mib`` per process (RLIMIT_DATA:
heap and private mappings; over it an allocation fails with MemoryError; default the machine's
memory), ``cpu_s`` CPU seconds
per process (RLIMIT_CPU), ``processes`` threads and processes of the box's user (RLIMIT_NPROC,
only enforced when the grader runs as root). ``unavailable()`` says why no sandbox can be had
here (not Linux, no bwrap, no namespaces), or None. The threat model: data/rubrics/README.md.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from labkit.config import DATA_DIR, NOTEBOOKS_DIR, RUBRIC_DIR, labkit_home
from labkit.processes import best_effort, wait_gone

TMPFS_MIB = 1024  # size of the private /tmp and /dev/shm (MiB each); tmpfs lives in memory
UID_RANGE = (2_000_000_000, 2_100_000_000)  # user ids given to boxes when the grader is root
GONE_S = 5.0  # how long a box's processes may take to die with their namespace (seconds)
PASS_ENV = ("LABKIT_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
            "OMP_", "MKL_", "OPENBLAS_", "CUDA_VISIBLE_DEVICES", "LANG", "LC_", "TZ")
HIDDEN_ENV = ("LABKIT_HOME", "REDIS_URL")  # set here, or meaningless behind a private network


def physical_mib() -> int:
    """This machine's memory (MiB, from /proc/meminfo; 8192 where that cannot be read)."""
    try:
        line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                    if ln.startswith("MemTotal:"))
        return int(line.split()[1]) // 1024
    except (OSError, StopIteration, ValueError):
        return 8192


@dataclass(frozen=True)
class Limits:
    """Resource limits of one submission: memory (MiB) and CPU time (s) per process, and how many
    processes and threads its user may have. The memory default is the machine's: libraries
    size their caches from the free memory they see (transformers' continuous batching takes
    half of it on a CPU), so a fixed default would fail them on a larger machine."""

    memory_mib: int = field(default_factory=physical_mib)
    cpu_s: int = 1800
    processes: int = 1024

    def describe(self) -> str:
        return (f"{self.memory_mib} MiB of memory and {self.cpu_s} s of CPU per process, "
                f"{self.processes} processes")


def limits_from(raw: Mapping, where: str) -> Limits:
    """``Limits`` from a rubric's ``[limits]`` table; ValueError naming a bad field or value."""
    fields = Limits.__dataclass_fields__
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    for key, value in raw.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    return Limits(**raw)


@dataclass(frozen=True)
class Box:
    """A submission's own folder (``root``, writable inside the sandbox at the same path) with its
    ``work`` (the notebook's working directory), ``home`` and ``runtime`` (kernel connection)
    folders, and the user id it runs as (None: the grader's own)."""

    root: Path
    uid: int | None

    @property
    def work(self) -> Path:
        return self.root / "notebooks"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    def env(self) -> dict[str, str]:
        """The box's private HOME, IPython, Jupyter, matplotlib and cache dirs, as variables."""
        home = str(self.home)
        return {"HOME": home, "USER": "student", "LOGNAME": "student", "TMPDIR": "/tmp",
                "IPYTHONDIR": f"{home}/.ipython", "JUPYTER_CONFIG_DIR": f"{home}/.jupyter",
                "JUPYTER_DATA_DIR": f"{home}/.local/share/jupyter",
                "JUPYTER_RUNTIME_DIR": str(self.runtime), "MPLCONFIGDIR": f"{home}/.matplotlib",
                "XDG_CACHE_HOME": f"{home}/.cache", "HF_HOME": f"{home}/.cache/huggingface",
                "PYTHONDONTWRITEBYTECODE": "1"}


def make_box(parent: Path, name: str) -> Box:
    """A fresh box ``parent/name`` with its folders, owned by a user id of its own when the grader
    is root (one not used by any running process)."""
    uid = None
    if os.geteuid() == 0:
        busy = {owner for _, owner in _status_uids()}
        while uid is None or uid in busy:
            uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
    box = Box(Path(parent) / name, uid)
    for path in (box.root, box.work, box.home, box.runtime):
        path.mkdir(parents=True)
        if uid is not None:
            os.chown(path, uid, uid)
    return box


def lock_runtime(box: Box) -> None:
    """Take the box's runtime folder back from its user (once the kernel's sockets exist), so
    the kernel cannot replace them with links the grader's client would follow."""
    if box.uid is not None:
        os.chown(box.runtime, 0, 0)
        os.chmod(box.runtime, 0o755)


def remove_box(box: Box) -> int:
    """Kill what still runs as the box's user once its PID namespace had ``GONE_S`` seconds to
    die (normally nothing is left), delete the box; returns how many processes were killed."""
    left: list[int] = []
    if box.uid is not None:
        left = wait_gone([pid for pid, owner in _status_uids() if owner == box.uid], GONE_S)
        for pid in left:
            best_effort(lambda pid=pid: os.kill(pid, signal.SIGKILL))
    shutil.rmtree(box.root, ignore_errors=True)
    return len(left)


def _status_uids() -> Iterable[tuple[int, int]]:
    """(pid, real user id) of every process (from /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "status").read_text()
            except OSError:
                continue
            line = next((ln for ln in text.splitlines() if ln.startswith("Uid:")), "Uid: -1")
            yield int(entry.name), int(line.split()[1])


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why no sandbox can be had here (one line), or None when ``command`` works."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux namespaces; this is {sys.platform}"
    tools = ["bwrap", "prlimit"] + (["setpriv"] if os.geteuid() == 0 else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not found (install Debian's bubblewrap and util-linux; "
                "`make setup` does it as root)")
    probe = _bwrap_args(None, Limits(), {}) + ["true"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap did not start: {exc}"
    if done.returncode != 0:
        return f"bwrap cannot create namespaces here: {done.stderr.strip()[:200]}"
    return None


def _system_binds() -> list[str]:
    """Read-only binds of the system: /usr and /etc, and /bin, /lib... as links or binds."""
    args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def read_only_paths() -> list[Path]:
    """What a sandbox may read besides the system: this Python (prefixes and every existing
    ``sys.path`` folder, except the project root, the temporary folder where the boxes live and
    the folders above them), labkit's package and
    data folders, the repository's ``pyproject.toml`` (``labkit.config.in_repository`` looks for
    it: without it the labs would read the data a wheel ships) and the model cache
    (``LABKIT_HOME``)."""
    import labkit

    root = Path(labkit.__file__).resolve().parents[1]
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix),
             Path(os.path.realpath(sys.executable)).parents[1],
             Path(labkit.__file__).resolve().parent, DATA_DIR.resolve(), labkit_home(),
             root / "pyproject.toml"}
    paths |= {Path(p).resolve() for p in sys.path if p and Path(p).is_dir()}
    tmp = Path(tempfile.gettempdir()).resolve()  # a script's folder there would cover the boxes
    keep = [p for p in paths if p.exists() and not (p == root or p in root.parents)
            and not (p == tmp or p in tmp.parents)
            and not any(str(p).startswith(s) for s in ("/usr", "/etc"))]
    return sorted({p for p in keep if not any(q in p.parents for q in keep)})


def _bwrap_args(box: Box | None, limits: Limits, env: Mapping[str, str],
                hidden: Sequence[Path] = ()) -> list[str]:
    args = ["prlimit", f"--data={limits.memory_mib * 2**20}", f"--cpu={limits.cpu_s}"]
    if box is not None and box.uid is not None:
        args.append(f"--nproc={limits.processes}")
    args += ["--", "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session",
             *_system_binds(), "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(TMPFS_MIB * 2**20), "--tmpfs", "/tmp",
             "--perms", "1777", "--size", str(TMPFS_MIB * 2**20), "--tmpfs", "/dev/shm"]
    made = {Path("/"), Path("/tmp"), Path("/usr"), Path("/etc")}

    def parents(path: Path) -> list[str]:
        out = []
        for p in reversed(path.parents):
            if p not in made:
                out += ["--perms", "0755", "--dir", str(p)]
                made.add(p)
        made.add(path)
        return out

    readable = read_only_paths()
    for path in readable:
        args += [*parents(path), "--ro-bind", str(path), str(path)]
    masks = [RUBRIC_DIR.resolve(), NOTEBOOKS_DIR.resolve(), *(Path(p).resolve() for p in hidden)]
    for path in masks:  # hide what a readable folder holds that the submission must not see
        if any(r == path or r in path.parents for r in readable) and path.exists():
            args += (["--tmpfs", str(path)] if path.is_dir()
                     else ["--ro-bind", "/dev/null", str(path)])
    for dev in sorted(Path("/dev").glob("nvidia*")):  # a GPU, where grading runs on one
        args += ["--dev-bind", str(dev), str(dev)]
    if box is not None:
        args += [*parents(box.root), "--bind", str(box.root), str(box.root),
                 "--chdir", str(box.work)]
    args.append("--clearenv")
    for key, value in sorted(env.items()):
        args += ["--setenv", key, value]
    args.append("--")
    if box is not None and box.uid is not None:
        args += ["setpriv", f"--reuid={box.uid}", f"--regid={box.uid}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--"]
    return args


def sandbox_env(box: Box, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment inside a box: the box's own dirs, PATH to this Python, the grader's
    offline/thread/profile variables (``PASS_ENV``), LABKIT_HOME, and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(PASS_ENV) and k not in HIDDEN_ENV}
    env.update(box.env(), LABKIT_HOME=str(labkit_home()),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]))
    env.update(extra or {})
    return env


def command(box: Box, argv: Sequence[str], limits: Limits, env: Mapping[str, str] | None = None,
            hidden: Sequence[Path] = ()) -> list[str]:
    """``argv`` run inside ``box`` under ``limits`` (module doc), with ``sandbox_env(box, env)``;
    ``hidden``: more paths to hide should a readable folder hold them (the submissions, the
    grade file's folder)."""
    return _bwrap_args(box, limits, sandbox_env(box, env), hidden) + list(argv)
