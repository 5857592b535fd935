"""Side-by-side comparison of two finished runs (say, base vs fine-tuned) on the same task.

Each metric shows both runs with their CIs and the unpaired difference (second minus first, each run
on all its own items). Metrics that are per-item means (accuracy, token F1, ROUGE-L) also get a paired
bootstrap CI of the difference on the items both runs scored, which is much tighter than comparing two
independent intervals. The table labels which is which and on how many items, since the two differ
when the runs scored different item counts (a --limit run against a full one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medgem.errors import InputError
from medgem.eval.metrics import estimate, mean_of, seeded_rng

PER_ITEM = {"accuracy": "correct", "accuracy_closed": "correct", "f1": "f1", "rougeL": "rougeL"}


def _load(run: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    results_path = run / "results.json"
    if not results_path.is_file():
        raise InputError(f"{run} has no results.json (is the run finished?)")
    try:
        results = json.loads(results_path.read_text())
        rows = {}
        pred_path = run / "predictions.jsonl"
        if pred_path.is_file():
            for line in pred_path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                rows[str(rec["id"])] = rec
    except (json.JSONDecodeError, KeyError) as exc:
        raise InputError(f"{run}: unreadable results ({type(exc).__name__})") from None
    return results, rows


def compare_runs(first: str | Path, second: str | Path, *, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    (a, rows_a), (b, rows_b) = _load(Path(first)), _load(Path(second))
    if a["task"] != b["task"]:
        raise InputError(f"cannot compare task '{a['task']}' with task '{b['task']}'")
    if a["settings"].get("data_sha256") != b["settings"].get("data_sha256"):
        raise InputError("the two runs scored different data files")
    common = sorted(set(rows_a) & set(rows_b))
    table = []
    for name in [m for m in a["metrics"] if m in b["metrics"]]:
        ea, eb = a["metrics"][name], b["metrics"][name]
        diff = None if ea["value"] is None or eb["value"] is None else eb["value"] - ea["value"]
        entry = {"metric": name, "first": ea, "second": eb, "diff": diff, "paired": None}
        field = PER_ITEM.get(name)
        pairs = [(rows_a[i][field], rows_b[i][field]) for i in common
                 if field and field in rows_a[i] and field in rows_b[i]]
        if pairs:
            d = np.array([float(y) - float(x) for x, y in pairs])
            est, _ = estimate(mean_of(d), np.arange(len(d)), n_boot, seeded_rng(seed, "compare", name))
            entry["paired"] = est.as_dict()
            entry["paired_n"] = len(d)
        table.append(entry)
    return {"task": a["task"], "first": {"dir": str(first), "model": a["model"], "method": a["method"]},
            "second": {"dir": str(second), "model": b["model"], "method": b["method"]},
            "n_common": len(common), "metrics": table}


def format_table(cmp: dict[str, Any]) -> str:
    def ci(e: dict[str, Any] | None) -> str:
        if not e or e.get("value") is None:
            return "-"
        lo, hi = e.get("low"), e.get("high")
        return f"{e['value']:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{e['value']:.3f}"

    def unpaired(m: dict[str, Any]) -> str:
        return "-" if m["diff"] is None else f"{m['diff']:+.3f} ({m['first']['n']} vs {m['second']['n']} items)"

    def paired(m: dict[str, Any]) -> str:
        return "-" if not m["paired"] else f"{ci(m['paired'])} ({m['paired_n']} items)"

    head = ["metric", f"1: {cmp['first']['model']} ({cmp['first']['method']})",
            f"2: {cmp['second']['model']} ({cmp['second']['method']})", "unpaired 2 - 1",
            "paired 2 - 1, same items (95% CI)"]
    body = [[m["metric"], ci(m["first"]), ci(m["second"]), unpaired(m), paired(m)] for m in cmp["metrics"]]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"task {cmp['task']}: 1 = {cmp['first']['dir']}, 2 = {cmp['second']['dir']}, " \
           f"{cmp['n_common']} items in common\n" + "\n".join(lines)
