"""What the CPU is and can do: its model, cores and the instruction-set features that decide which kernels run.

Figures are only comparable on the same kind of CPU, and llama.cpp's behaviour depends on its features (its AMX path,
see ggml.py), so the bench, `mobilevlm doctor`, the llama.cpp backend and the GGUF quantizer read them from here. Linux only
(`/proc/cpuinfo`, sysfs); elsewhere the features are unknown and the answers fall back to safe defaults.
"""

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The features that change which matmul kernels torch and llama.cpp use, as /proc/cpuinfo spells them.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cpus: int  # logical CPUs this process may run on
    cores: int  # the same, counting hyper-threads once
    flags: frozenset[str]

    @property
    def has_amx(self) -> bool:
        return "amx_int8" in self.flags

    def describe(self) -> str:
        """One line for tables and logs: model, CPUs and the relevant features it has."""
        features = " ".join(flag for flag in RELEVANT_FLAGS if flag in self.flags) or "none of " + " ".join(RELEVANT_FLAGS)
        return f"{self.model}, {self.cpus} CPUs ({self.cores} cores); {features}"


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # the first processor's block describes them all
        if not line.strip():
            break
        name, _, value = line.partition(":")
        if name.strip() == "model name" and value.strip():
            model = value.strip()
        elif name.strip() == "flags":
            flags = frozenset(value.split())
    allowed = os.sched_getaffinity(0)
    return CpuInfo(model, len(allowed), physical_cores(allowed), flags)


def physical_cores(allowed: set[int] | None = None) -> int:
    """Cores this process may run on, counting hyper-threads once: llama.cpp is slower with one thread per hyper-thread."""
    allowed = os.sched_getaffinity(0) if allowed is None else allowed
    siblings = set()
    try:
        for cpu in allowed:
            siblings.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
    except OSError:
        return len(allowed)
    return len(siblings)
