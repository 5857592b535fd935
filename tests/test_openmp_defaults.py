"""`import medgem` sets libgomp's spin defaults (medgem/__init__.py) only when torch is not loaded yet and
the user chose neither setting; it never overrides a user's choice."""

from __future__ import annotations

import os
import subprocess
import sys

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
