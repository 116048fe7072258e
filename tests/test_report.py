"""report.html: every plot the coordinator needs, drawn from counts, self-contained, and it renders
in a real (headless) browser."""

import json
import shutil
import subprocess
import zlib

import numpy as np
import pytest

from ccmr_core.metrics import EvalStats, classification_metrics, curves_from_stats
from ccmr_core.report import write_report
from server.aggregation import summarize_stats

CLASSES = ["NOR", "MINF", "DCM", "HCM", "ARV"]


def _outputs(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    logits = rng.normal(size=(n, 5)) + 2.0 * np.eye(5)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    unc = rng.gamma(1.0, 0.01, n) + 0.05 * (probs.argmax(1) != labels)
    return probs, labels, unc


def _assert_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close(x, y)
    else:
        assert a == pytest.approx(b, rel=1e-12)


def test_curves_from_pooled_counts_equal_curves_from_all_outputs():
    (p1, y1, u1), (p2, y2, u2) = _outputs(40, 1), _outputs(30, 2)
    pooled = EvalStats.from_outputs(p1, y1, uncertainty=u1) + EvalStats.from_outputs(p2, y2, uncertainty=u2)
    flat = EvalStats.from_flat(pooled.to_flat(), 5)  # what travels from the sites
    whole = classification_metrics(np.concatenate([p1, p2]), np.concatenate([y1, y2]), CLASSES,
                                   np.concatenate([u1, u2]))
    _assert_close(curves_from_stats(flat, CLASSES), whole["curves"])
    c = whole["curves"]
    for r in c["roc"].values():
        assert r["fpr"][0] == r["tpr"][0] == 0 and r["fpr"][-1] == pytest.approx(1) == r["tpr"][-1]
        assert np.all(np.diff(r["fpr"]) >= 0) and np.all(np.diff(r["tpr"]) >= 0)
    assert sum(c["reliability"]["count"]) == 70
    assert sum(c["uncertainty"]["correct"]) + sum(c["uncertainty"]["wrong"]) == 70
    # the wrong ones were made more uncertain: their mean bin is higher
    bins = np.arange(len(c["uncertainty"]["correct"]))
    assert (np.average(bins, weights=c["uncertainty"]["wrong"]) >
            np.average(bins, weights=c["uncertainty"]["correct"]))


@pytest.fixture
def federated_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for k in range(1, 5):
        rows.append({"round": k, "seconds": 10.0 * k, "train": {"train-loss": 2.0 / k},
                     "federated_validation": {"accuracy": 0.2 * k, "macro-auc": 0.6, "loss": 1.5 / k,
                                              "site-accuracy": [0.1 * k, 0.2 * k, None]},
                     "server_validation": {"accuracy": 0.15 * k, "loss": 1.6 / k},
                     "privacy": {"mode": "sample", "delta": 1e-5,
                                 "epsilon": {"site-a": 0.5 * k, "site-b": 0.6 * k, "site-c": 0.4 * k}}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p, y, u = _outputs(60, 3)
    stats = EvalStats.from_outputs(p, y, uncertainty=u)
    test = summarize_stats(stats, np.array([20.0, 15.0, 10.0]), np.array([25.0, 20.0, 15.0]), CLASSES)
    test["uncertainty_error_auc"] = 0.7
    metrics = {"model": "cc-cmr", "strategy": "fedprox", "rounds": 4, "sites": ["site-a", "site-b", "site-c"],
               "test": test, "privacy": rows[-1]["privacy"],
               "refer": {"fraction": 0.2, "confidence": 0.45, "uncertainty": 0.02, "validation_n": 30}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_report_has_every_plot_and_is_self_contained(federated_run):
    page = write_report(federated_run).read_text()
    for title in ("Learning curves", "Per-site accuracy", "ROC curves", "Confusion matrix", "Calibration",
                  "Uncertainty and error", "Privacy"):
        assert f'<img alt="{title}" src="data:image/png;base64,' in page, title
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "95% CI" in page and "site-a 2.000" in page and "Referral rule" in page


def test_report_without_dp_or_sites_leaves_those_plots_out(trained_run):
    run, _ = trained_run
    page = write_report(run).read_text()
    assert "ROC curves" in page and "Calibration" in page
    assert 'alt="Privacy"' not in page and 'alt="Per-site accuracy"' not in page
    assert "no DP" in page


def test_clip_report_says_which_epochs_model_was_kept_when_not_the_last(tmp_path):
    rows = [{"epoch": e, "train": {"loss": 2.0, "chance_loss": 2.08},
             "val": {"loss": 3.0 + e / 10, "chance_loss": 3.4, "gallery": 30}} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for kept, said in ((1, True), (3, False)):
        (tmp_path / "metrics.json").write_text(json.dumps({"model": "cmr-clip", "sites": ["site-a"], "kept_epoch": kept,
                                                           "test": {}}))
        page = write_report(tmp_path).read_text()
        assert ("the model of epoch 1, of lowest validation loss" in page) is said
        assert 'alt="Learning curves"' in page


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _non_white_rows(data: bytes) -> int:
    """Rows of the screenshot that are not plain white (decodes the PNG's IDAT stream)."""
    w, h = _png_size(data)
    pos, idat = 8, b""
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    color_type = data[25]
    bpp = {2: 3, 6: 4}[color_type]
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = bytearray(stride)
    count = 0
    for r in range(h):
        f = raw[r * (stride + 1)]
        line = bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):  # undo the PNG row filters
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        count += any(v < 200 for i, v in enumerate(line) if bpp == 3 or i % 4 != 3)
        prev = line
    return count


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium); CI installs it")
def test_report_renders_in_headless_chromium(federated_run, tmp_path):
    page = write_report(federated_run)
    shot = tmp_path / "shot.png"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files"]
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # every plot of the page is in the rendered DOM (learning curves ... risk-coverage: 8 today)
    assert dom.stdout.count("<img") == page.read_text().count("<img") >= 8 and "CC-CMR run" in dom.stdout
    r = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1000,4200", "--hide-scrollbars",
                                 page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    # the plots were decoded and drawn: most of a tall page is ink, not an empty white sheet
    assert _non_white_rows(shot.read_bytes()) > 0.5 * _png_size(shot.read_bytes())[1]


def test_report_numbers_are_the_run_metrics(federated_run):
    """The figures a reader sees are metrics.json's, not recomputed or stale: the test table, each
    class's row, the referral rule and the last round's epsilon."""
    import re

    page = write_report(federated_run).read_text()
    m = json.loads((federated_run / "metrics.json").read_text())
    t = m["test"]
    lo, hi = t["accuracy_ci95"]
    cells = re.findall(r"<td>([^<]*)</td>", page.split("<table>")[1])
    assert cells[:8] == ["cc-cmr", str(t["n"]), f"{t['accuracy']:.3f}", f"{lo:.3f}-{hi:.3f}", f"{t['macro_auc']:.3f}",
                         f"{t['macro_f1']:.3f}", f"{t['ece']:.3f}", cells[7]]
    for c, v in t["per_class"].items():
        assert (f"<tr><td>{c}</td><td>{v['sensitivity']:.3f}</td><td>{v['specificity']:.3f}</td>"
                f"<td>{v['f1']:.3f}</td>") in page
    assert "confidence is below 0.45" in page and "uncertainty is above 2.00e-02" in page
