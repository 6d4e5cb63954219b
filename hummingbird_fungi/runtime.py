"""Run-time policy shared by every stage: device choice, bf16 autocast, seeds and step timings."""

from __future__ import annotations

import contextlib
import platform
import time
from typing import Iterator

import numpy as np
import torch

from hummingbird_fungi.errors import ConfigError

AUTOCAST_MODES = ("auto", "bf16", "off")


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu', 'cuda[:i]', 'mps' as given (refused if absent)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {name!r}: {error}") from error


def use_autocast(mode: str, device: torch.device) -> bool:
    """Whether a pass runs in bf16 autocast: 'bf16' always, 'auto' on CUDA only, 'off' never."""
    if mode not in AUTOCAST_MODES:
        raise ConfigError(f"autocast={mode!r}; choose one of {AUTOCAST_MODES}")
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `use_autocast`, else a no-op context."""
    if use_autocast(mode, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (faster than fp32): CUDA GPUs of compute capability 8.0
    or newer, and CPUs with AMX tiles."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@contextlib.contextmanager
def bf16_matmuls(device: torch.device) -> Iterator[None]:
    """Inside the block, fp32 matmuls on a CPU take bf16 inputs and accumulate in fp32 (oneDNN's fp32 math mode,
    `torch.backends.mkldnn.matmul.fp32_precision`, a process-wide setting restored on exit); a no-op on other
    devices and where torch lacks the setting."""
    mode = getattr(torch.backends.mkldnn, "matmul", None)
    if device.type != "cpu" or not hasattr(mode, "fp32_precision"):
        yield
        return
    previous, mode.fp32_precision = mode.fp32_precision, "bf16"
    try:
        yield
    finally:
        mode.fp32_precision = previous


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, epoch, image index) or (seed, chunk)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & ((1 << 63) - 1)


def generator(*keys: int) -> torch.Generator:
    """A CPU torch generator seeded by `derived_seed(*keys)`."""
    return torch.Generator().manual_seed(derived_seed(*keys))


def sample_ids(total: int, count: int, seed: int) -> torch.Tensor:
    """`count` of `total` ids drawn uniformly without replacement with `seed`, sorted -> (min(count, total),) int64."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def synchronize() -> None:
    """Wait for queued CUDA work (so wall-clock timings are real)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the wall-clock seconds of the block to timings[name] (nothing when timings is None)."""
    if timings is None:
        yield
        return
    synchronize()
    start = time.perf_counter()
    yield
    synchronize()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def versions() -> dict[str, str]:
    """Library versions for results files (faiss and ScaNN when installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from hummingbird_fungi import __version__

    found = {}
    for package in ("torch", "torchvision", "timm", "faiss-cpu", "faiss-gpu-cu12", "scann"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return {"hummingbird_fungi": __version__, **found, "python": platform.python_version()}
