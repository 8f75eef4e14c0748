"""``labkit doctor``: what this machine has, in one dict (and one screen)."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _redis_facts() -> dict:
    """Which Redis labkit would use, and whether it answers a PING."""
    from labkit.config import env_redis_url

    url = env_redis_url()
    facts = {"mode": "url" if url else "embedded", "url": None, "reachable": False, "error": None}
    try:
        if url:
            import redis

            facts["url"] = _redact(url)
            facts["reachable"] = bool(redis.Redis.from_url(url, socket_timeout=2).ping())
        else:
            from labkit.serving.redis_server import EmbeddedRedis, get_client

            with EmbeddedRedis() as server:
                client = get_client(server.url)
                facts["url"] = server.url
                facts["reachable"] = bool(client.ping())
                facts["server_version"] = client.info()["redis_version"]
                client.close()
    except Exception as err:  # doctor reports, it does not fail
        facts["error"] = f"{type(err).__name__}: {err}"
    return facts


def _redact(url: str) -> str:
    """Hide a password in a redis:// URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def _model_facts() -> dict:
    """Where models are kept, whether the bundled one is installed and converted, which
    synthetic models are cached."""
    from labkit.config import labkit_home
    from labkit.models import bundled_converted, bundled_dir, find_bundled_gguf, models_dir

    gguf = find_bundled_gguf()
    return {
        "home": str(labkit_home()),
        "bundled_gguf": str(gguf) if gguf else None,
        "bundled_converted": bundled_converted(),
        "bundled_path": str(bundled_dir()),
        "synthetic_cached": sorted(p.name for p in models_dir().glob("synthetic-*")),
    }


def doctor(check_redis: bool = True) -> dict:
    """Facts about Python, libraries, the device and its roofline figures, Redis and models."""
    import torch

    from labkit import __version__
    from labkit.device import device_name, gpu_spec, has_cuda

    spec = gpu_spec() if has_cuda() else None
    return {
        "labkit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "vllm": _version("vllm"),
        "torchao": _version("torchao"),
        "device": "cuda" if has_cuda() else "cpu",
        "gpu_name": device_name() if has_cuda() else None,
        "gpu_count": torch.cuda.device_count() if has_cuda() else 0,
        "hbm_bytes_per_s": spec.hbm_bytes_per_s if spec else None,
        "peak_bf16_flops_per_s": spec.bf16_flops_per_s if spec else None,
        "cpu_threads": torch.get_num_threads(),
        "redis": _redis_facts() if check_redis else None,
        "models": _model_facts(),
    }


def format_report(facts: dict) -> str:
    """The doctor dict as aligned ``key: value`` lines."""
    lines = []
    for key, value in facts.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k:<18} {v}" for k, v in value.items()]
        else:
            if key == "hbm_bytes_per_s" and value:
                value = f"{value / 1e12:.2f} TB/s"
            if key == "peak_bf16_flops_per_s" and value:
                value = f"{value / 1e12:.0f} TFLOP/s"
            lines.append(f"{key:<20} {value if value is not None else 'absent'}")
    return "\n".join(lines)
