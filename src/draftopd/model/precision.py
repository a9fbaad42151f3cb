"""Which dtype to run in: `auto` picks from the hardware, never by habit.

CPUs differ by a factor of ~40 in bf16: with native bf16 (AVX512-BF16, AMX, Arm BF16) a
bf16 matmul is faster than fp32, while on an AVX2-only CPU torch emulates it and a bf16
matmul ran at 1.1 GFLOP/s against 46 for fp32. So `auto` means bf16 on CUDA and on a CPU
where a bf16 matmul measurably beats fp32, and fp32 everywhere else. The measurement is a
sub-second micro-benchmark at decode-like shapes, done once per process.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from draftopd.errors import DraftOPDError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
BF16_MIN_GAIN = 1.25  # bf16 must beat fp32 by this factor on the CPU: otherwise fp32 costs nothing


@dataclass(frozen=True)
class Bf16Probe:
    """One measurement of bf16 vs fp32 matmul speed on this CPU."""

    fp32_s: float
    bf16_s: float

    @property
    def speedup(self) -> float:  # > 1: bf16 is faster
        return self.fp32_s / max(self.bf16_s, 1e-9)

    @property
    def native(self) -> bool:
        return self.speedup >= BF16_MIN_GAIN


def cpu_capability() -> str:
    """torch's view of the CPU's vector ISA ("AVX2", "AVX512", "DEFAULT", ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch or an unusual build
        return "unknown"


def _best_time(fn, reps: int) -> float:
    fn()  # warm-up: first calls pick kernels and allocate
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def probe_bf16() -> Bf16Probe:
    """Time a [16, 1024] x [1024, 4096] matmul (a decode step's shape) in fp32 and bf16.

    ~130 MFLOP each: a few ms in fp32 anywhere, ~0.1 s in emulated bf16; under a second in all.
    """
    gen = torch.Generator().manual_seed(0)
    a32 = torch.randn(16, 1024, generator=gen)
    w32 = torch.randn(1024, 4096, generator=gen)
    a16, w16 = a32.bfloat16(), w32.bfloat16()
    return Bf16Probe(fp32_s=_best_time(lambda: a32 @ w32, 3), bf16_s=_best_time(lambda: a16 @ w16, 3))


def auto_dtype(device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """(dtype, why) for `auto` on this device."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA with bf16 support"
        return torch.float32, "CUDA device without bf16 support"
    if device.type != "cpu":
        return torch.float32, f"{device.type} device: fp32 is the safe default"
    probe = probe_bf16()
    cap = cpu_capability()
    if probe.native:
        return torch.bfloat16, f"CPU {cap}: a bf16 matmul ran {probe.speedup:.1f}x faster than fp32"
    return torch.float32, (f"CPU {cap} has no fast bf16: a bf16 matmul ran {1 / probe.speedup:.1f}x slower "
                           "than fp32 here")


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype from its name; `auto` is decided by the hardware (see `auto_dtype`)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto_dtype(device)[0]
    if name not in DTYPES:
        raise DraftOPDError(f"dtype {name!r} is not supported; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_fallback(name: str | torch.dtype, device: str | torch.device = "cpu") -> str | None:
    """The line to print when `auto` falls back to fp32, and why (None otherwise: the chosen
    dtype is recorded in every results file, see `hardware_record`)."""
    if name != "auto":
        return None
    dtype, why = auto_dtype(device)
    return f"dtype auto -> {dtype_name(dtype)}: {why}" if dtype == torch.float32 else None


def hardware_record(dtype: torch.dtype, device: str | torch.device = "cpu") -> dict:
    """What every results file records next to its figures: the dtype and the hardware."""
    device = torch.device(device)
    rec = {"dtype": dtype_name(dtype), "device": device.type, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    else:
        from draftopd.model.packed import packing_unavailable

        rec["cpu_capability"] = cpu_capability()
        rec["linears"] = "packed" if packing_unavailable(dtype) is None else "plain"  # model/packed.py
    return rec
