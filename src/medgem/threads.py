"""How many threads medgem's kernels use: the physical cores by default, and a warning past them.

Why: decode splits every matmul across the threads and each waits for the slowest, so two threads on
one core (hyper-threads, or more threads than the cores this process may run on) make every token
wait for a thread that is not running: `bench --threads 4` on 2 cores ran at half speed. Physical
cores, not logical CPUs, because two hyper-threads share one core's vector units.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medgem.errors import InputError

log = logging.getLogger(__name__)


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on; the CPU count where
    /proc/cpuinfo does not say."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return len(allowed)
    cores, cpu, package = set(), None, "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            cpu = int(value)
        elif key == "physical id":
            package = value
        elif key == "core id" and cpu in allowed:
            cores.add((package, value))
    return len(cores) or len(allowed)


def configure(threads: int | None) -> int:
    """Set PyTorch's (and so our kernels') thread count: `threads`, or the physical cores."""
    import torch

    cores = physical_cores()
    count = cores if threads is None else threads
    if count < 1:
        raise InputError(f"--threads must be at least 1, not {count}")
    if count > cores:
        log.warning("--threads %d is more than the %d physical cores this process may use: threads then share "
                    "cores and every matmul waits for one that is not running (decode about 2x slower)", count, cores)
    torch.set_num_threads(count)
    return count
