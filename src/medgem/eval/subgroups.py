"""Per-group metrics, the largest gap between groups, and whether that gap is more than noise.

For each metadata column (sex, age band, site...), every metric is computed on each group's items
with a 95 % bootstrap CI that resamples within the group. The largest gap is the best group minus
the worst (groups smaller than `min_size` are reported but not compared). Its CI comes from the
same per-group replicates (groups are independent samples, so best-replicate minus
worst-replicate is a stratified bootstrap of the difference); the gap is flagged when that CI
excludes 0. Picking the best and worst of many groups favours large gaps, so with many groups
treat a flag as a lead to investigate, not a verdict.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medgem.errors import InputError
from medgem.eval.metrics import MetricFn, estimate, interval, seeded_rng

MISSING = "(missing)"


def check_columns(meta: list[dict[str, str]], columns: list[str]) -> None:
    """Every subgroup column must appear in at least one item."""
    known = {k for m in meta for k in m}
    for col in columns:
        if col not in known:
            raise InputError(f"subgroup column '{col}' is in no item; available: {', '.join(sorted(known)) or 'none'}")


def subgroup_report(
    metric_fns: dict[str, MetricFn],
    meta: list[dict[str, str]],
    columns: list[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_size: int = 5,
) -> list[dict[str, Any]]:
    """One entry per column: groups with per-metric estimates, and per-metric largest gaps with flags."""
    check_columns(meta, columns)
    report = []
    for col in columns:
        values = np.array([m.get(col, MISSING) for m in meta], dtype=object)
        groups: dict[str, Any] = {}
        reps: dict[tuple[str, str], np.ndarray] = {}
        for g in sorted(set(values)):
            idx = np.flatnonzero(values == g)
            entry: dict[str, Any] = {"n": int(len(idx))}
            for name, fn in metric_fns.items():
                est, reps[g, name] = estimate(fn, idx, n_boot, seeded_rng(seed, col, g, name))
                entry[name] = est.as_dict()
            groups[g] = entry
        gaps = {}
        for name in metric_fns:
            comparable = [g for g, e in groups.items()
                          if e["n"] >= min_size and e[name]["value"] is not None]
            if len(comparable) < 2:
                continue
            ranked = sorted(comparable, key=lambda g: groups[g][name]["value"])  # two distinct groups even on ties
            worst, best = ranked[0], ranked[-1]
            low, high = interval(reps[best, name] - reps[worst, name])
            gaps[name] = {
                "high_group": best, "low_group": worst,
                "gap": groups[best][name]["value"] - groups[worst][name]["value"],
                "low": low, "high": high, "flag": bool(np.isfinite(low) and (low > 0 or high < 0)),
            }
        report.append({"column": col, "groups": groups, "gaps": gaps, "min_size": min_size})
    return report
