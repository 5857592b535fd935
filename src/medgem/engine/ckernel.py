"""Our C kernels (int8_vnni.c, blocks_avx2.c): compiled on first use, cached, loaded with ctypes.

Each is built with the system's C compiler into medgem's cache folder (under a second), linked to the
OpenMP runtime PyTorch itself loaded, so kernel and PyTorch share one thread pool. Where the CPU lacks
the instructions, no compiler is found, or the kernel's switch variable is 0, `load` returns None and
the engine keeps PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from medgem import progress

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("MEDGEM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          Path.home() / ".cache", "medgem")
    return Path(root) / "kernels"


@cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none to read)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 matmuls beat float32 ones
    (elsewhere PyTorch emulates bf16, slower than float32)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _openmp_runtime() -> str | None:
    """The OpenMP library this process already runs (PyTorch's), so a kernel joins its thread pool."""
    torch.get_num_threads()  # makes sure PyTorch has loaded it
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libgomp" in path or "/libiomp" in path:
            return path
    return None


def _build(source: Path, cflags: list[str], runtime: str) -> Path:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler (cc) on PATH")
    key = hashlib.sha256(source.read_bytes() + " ".join([*cflags, runtime]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: races are harmless
        built = Path(tmp) / target.name
        # --as-needed: PyTorch's runtime, named first, satisfies the OpenMP calls, so the compiler's own
        # libgomp (which -fopenmp adds) is not loaded as a second runtime beside it.
        command = [compiler, *cflags, str(source), "-o", str(built), f"-Wl,-rpath,{Path(runtime).parent}",
                   "-Wl,--as-needed", runtime]
        with progress.step(f"compiling {source.name} into {target.parent} (once)"):
            result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise OSError(f"compiling {source.name} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def load(source: Path, cflags: list[str], needs: tuple[str, ...], switch: str) -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged) where this machine cannot run it."""
    if os.environ.get(switch, "1") == "0" or not set(needs) <= cpu_flags():
        return None
    runtime = _openmp_runtime()
    if runtime is None:
        log.info("%s off: PyTorch's OpenMP runtime was not found; using PyTorch's kernels", source.stem)
        return None
    try:
        return ctypes.CDLL(str(_build(source, ["-O3", "-shared", "-fPIC", "-fopenmp", *cflags], runtime)))
    except (OSError, RuntimeError) as err:  # RuntimeError: no home folder for the cache (Path.home)
        log.warning("%s off (%s); using PyTorch's slower kernels", source.stem, err)
        return None
