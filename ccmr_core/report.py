"""report.html for a run folder: the final table with confidence intervals, learning curves per
round (global and per site), per-site accuracy, ROC curves per class, confusion matrix,
reliability diagram, uncertainty vs error, risk-coverage with the referral rule's effect and
epsilon per site under DP, as one self-contained
page (PNG plots embedded) that opens offline. Every plot is drawn from counts that the run
already holds (federated runs never see per-patient outputs).

``ccmr report RUN`` rebuilds it from the run folder's files."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from ccmr_core.files import read_jsonl, write_atomic


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _rows(run: Path) -> list[dict]:
    return read_jsonl(run / "metrics.jsonl")[0]  # a line torn by a crash is left out of the curves


def _curves(rows: list[dict], loss_name: str = "train loss (all tasks, uncertainty-weighted)",
            val_name: str = "validation loss", kept: int | None = None) -> str | None:
    """Loss (and accuracy) over epochs or rounds; a training or validation row's ``chance_loss`` is
    drawn as a dashed line, and ``kept`` (the epoch whose model the run kept; None: the last) as a dotted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    key = "round" if "round" in rows[0] else "epoch"
    x = [r[key] for r in rows]
    with_acc = any((r.get(k) or {}).get("accuracy") is not None for r in rows
                   for k in ("server_validation", "federated_validation", "val"))
    fig, ax = plt.subplots(1, 2 if with_acc else 1, figsize=(10 if with_acc else 5, 3.5), squeeze=False)
    ax = ax[0]
    series = {
        loss_name: [(r.get("train") or {}).get("train-loss", (r.get("train") or {}).get("loss")) for r in rows],
        val_name: [((r.get("server_validation") or r.get("federated_validation") or r.get("val")) or {}).get("loss")
                            for r in rows],
    }
    for name, ys in series.items():
        if any(y is not None for y in ys):
            ax[0].plot(x, [np.nan if y is None else y for y in ys], marker="o", label=name)
    for part, name, color in (("train", "training at chance (log of its batch)", "tab:blue"),
                              ("val", "validation at chance (log of its gallery)", "tab:orange")):
        chance = [(r.get(part) or {}).get("chance_loss") for r in rows]
        if any(c is not None for c in chance):
            ax[0].axhline(max(c for c in chance if c is not None), color=color, ls="--", lw=1, alpha=0.6, label=name)
    if kept is not None:
        ax[0].axvline(kept, color="black", ls=":", lw=1, label=f"model kept (epoch {kept})")
    ax[0].set_xlabel(key)
    ax[0].set_title("loss")
    ax[0].legend(fontsize=7)
    if not with_acc:
        return _png(fig)
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


def _roc(test: dict) -> str | None:
    import matplotlib.pyplot as plt

    roc = ((test.get("curves") or {}).get("roc")) or {}
    if not roc:
        return None
    aucs = test.get("auc_per_class") or {}
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for c, r in roc.items():
        ax.plot(r["fpr"], r["tpr"], marker=".", label=f"{c} (AUC {_f(aucs.get(c))})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("test ROC per class (one vs rest)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _reliability(test: dict) -> str | None:
    import matplotlib.pyplot as plt

    rel = (test.get("curves") or {}).get("reliability") or {}
    if not rel.get("count"):
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    size = 20 + 200 * np.asarray(rel["count"]) / max(rel["count"])
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    ax.plot(rel["confidence"], rel["accuracy"], color="tab:blue", lw=1)
    ax.scatter(rel["confidence"], rel["accuracy"], s=size, color="tab:blue", alpha=0.7, label="bins (area = patients)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    floor = test.get("ece_floor")
    ax.set_title(f"reliability (ECE {_f(test.get('ece'))}"
                 + (f"; a calibrated model: ~{_f(floor)} on {test.get('n')} patients)" if floor is not None else ")"),
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _uncertainty(test: dict) -> str | None:
    import matplotlib.pyplot as plt

    u = (test.get("curves") or {}).get("uncertainty") or {}
    ok, bad = np.asarray(u.get("correct") or []), np.asarray(u.get("wrong") or [])
    if ok.sum() + bad.sum() == 0:
        return None
    edges = np.asarray(u["edges"])
    keep = np.nonzero(ok + bad)[0]
    lo, hi = keep.min(), keep.max() + 1
    labels = [f"{edges[i]:.0e}" if i else "0" for i in range(lo, hi)]
    x = np.arange(hi - lo)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(x, ok[lo:hi], color="tab:green", label="correct")
    ax.bar(x, bad[lo:hi], bottom=ok[lo:hi], color="tab:red", label="wrong")
    ax.set_xticks(x, labels, rotation=60, fontsize=7)
    ax.set_xlabel("epistemic uncertainty (mutual information, nats; bin lower edge)")
    ax.set_ylabel("test patients")
    ax2 = ax.twinx()
    tot = ok[lo:hi] + bad[lo:hi]
    rate = np.where(tot > 0, bad[lo:hi] / np.maximum(tot, 1), np.nan)
    ax2.plot(x, rate, color="black", marker="o", lw=1, label="error rate")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("error rate")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    auc = test.get("uncertainty_error_auc", (test.get("error_detection_auc") or {}).get("uncertainty"))
    ax.set_title(f"uncertainty vs error (AUC of uncertainty for errors {_f(auc)})")
    return _png(fig)


def _risk_coverage(test: dict) -> str | None:
    import matplotlib.pyplot as plt

    rc = (test.get("curves") or {}).get("risk_coverage") or {}
    if not any((rc.get(k) or {}).get("coverage") for k in ("confidence", "uncertainty")):
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for key, label in (("confidence", "refer the least confident first"),
                       ("uncertainty", "refer the most uncertain first")):
        c = rc.get(key) or {}
        if c.get("coverage") and any(v > 0 for v in c["coverage"]):
            ax.plot(c["coverage"], c["accuracy"], marker=".", label=label)
    ref = test.get("referral")
    if ref:
        ax.scatter([1 - ref["referred"]], [ref["accuracy_kept"]], s=80, color="black", zorder=5,
                   label=f"the stored rule: {ref['referred']:.0%} referred, accuracy of the rest {_f(ref['accuracy_kept'])}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(max(0.0, min(ax.get_ylim()[0], 0.5)), 1.01)
    ax.set_xlabel("share of test patients the model reads (coverage)")
    ax.set_ylabel("accuracy of those patients")
    ax.set_title("risk-coverage: what referring the doubtful cases buys")
    ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def _sites(test: dict, sites: list[str]) -> str | None:
    import matplotlib.pyplot as plt

    acc = test.get("site_accuracy")
    if not acc:
        return None
    n = test.get("site_n") or [None] * len(acc)
    names = sites if len(sites) == len(acc) else [f"site {i + 1}" for i in range(len(acc))]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(acc), 3.2))
    vals = [np.nan if a is None else a for a in acc]
    ax.bar(names, vals, color="tab:purple")
    for i, (a, k) in enumerate(zip(vals, n)):
        ax.text(i, (0 if a != a else a) + 0.02, f"{_f(a)}\nn={k}", ha="center", fontsize=7)
    ax.axhline(test.get("accuracy", np.nan), color="black", ls="--", lw=1, label="pooled")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy")
    ax.set_title("per-site test accuracy")
    ax.legend(fontsize=7)
    return _png(fig)


def _epsilon(rows: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    pts = [(r["round"], (r.get("privacy") or {}).get("epsilon") or {}) for r in rows if "round" in r]
    pts = [(k, e) for k, e in pts if e]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for site in pts[-1][1]:
        xs = [k for k, e in pts if site in e and e[site] is not None and np.isfinite(e[site])]
        ys = [e[site] for k, e in pts if site in e and e[site] is not None and np.isfinite(e[site])]
        if ys:
            ax.plot(xs, ys, marker="o", label=site)
    delta = next(((r.get("privacy") or {}).get("delta") for r in reversed(rows) if r.get("privacy")), None)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title(f"privacy spent per site (delta {delta:g})" if delta else "privacy spent per site")
    ax.legend(fontsize=7)
    return _png(fig)


def _f(x) -> str:
    """A metric for display; undefined ones (None or NaN, e.g. AUC of a one-class set) as n/a."""
    return "n/a" if x is None or x != x else f"{x:.3f}"


def _table(metrics: dict, test: dict) -> str:
    if not test.get("n"):
        return "<p>No test patients in this run.</p>"
    lo, hi = test.get("accuracy_ci95") or [None, None]
    eps = ((metrics.get("privacy") or {}).get("epsilon") or {})
    eps_txt = ", ".join(f"{html.escape(s)} {_f(e)}" for s, e in eps.items()) or "no DP"
    out = ("<table><tr><th>model</th><th>n</th><th>accuracy</th><th>95% CI</th><th>macro AUC</th><th>macro F1</th>"
           "<th>ECE</th><th>epsilon</th></tr>"
           f"<tr><td>{html.escape(str(metrics.get('model')))}</td><td>{test['n']}</td><td>{_f(test.get('accuracy'))}</td>"
           f"<td>{_f(lo)}-{_f(hi)}</td><td>{_f(test.get('macro_auc'))}</td><td>{_f(test.get('macro_f1'))}</td>"
           f"<td>{_f(test.get('ece'))}</td><td>{eps_txt}</td></tr></table>")
    if test.get("ece_floor") is not None:
        out += (f"<p>ECE is biased upwards on few patients: a perfectly calibrated model with these "
                f"confidences would score about {_f(test['ece_floor'])} on {test['n']} patients, so an ECE near that "
                "value is as well calibrated as this test set can show.</p>")
    pc = test.get("per_class") or {}
    if pc:
        aucs = test.get("auc_per_class") or {}
        out += "<table><tr><th>class</th><th>sensitivity</th><th>specificity</th><th>F1</th><th>AUC</th></tr>" + "".join(
            f"<tr><td>{html.escape(c)}</td><td>{_f(v.get('sensitivity'))}</td><td>{_f(v.get('specificity'))}</td>"
            f"<td>{_f(v.get('f1'))}</td><td>{_f(aucs.get(c))}</td></tr>" for c, v in pc.items()) + "</table>"
    ref = metrics.get("refer")
    if ref:
        u = ref.get("uncertainty")
        out += (f"<p>Referral rule stored in model.pt (set on {ref['validation_n']} validation patients): refer when "
                f"confidence is below {ref['confidence']:.2f}"
                + (f" or epistemic uncertainty is above {u:.2e} nats" if u is not None else "")
                + f"; each alone would refer about {ref['fraction']:.0%} of validation patients.</p>")
    done = test.get("referral")
    if done:
        out += (f"<p>On the {done['n']} test patients the rule referred {done['referred']:.0%}; the model's accuracy on "
                f"the patients it kept was {_f(done['accuracy_kept'])} (on the referred: "
                f"{_f(done['accuracy_referred'])}).</p>")
    det = test.get("error_detection_auc") or {}
    unc_auc = test.get("uncertainty_error_auc", det.get("uncertainty"))
    conf_auc = test.get("confidence_error_auc", det.get("confidence"))
    if unc_auc is not None or conf_auc is not None:
        out += (f"<p>How well each score flags the model's errors (AUROC): epistemic uncertainty {_f(unc_auc)}, "
                f"low confidence {_f(conf_auc)}.</p>")
    t = metrics.get("calibration_temperature")
    if t is not None:
        out += (f"<p>Probabilities are calibrated by temperature scaling fitted on validation patients "
                f"(temperature {t:.2f}: the raw model was "
                f"{'overconfident, its probabilities are softened' if t > 1 else 'underconfident, its probabilities are sharpened'}).</p>")
    return out


def _clip_table(test: dict) -> str:
    """A CMR-CLIP run's test results: retrieval both ways, zero-shot findings, probes."""
    r = test.get("retrieval")
    if not r:
        return "<p>No test patients in this run (no site held any out, or none had two or more).</p>"
    n = r["gallery"]
    pooled = r.get("pooled_over_sites")  # a federated run: each site's own gallery, pooled as counts
    rank = "median_rank" if "median_rank" in r["video_to_report"] else "mean_rank"
    where = (f"each site's own test gallery ({pooled} sites, {n:.1f} studies on average), pooled"
             if pooled else f"the test site's gallery of {n} studies and their {n} reports")
    out = (f"<p>Retrieval within {where} (chance: R@K = K / gallery).</p><table><tr><th>direction</th><th>R@1</th>"
           f"<th>R@5</th><th>R@10</th><th>{rank.replace('_', ' ')}</th></tr>")
    for key, name in (("report_to_video", "report -> study"), ("video_to_report", "study -> report"), ("chance", "chance")):
        v = r[key]
        out += (f"<tr><td>{name}</td><td>{_f(v['R@1'])}</td><td>{_f(v['R@5'])}</td><td>{_f(v['R@10'])}</td>"
                f"<td>{v.get(rank, (n + 1) / 2):.1f}</td></tr>")  # chance: the middle of the gallery
    out += "</table>"
    out += (f"<p>Class-aware precision@5 (share of a report's 5 nearest studies with its diagnosis): "
            f"{_f(test.get('class_precision@5'))}; zero-shot 5-class accuracy from class prompts: "
            f"{_f(test.get('zero_shot_accuracy'))}.</p>")
    f = test.get("findings") or {}
    if f:
        out += ("<table><tr><th>finding (zero-shot, from prompts)</th><th>AUC</th><th>positives / patients</th></tr>"
                + "".join(f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td>{_f(v['auc'])}</td>"
                          f"<td>{v['positives']} / {v['n']}</td></tr>" for k, v in f.items()) + "</table>")
    shots = test.get("few_shot") or {}
    out += ("<p>Probes on the frozen study embedding, fitted on the training sites: "
            + ", ".join(f"{k}-shot prototypes {_f(v)}" for k, v in shots.items())
            + f"; linear probe on every training patient {_f(test.get('linear_probe'))} accuracy.</p>")
    return out


def write_report(run: str | Path) -> Path:
    """Write RUN/report.html (one self-contained file: plots are embedded PNGs, no scripts, no
    links out) from the run folder's metrics.jsonl and metrics.json; returns its path."""
    run = Path(run)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    test = metrics.get("test") or {}
    rows = _rows(run)
    # the epoch whose model the run kept, when it is not the last (train.keep_model): curve and heading
    kept_epoch = metrics.get("kept_epoch")
    if kept_epoch == (rows[-1] if rows else {}).get("epoch"):
        kept_epoch = None
    sections = [
        ("Learning curves", _curves(rows, "contrastive loss (symmetric InfoNCE), training batches",
                                    "validation loss (over each site's validation gallery)" if "rounds" in metrics
                                    else "validation loss (the validation patients as one gallery)",
                                    kept_epoch)
         if metrics.get("model") == "cmr-clip" else _curves(rows)),
        ("Per-site accuracy", _sites(test, metrics.get("sites") or [])),
        ("ROC curves", _roc(test)),
        ("Confusion matrix", _confusion(test)),
        ("Calibration", _reliability(test)),
        ("Uncertainty and error", _uncertainty(test)),
        ("Risk-coverage and referral", _risk_coverage(test)),
        ("Privacy", _epsilon(rows)),
    ]
    body = "".join(f'<section><h2>{html.escape(t)}</h2><img alt="{html.escape(t)}" src="{i}"></section>'
                   for t, i in sections if i)
    kind = f"federated, {metrics.get('strategy')}, {metrics.get('rounds')} rounds" if "rounds" in metrics else "central"
    if metrics.get("start_from"):
        kind += f", fine-tuned from {metrics['start_from']}"
    kept = (f"; the model of epoch {kept_epoch}, of lowest validation loss (train.keep_model)"
            if kept_epoch is not None else "")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>CC-CMR run {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>CC-CMR run {html.escape(run.name)}</h1>
<p>{html.escape(str(metrics.get('model', '')))} ({html.escape(kind)}); sites: {html.escape(', '.join(metrics.get('sites') or []))}{kept}</p>
<h2>Test results</h2>{_clip_table(test) if metrics.get('model') == 'cmr-clip' else _table(metrics, test)}
{body}
<details><summary>metrics.json</summary><pre>{html.escape(json.dumps(metrics, indent=1))}</pre></details>
</body></html>"""
    write_atomic(run / "report.html", page)
    return run / "report.html"
