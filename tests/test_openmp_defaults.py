"""`import medgem` sets libgomp's spin defaults and PyTorch's huge-page allocation (medgem/__init__.py) only
when torch is not loaded yet and the user has not chosen; it never overrides a user's choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHOW = "import os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def settings_after(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", f"{code}; {SHOW}"], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize("code,env,expected", [
    ("import medgem", {}, "ACTIVE 300000"),
    ("import medgem", {"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
    ("import medgem", {"GOMP_SPINCOUNT": "1000"}, "None 1000"),
    ("import torch, medgem", {}, "None None"),  # too late: libgomp has read its environment
])
def test_spin_defaults_only_when_unset_and_before_torch(code, env, expected):
    assert settings_after(code, **env) == expected


HUGE_PAGES = """
import medgem, torch
weights = torch.ones(64 * 2**20, dtype=torch.int8)  # one big weight, touched
start = weights.data_ptr()
with open("/proc/self/smaps") as smaps:
    lines, inside = smaps.read().splitlines(), False
for line in lines:
    if "-" in line.split()[0] and not line.split()[0].endswith(":"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        inside = lo <= start < hi
    elif inside and line.startswith("AnonHugePages:"):
        print(int(line.split()[1]) // 1024)
"""


def test_import_medgem_backs_big_weights_with_huge_pages():
    """Decode streams every weight once a token; 2 MB pages keep the prefetchers going (medgem/__init__.py)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" in thp:
        pytest.skip("transparent huge pages are off on this machine")
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = subprocess.run([sys.executable, "-c", HUGE_PAGES], env=clean, capture_output=True, text=True,
                         timeout=120, check=True)
    assert int(run.stdout) >= 32  # MB of the 64 MB tensor on huge pages
    mine = subprocess.run([sys.executable, "-c", HUGE_PAGES], env={**clean, "THP_MEM_ALLOC_ENABLE": "0"},
                          capture_output=True, text=True, timeout=120, check=True)
    if "[always]" not in thp:
        assert int(mine.stdout) == 0  # the user's own setting wins
