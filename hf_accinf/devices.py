"""Where a score run computes, and how much memory it may take there (issue 19, item 1; docs/ENGINE.md "Devices").

``resolve_device`` turns ``--device auto|cpu|cuda[:i]`` into one ``torch.device`` and the reason for it, checked
before any long work: ``auto`` is the accelerate process's device when launched (each process its own GPU),
else ``cuda`` when a GPU is visible, else ``cpu``. ``resolve_memory_budget`` gives the memory budget: an
explicit ``--memory_budget_gb`` wins; otherwise a share of the device's free memory. ``scorer_precision`` is
the context the scorer's own products run under (TF32 matmuls on CUDA for float32 work, when allowed), and
``recorded_precision`` the training run's own flags, under which replay runs (DESIGN.md 6b: replay uses the
run's numerics, never the scorer's).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

import torch

from .errors import AccInfError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
CPU_BUDGET_GB = 4.0  # the CPU ceiling of the automatic budget (the default before budgets were derived)
CPU_FREE_SHARE = 0.5  # at most this share of the RAM available now (the machine may be shared)
CUDA_FREE_SHARE = 0.7  # of the GPU's free memory: the rest for the model, its activations and the allocator


def check_device_choice(choice: str) -> None:
    if not DEVICE_PATTERN.match(str(choice)):
        raise ValueError(f"Unknown device '{choice}': use auto, cpu, cuda or cuda:<index>.")


def launched() -> bool:
    """Whether this process was started by ``accelerate launch`` / ``torchrun`` (a process group is formed)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(choice: str, process_device: torch.device | str | None = None) -> tuple[torch.device, str]:
    """The device of ``--device choice`` and why. ``process_device``: the accelerate process's device
    (``PartialState().device``) when launched. ``cuda`` without a GPU, or a GPU index that does not exist,
    is refused here, before any work."""
    check_device_choice(choice)
    if process_device is not None and torch.device(process_device).type == "cpu":
        process_device = torch.device("cpu")  # gloo processes may report cpu:<rank>: one CPU device
    available = torch.cuda.is_available()
    if choice == "auto":
        if process_device is not None:
            return torch.device(process_device), "auto: the accelerate process's device"
        if available:
            return torch.device("cuda", torch.cuda.current_device()), "auto: a GPU is visible"
        return torch.device("cpu"), "auto: no GPU is visible"
    device = torch.device(choice)
    if device.type == "cpu":
        return device, "cpu, as asked"
    if not available:
        raise AccInfError(f"--device {choice} asks for a GPU, but torch sees none (torch {torch.__version__}, CUDA "
                          f"build {torch.version.cuda or 'none'}): use --device cpu (or auto), or install a CUDA "
                          "build of torch on a machine with a GPU.")
    if device.index is None:
        if process_device is not None and torch.device(process_device).type == "cuda":
            return torch.device(process_device), "cuda, as asked: the accelerate process's GPU"
        device = torch.device("cuda", torch.cuda.current_device())
    elif device.index >= torch.cuda.device_count():
        raise AccInfError(f"--device {choice}: there are {torch.cuda.device_count()} GPUs (indices 0 to "
                          f"{torch.cuda.device_count() - 1}).")
    return device, f"{choice}, as asked"


def available_memory_gb(device: torch.device) -> float | None:
    """Free memory of ``device`` in GiB now (``None`` when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**30
    try:
        import psutil
    except ImportError:  # accelerate depends on psutil; a bare install may lack it
        return None
    return psutil.virtual_memory().available / 2**30


def resolve_memory_budget(asked_gb: float | None, device: torch.device) -> tuple[float, str]:
    """``(GiB, why)``: an explicit budget wins; on CUDA :data:`CUDA_FREE_SHARE` of the free GPU memory; on CPU
    :data:`CPU_BUDGET_GB`, or :data:`CPU_FREE_SHARE` of the available RAM (split between the processes launched
    on this machine) when that is less."""
    if asked_gb is not None:
        return float(asked_gb), f"{asked_gb:g} GiB, as asked"
    free = available_memory_gb(device)
    if device.type == "cuda":
        return CUDA_FREE_SHARE * free, f"auto: {CUDA_FREE_SHARE:.0%} of the {free:.1f} GiB free on {device}"
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # launched processes share the machine's RAM
    share = None if free is None else CPU_FREE_SHARE * free / processes
    if share is None or share >= CPU_BUDGET_GB:
        return CPU_BUDGET_GB, f"auto: {CPU_BUDGET_GB:g} GiB on the CPU"
    budget = max(share, 0.25)
    return budget, (f"auto: {CPU_FREE_SHARE:.0%} of the {free:.1f} GiB of RAM available"
                    + (f", shared by {processes} processes" if processes > 1 else "") + f" (under {CPU_BUDGET_GB:g} GiB)")


def _matmul_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@contextlib.contextmanager
def matmul_flags(tf32_matmul: bool, tf32_cudnn: bool) -> Iterator[None]:
    """Run a block with these TF32 flags, restoring the previous ones after it."""
    before = _matmul_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = bool(tf32_matmul), bool(tf32_cudnn)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def scorer_tf32(device: torch.device, dtype: torch.dtype, allowed: bool) -> bool:
    """Whether the scorer's own products use TF32: float32 work on a CUDA device, when allowed."""
    return allowed and device.type == "cuda" and dtype == torch.float32


def scorer_precision(device: torch.device, dtype: torch.dtype, allowed: bool = True):
    """The context of the scorer's own products: TF32 matmuls on CUDA for float32 work (when ``allowed``);
    elsewhere the flags are left as they are (they change nothing on the CPU or in float64)."""
    if not scorer_tf32(device, dtype, allowed):
        return contextlib.nullcontext()
    return matmul_flags(True, True)


def recorded_precision(numerics: dict):
    """The training run's own TF32 flags (``manifest.numerics``; torch's defaults, matmul off and cuDNN on, for
    manifests that predate them), under which replay reproduces its steps."""
    return matmul_flags(numerics.get("tf32_matmul", False), numerics.get("tf32_cudnn", True))
