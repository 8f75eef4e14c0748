"""Settings in one place: model, engine, Redis, profile, cache dir, and the constants labs share.

Every value can come from an argument, else from an environment variable, else a default:

| setting | env var          | default                                  |
|---------|------------------|------------------------------------------|
| model   | LABKIT_MODEL     | ``smollm2-135m`` (the bundled model)     |
| engine  | LABKIT_ENGINE    | ``auto`` (vllm on a GPU where installed) |
| profile | LABKIT_PROFILE   | ``auto`` (``full`` on a GPU, else ``ci``) |
| redis   | REDIS_URL        | unset: an embedded private Redis server  |
| home    | LABKIT_HOME      | ``$XDG_CACHE_HOME/labkit`` or ``~/.cache/labkit`` |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENGINES = ("hf", "hf-cb", "vllm", "auto")
PROFILES = ("ci", "full", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PACKAGE_DIR = Path(__file__).resolve().parent  # labkit/
PROJECT_ROOT = PACKAGE_DIR.parent  # the repository (or the installed tree)


def in_repository(root: Path = PROJECT_ROOT) -> bool:
    """Whether labkit runs from the course repository (an editable install or a checkout on the
    path): ``root`` holds ``pyproject.toml`` and ``data/``. Else it is an installed wheel."""
    return (root / "pyproject.toml").is_file() and (root / "data").is_dir()


def data_dir(root: Path = PROJECT_ROOT, package: Path = PACKAGE_DIR) -> Path:
    """``root/data`` in the repository; in an installed wheel the copy it ships as
    ``labkit/data`` (the files the labs read, without ``rubrics/``: see pyproject.toml)."""
    return root / "data" if in_repository(root) else package / "data"


DATA_DIR = data_dir()  # prompts, paraphrase pairs, evaluation text, rubrics (repository only)
RUBRIC_DIR = DATA_DIR / "rubrics"  # labNN.toml: each lab's graded checks and quiz answers
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"  # the labs (solution notebooks; repository only)
LAB_NOTEBOOKS = "[0-9][0-9]_*.ipynb"  # glob of a lab notebook's file name: 01_profiling.ipynb
BUNDLED_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, shipped in a wheel (labkit.models)
DEFAULT_MODEL = BUNDLED_MODEL  # what every --model / model= default means
DEFAULT_MAX_TOKENS = 64
MAX_BODY_BYTES = 1 << 20  # a server's request body limit (413 above): many bundled contexts' worth
SEED = 1234  # one seed for every workload and sampled request that does not set its own


def choose(value: str, allowed: tuple[str, ...], what: str) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming both."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
    return value


def labkit_home() -> Path:
    """The cache dir for converted and synthetic models (created on first use)."""
    if os.environ.get("LABKIT_HOME"):
        return Path(os.environ["LABKIT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "labkit"


def env_redis_url() -> str | None:
    """``$REDIS_URL`` (a shared Redis server), or None where unset: then labkit starts its own."""
    return os.environ.get("REDIS_URL") or None


def resolve_profile(profile: str | None = None) -> str:
    """``ci`` (small, CPU-friendly sizes) or ``full`` (GPU sizes).

    An explicit ``ci``/``full`` wins; ``auto`` (or None) defers to LABKIT_PROFILE, and if that is
    unset or ``auto`` too, picks ``full`` on a GPU and ``ci`` on a CPU.
    """
    if profile in (None, "auto"):
        profile = os.environ.get("LABKIT_PROFILE") or "auto"
    profile = choose(profile, PROFILES, "profile")
    if profile != "auto":
        return profile
    from labkit.device import has_cuda

    return "full" if has_cuda() else "ci"


def by_profile(profile: str, *, ci, full):
    """Pick the ``ci`` or ``full`` value of a lab size: ``by_profile(p, ci=16, full=256)``."""
    return {"ci": ci, "full": full}[choose(profile, ("ci", "full"), "profile")]


@dataclass(frozen=True)
class Settings:
    """Resolved settings for one run."""

    model: str
    engine: str
    profile: str
    redis_url: str | None
    home: Path


def settings(
    model: str | None = None,
    engine: str | None = None,
    profile: str | None = None,
    redis_url: str | None = None,
) -> Settings:
    """Resolve settings from arguments, then environment, then defaults (see module doc)."""
    return Settings(
        model=model or os.environ.get("LABKIT_MODEL") or DEFAULT_MODEL,  # a name is explicit
        engine=choose(engine if engine not in (None, "auto") else
                      os.environ.get("LABKIT_ENGINE") or "auto", ENGINES, "engine"),
        profile=resolve_profile(profile),
        redis_url=redis_url or env_redis_url(),
        home=labkit_home(),
    )
