"""What the results were measured on: date, machine, device, package versions."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform

import jax

PACKAGES = ("jax", "jaxlib", "flax", "dm-haiku", "equinox", "torch", "numpy")
# Listed only where installed: the accelerator plugins of JAX's CUDA/TPU builds, and optax.
OPTIONAL = ("optax", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device() -> str:
    """The JAX device the benchmarks ran on, e.g. 'cpu (cpu)' or 'gpu (NVIDIA H100 80GB HBM3)'."""
    d = jax.devices()[0]
    return f"{d.platform} ({d.device_kind}), {jax.device_count()} device(s)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    for name in OPTIONAL:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def describe() -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": str(usable_cores()),
        "os": f"{platform.system()} {platform.release()}",
        "device": device(),
        "backend": jax.default_backend(),
    }
