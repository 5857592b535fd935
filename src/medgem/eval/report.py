"""Writing a run's results: results.json, matplotlib PNGs and a self-contained HTML page.

The page shows the not-a-medical-device notice, the headline metrics with CIs, per-subgroup tables
with gap flags, and the plots that apply (ROC curves, reliability diagram, confusion matrix,
subgroup bars). Per-item predictions stay in predictions.jsonl: the page links to it but does not
copy question text, which may hold patient details.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medgem.eval import metrics
from medgem.eval.scoring import Scored
from medgem.notice import NOTICE


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def plot_roc(labels: list[str], y_true: np.ndarray, y_score: np.ndarray, path: Path) -> str | None:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    drawn = 0
    for j, lab in enumerate(labels[:12]):
        y, s = y_true[:, j], y_score[:, j]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{lab} (AUC {roc_auc_score(y, s):.2f})")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (one-vs-rest)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_reliability(confidence: np.ndarray, correct: np.ndarray, path: Path) -> str:
    conf, acc, count = metrics.reliability_bins(confidence, correct)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    centers = (np.arange(10) + 0.5) / 10
    ax.bar(centers, np.nan_to_num(acc), width=0.09, color="#4c72b0", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    for c, a, n in zip(centers, acc, count):
        if n:
            ax.text(c, np.nan_to_num(a) + 0.02, str(n), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence", ylabel="accuracy", title="Reliability (n per bin)")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_confusion(labels: list[str], gold: list[str], pred: list[str], path: Path) -> str:
    used = [lab for lab in labels if lab in set(gold) | set(pred)]
    index = {lab: i for i, lab in enumerate(used)}
    mat = np.zeros((len(used), len(used)), dtype=int)
    for g, p in zip(gold, pred):
        mat[index[g], index[p]] += 1
    plt = _plt()
    size = min(9, 2.5 + 0.45 * len(used))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(mat, cmap="Blues")
    ax.set_xticks(range(len(used)), [u[:18] for u in used], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(used)), [u[:18] for u in used], fontsize=8)
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if v > mat.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="gold", title="Confusion matrix")
    return _save(fig, path)


def plot_subgroup(entry: dict[str, Any], metric: str, path: Path) -> str:
    """Horizontal bars with 95 % CI whiskers, one per group (readable with many groups)."""
    groups = list(entry["groups"])
    vals = [entry["groups"][g][metric] for g in groups]
    v, lo, hi = (np.array([np.nan if x[k] is None else x[k] for x in vals], dtype=float) for k in ("value", "low", "high"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.32 * len(groups)))
    small = [entry["groups"][g]["n"] < entry["min_size"] for g in groups]
    ax.barh(range(len(groups)), np.nan_to_num(v), xerr=np.nan_to_num(np.vstack([v - lo, hi - v])), capsize=3,
            color=["#bbbbbb" if s else "#55a868" for s in small])
    ax.set_yticks(range(len(groups)), [f"{g} (n={entry['groups'][g]['n']})" for g in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=metric, title=f"{metric} by {entry['column']} (95% CI; grey: n < {entry['min_size']})")
    return _save(fig, path)


def write_plots(out: Path, scored: Scored, subgroups: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(caption, file name) for every plot that applies to this task."""
    plots = []
    if scored.roc is not None and (name := plot_roc(*scored.roc, out / "roc.png")):
        plots.append(("ROC curves", name))
    if scored.calibration is not None:
        plots.append(("Reliability diagram", plot_reliability(*scored.calibration, out / "reliability.png")))
    if scored.confusion is not None:
        plots.append(("Confusion matrix", plot_confusion(*scored.confusion, out / "confusion.png")))
    for entry in subgroups:
        safe = "".join(ch if ch.isalnum() else "_" for ch in entry["column"])
        plots.append((f"{scored.primary} by {entry['column']}",
                      plot_subgroup(entry, scored.primary, out / f"subgroup_{safe}.png")))
    return plots


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))


def _ci(e: dict[str, Any]) -> str:
    return f"{_fmt(e['value'])} <span class=ci>[{_fmt(e['low'])}, {_fmt(e['high'])}]</span>"


def render_html(results: dict[str, Any], plots: list[tuple[str, str]]) -> str:
    esc = html.escape
    head = (f"<h1>medgem eval: {esc(results['task'])}</h1><p class=notice>{esc(NOTICE)}</p>"
            f"<p>Model <b>{esc(str(results['model']))}</b> · method {esc(results['method'])} · "
            f"{results['n_items']} items from <code>{esc(results['data'])}</code> · seed {results['seed']} · "
            f"{results['n_boot']} bootstrap resamples</p>")
    rows = "".join(f"<tr><td>{esc(k)}{' (primary)' if k == results['primary'] else ''}</td><td>{_ci(v)}</td></tr>"
                   for k, v in results["metrics"].items())
    body = [head, f"<h2>Headline metrics (95% CI)</h2><table><tr><th>metric</th><th>value</th></tr>{rows}</table>"]
    extra = {k: v for k, v in results.get("extra", {}).items() if k != "per_label"}
    if extra:
        body.append("<p>" + " · ".join(f"{esc(k)}: {_fmt(v)}" for k, v in extra.items()) + "</p>")
    if results.get("extra", {}).get("per_label"):
        per = results["extra"]["per_label"]
        cols = list(next(iter(per.values())))
        trs = "".join(f"<tr><td>{esc(lab)}</td>" + "".join(f"<td>{_fmt(v[c])}</td>" for c in cols) + "</tr>"
                      for lab, v in per.items())
        body.append(f"<h2>Per label</h2><table><tr><th>label</th>{''.join(f'<th>{esc(c)}</th>' for c in cols)}"
                    f"</tr>{trs}</table>")
    for entry in results.get("subgroups", []):
        names = list(results["metrics"])
        trs = "".join(f"<tr><td>{esc(g)}</td><td>{e['n']}</td>" + "".join(f"<td>{_ci(e[m])}</td>" for m in names)
                      + "</tr>" for g, e in entry["groups"].items())
        gaps = "".join(
            f"<li class={'flag' if gap['flag'] else 'ok'}>{esc(m)}: {esc(gap['high_group'])} − "
            f"{esc(gap['low_group'])} = {_fmt(gap['gap'])} [{_fmt(gap['low'])}, {_fmt(gap['high'])}] "
            f"{'⚑ CI excludes 0' if gap['flag'] else '(CI includes 0)'}</li>" for m, gap in entry["gaps"].items())
        gaps = gaps or f"<li>none computed: fewer than two groups have n ≥ {entry['min_size']}</li>"
        binned = f"<p>Binned into {esc(entry['binning'])}.</p>" if entry.get("binning") else ""
        body.append(f"<h2>By {esc(entry['column'])}</h2>{binned}<table><tr><th>group</th><th>n</th>"
                    f"{''.join(f'<th>{esc(m)}</th>' for m in names)}</tr>{trs}</table>"
                    f"<p>Largest gaps (groups with n ≥ {entry['min_size']}):</p><ul>{gaps}</ul>")
    body += [f"<figure><img src='{esc(name)}' alt='{esc(cap)}'><figcaption>{esc(cap)}</figcaption></figure>"
             for cap, name in plots]
    body.append("<p>Per-item predictions: <a href='predictions.jsonl'>predictions.jsonl</a> · "
                "all numbers: <a href='results.json'>results.json</a></p>")
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
             ".ci{color:#666;font-size:90%}.notice{background:#fff3cd;border:1px solid #e0c060;padding:.6em}"
             ".flag{color:#b00;font-weight:bold}figure{display:inline-block;margin:.5em}img{max-width:460px}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>medgem eval {esc(results['task'])}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def text_summary(results: dict[str, Any]) -> list[str]:
    """The terminal's view of a run: headline metrics, then each subgroup column's groups (primary metric)
    and largest gaps, as the HTML report shows them."""
    def ci(e: dict[str, Any]) -> str:
        value = "n/a" if e["value"] is None else f"{e['value']:.3f}"
        return value + (f" [{e['low']:.3f}, {e['high']:.3f}]" if e.get("low") is not None else "")

    lines = [f"{name}: {ci(e)}  (n={e['n']})" for name, e in results["metrics"].items()]
    primary = results["primary"]
    for entry in results.get("subgroups", []):
        binned = f", binned into {entry['binning']}" if entry.get("binning") else ""
        lines.append(f"by {entry['column']}{binned}:")
        lines += [f"  {g}  n={e['n']}  {primary} {ci(e[primary])}" for g, e in entry["groups"].items()
                  if primary in e]
        for metric, gap in entry["gaps"].items():
            verdict = "gap flagged: CI excludes 0" if gap["flag"] else "CI includes 0"
            lines.append(f"  largest gap {metric}: {gap['high_group']} - {gap['low_group']} = {gap['gap']:.3f} "
                         f"[{gap['low']:.3f}, {gap['high']:.3f}] ({verdict})")
        if not entry["gaps"]:
            lines.append(f"  largest gap: none computed (fewer than two groups with n >= {entry['min_size']})")
    return lines


def plain(x: Any) -> Any:
    """JSON-safe copy: numpy scalars become Python numbers, NaN and infinities become null."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write_json(path: Path, data: Any) -> None:
    """Atomic write, so a killed run never leaves half a results file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plain(data), indent=2) + "\n")
    os.replace(tmp, path)


def write_report(out: Path, results: dict[str, Any], scored: Scored) -> None:
    plots = write_plots(out, scored, results.get("subgroups", []))
    write_json(out / "results.json", results)
    tmp = out / "report.html.tmp"
    tmp.write_text(render_html(results, plots), encoding="utf-8")
    os.replace(tmp, out / "report.html")
