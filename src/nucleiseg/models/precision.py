"""Which floating-point type mixed precision uses on a device, if any.

On CUDA it is float16. On a CPU it is bfloat16, but only where the CPU computes
bfloat16 natively (AVX512-BF16 or AMX): elsewhere PyTorch emulates it, and a
bfloat16 autocast step is many times slower than float32 (a Mask R-CNN
ResNet-18 training step of batch 4 at 256x256 took 64 s against 4.9 s in
float32 on an AVX2-only AMD EPYC; ``benchmarks/bench_maskrcnn_step.py``). So
``amp`` in a configuration asks for mixed precision where it pays, and such
CPUs run float32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast type for ``device``, or None where mixed precision is off or would not pay."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision for the device (see :func:`autocast_dtype`), or nothing."""
    dtype = autocast_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(device: torch.device, enabled: bool) -> str:
    """``float32``, ``bfloat16`` or ``float16``: what the compute actually runs in."""
    dtype = autocast_dtype(device, enabled)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def processor_name() -> str:
    """The CPU's model name, as ``/proc/cpuinfo`` gives it where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device, amp: bool = True) -> str:
    """Where timings come from, e.g. ``AMD EPYC, 2 CPU threads, float32``."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name()
    threads = torch.get_num_threads()
    return f"{where}, {threads} CPU threads, {precision_name(device, amp)}"
