"""report.html for a run folder: learning curves, confusion matrix, per-site accuracy and the final
table, as one self-contained page (PNG plots embedded) that opens offline.

``ccmr report RUN`` rebuilds it from the run folder's files."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _rows(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def _curves(rows: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    key = "round" if "round" in rows[0] else "epoch"
    x = [r[key] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    series = {
        "train loss (all tasks, uncertainty-weighted)": [(r.get("train") or {}).get("train-loss", (r.get("train") or {}).get("loss")) for r in rows],
        "validation loss": [((r.get("server_validation") or r.get("federated_validation") or r.get("val")) or {}).get("loss")
                            for r in rows],
    }
    for name, ys in series.items():
        if any(y is not None for y in ys):
            ax[0].plot(x, [np.nan if y is None else y for y in ys], marker="o", label=name)
    ax[0].set_xlabel(key)
    ax[0].set_title("loss")
    ax[0].legend()
    accs = {
        "coordinator validation": [(r.get("server_validation") or {}).get("accuracy") for r in rows],
        "sites' validation (pooled)": [(r.get("federated_validation") or {}).get("accuracy") for r in rows],
        "validation": [(r.get("val") or {}).get("accuracy") for r in rows],
    }
    for name, ys in accs.items():
        if any(y is not None for y in ys):
            ax[1].plot(x, [np.nan if y is None else y for y in ys], marker="o", label=name)
    site_acc = [(r.get("federated_validation") or {}).get("site-accuracy") for r in rows]
    if any(site_acc):
        for k in range(len(next(s for s in site_acc if s))):
            ax[1].plot(x, [np.nan if not s or s[k] is None else s[k] for s in site_acc], ls="--", alpha=0.6,
                       label=f"site {k + 1}")
    ax[1].set_ylim(0, 1)
    ax[1].set_xlabel(key)
    ax[1].set_title("accuracy")
    ax[1].legend(fontsize=7)
    return _png(fig)


def _confusion(test: dict) -> str | None:
    import matplotlib.pyplot as plt

    cm = np.asarray(test.get("confusion_matrix") or [])
    if cm.size == 0:
        return None
    classes = test.get("classes", [str(i) for i in range(len(cm))])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")
    return _png(fig)


def _f(x) -> str:
    """A metric for display; undefined ones (None or NaN, e.g. AUC of a one-class set) as n/a."""
    return "n/a" if x is None or x != x else f"{x:.3f}"


def write_report(run: str | Path) -> Path:
    run = Path(run)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    test = metrics.get("test") or {}
    imgs = [i for i in (_curves(_rows(run)), _confusion(test)) if i]
    table = ""
    if test.get("n"):
        lo, hi = test.get("accuracy_ci95") or [None, None]
        table = (f"<table><tr><th>model</th><th>n</th><th>accuracy</th><th>95% CI</th><th>macro AUC</th><th>ECE</th></tr>"
                 f"<tr><td>{html.escape(str(metrics.get('model')))}</td><td>{test['n']}</td><td>{_f(test.get('accuracy'))}</td>"
                 f"<td>{_f(lo)}-{_f(hi)}</td><td>{_f(test.get('macro_auc'))}</td><td>{_f(test.get('ece'))}</td></tr></table>")
        pc = test.get("per_class") or {}
        if pc:
            table += "<table><tr><th>class</th><th>sensitivity</th><th>specificity</th><th>F1</th></tr>" + "".join(
                f"<tr><td>{html.escape(c)}</td><td>{_f(v.get('sensitivity'))}</td><td>{_f(v.get('specificity'))}</td>"
                f"<td>{_f(v.get('f1'))}</td></tr>" for c, v in pc.items()) + "</table>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>CC-CMR run {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>
<h1>CC-CMR run {html.escape(run.name)}</h1>{table}
{''.join(f'<p><img src="{i}"></p>' for i in imgs)}
<details><summary>metrics.json</summary><pre>{html.escape(json.dumps(metrics, indent=1))}</pre></details>
</body></html>"""
    (run / "report.html").write_text(page)
    return run / "report.html"
