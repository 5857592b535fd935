"""Per-group metrics, the largest gap between groups, and whether that gap is more than noise.

For each metadata column (sex, age band, site...), every metric is computed on each group's items
with a 95 % bootstrap CI that resamples within the group. The largest gap is the best group minus
the worst (groups smaller than `min_size` are reported but not compared). Its CI comes from the
same per-group replicates (groups are independent samples, so best-replicate minus
worst-replicate is a stratified bootstrap of the difference); the gap is flagged when that CI
excludes 0. Picking the best and worst of many groups favours large gaps, so with many groups
treat a flag as a lead to investigate, not a verdict.

A numeric column (age, BMI) is binned rather than split into one group per value: `age:10` makes bands
of width 10, `age:q4` quartiles; a numeric column named without a spec that has more than
AUTO_BIN_ABOVE distinct values gets quartiles. Each entry says how it was binned (`binning`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from medgem.errors import InputError
from medgem.eval.metrics import MetricFn, estimate, interval, seeded_rng

MISSING = "(missing)"
AUTO_BIN_ABOVE = 8  # distinct numeric values past which a column without a spec is cut into quartiles


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`age` -> ("age", None); `age:10` -> ("age", "10"); `age:q4` -> ("age", "q4")."""
    column, _, how = spec.partition(":")
    if how and not re.fullmatch(r"q([2-9]|10)|\d+(\.\d+)?", how):
        raise InputError(f"subgroup spec '{spec}': after ':' give a band width (age:10) or quantiles q2..q10 (age:q4)")
    if how and not how.startswith("q") and float(how) <= 0:
        raise InputError(f"subgroup spec '{spec}': the band width must be positive")
    return column, how or None


def check_columns(meta: list[dict[str, str]], columns: list[str]) -> None:
    """Every subgroup column must appear in at least one item (specs are checked too)."""
    known = {k for m in meta for k in m}
    for spec in columns:
        col, _ = parse_spec(spec)
        if col not in known:
            raise InputError(f"subgroup column '{col}' is in no item; available: {', '.join(sorted(known)) or 'none'}")


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def group_labels(values: list[object], column: str, how: str | None) -> tuple[list[str], list[str], str | None]:
    """(each item's group, the groups in display order, how the column was binned or None)."""
    numbers = [_number(v) for v in values]
    present = [v for v in values if v != MISSING]
    numeric = bool(present) and all(_number(v) is not None for v in present)
    if how is None and not (numeric and len(set(present)) > AUTO_BIN_ABOVE):
        labels = [str(v) for v in values]
        return labels, sorted(set(labels)), None
    if not numeric:
        raise InputError(f"subgroup column '{column}' holds values that are not numbers, so it cannot be binned; "
                         f"name it without ':{how}'")
    known = np.array([n for n in numbers if n is not None])
    if how is None or how.startswith("q"):
        q = int(how[1:]) if how else 4
        edges = np.unique(np.quantile(known, np.linspace(0, 1, q + 1)))
        binning = f"{'automatic ' if how is None else ''}quantiles: {q} groups of about equal size"
    else:
        width = float(how)
        low = math.floor(known.min() / width) * width
        edges = low + width * np.arange(math.floor((known.max() - low) / width) + 2)
        binning = f"bands of width {width:g}"
    names = [f"[{a:g}, {b:g})" for a, b in zip(edges[:-1], edges[1:])]
    names[-1] = names[-1][:-1] + "]" if how is None or how.startswith("q") else names[-1]

    def label(n: float | None) -> str:
        if n is None:
            return MISSING
        i = min(int(np.searchsorted(edges, n, side="right")) - 1, len(names) - 1)
        return names[max(i, 0)]

    labels = [label(n) for n in numbers]
    used = set(labels)
    return labels, [g for g in [*names, MISSING] if g in used], binning


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
    for spec in columns:
        col, how = parse_spec(spec)
        labels, order, binning = group_labels([m.get(col, MISSING) for m in meta], col, how)
        values = np.array(labels, dtype=object)
        groups: dict[str, Any] = {}
        reps: dict[tuple[str, str], np.ndarray] = {}
        for g in order:
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
        report.append({"column": col, "binning": binning, "groups": groups, "gaps": gaps, "min_size": min_size})
    return report
