import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.covariance import oas
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch.utils.data import DataLoader, Subset

from ccmr_core.engine import predict
from ccmr_core.head_refit import FeatureStats, layer_inputs, lda_from_stats, refit_lda
from ccmr_core.models import build_model
from tests.test_engine import S, Toy


def _data(n=60, d=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    return rng.normal(size=(n, d)) + 2 * rng.normal(size=(c, d))[y], y


def test_lda_from_sums_is_scikit_learns_lda_and_adds_up_over_sites():
    x, y = _data()
    w, b = lda_from_stats(FeatureStats.of(x, y, 3), shrink=False)
    want = LinearDiscriminantAnalysis(solver="lsqr").fit(x, y).predict_proba(x)
    assert np.allclose(softmax(x @ w.T + b, axis=1), want, atol=1e-8)
    # sums from two sites added up give the very same layer as the pooled patients
    two = FeatureStats.of(x[:25], y[:25], 3) + FeatureStats.of(x[25:], y[25:], 3)
    assert all(np.allclose(a, e) for a, e in zip(lda_from_stats(two), lda_from_stats(FeatureStats.of(x, y, 3))))


def test_the_shrunk_covariance_is_oas_of_the_within_class_residuals():
    x, y = _data(n=12, d=8)  # fewer patients than features per class: shrinkage is needed
    means = np.stack([x[y == k].mean(0) for k in range(3)])
    cov = oas(x - means[y], assume_centered=True)[0]
    w, b = lda_from_stats(FeatureStats.of(x, y, 3))
    assert np.allclose(w, np.linalg.solve(cov, means.T).T, atol=1e-8)
    assert np.allclose(b, -0.5 * np.sum(means * w, 1) + np.log(1 / 3), atol=1e-8)


@pytest.mark.parametrize("name", ["cc-cmr", "cine-only"])
def test_the_refitted_layer_gives_the_lda_posterior_of_the_features_it_reads(name):
    torch.manual_seed(0)
    m = build_model(name, 2, S, width=4, dim=16, proj=8)
    if name == "cc-cmr":
        m.set_stage("student")
    dl = DataLoader(Toy(24), batch_size=8)
    x, y = layer_inputs(m, dl, torch.device("cpu"))
    assert x.shape == (24, 16) and y.tolist() == [i % 2 for i in range(24)]
    assert refit_lda(m, dl, torch.device("cpu"), 2, passes=1) == {"patients": 24, "per_class": [12, 12],
                                                                  "features": 16, "dropout_passes": 1}
    w, b = lda_from_stats(FeatureStats.of(x, y, 2))
    got = predict(m, dl, torch.device("cpu"))["probs"]  # calibration temperature 1: the LDA posterior itself
    assert np.allclose(got, softmax(x @ w.T + b, axis=1), atol=1e-4)
    assert (got.argmax(1) == y).mean() > 0.9  # the blobs' sizes separate the classes
    assert m.training  # the mode found is restored


def test_a_fit_on_dropout_passes_expects_the_noise_of_mc_inference():
    """Fitted on MC-dropout features, the covariance holds the dropout noise: the layer weighs the
    features less than a fit on clean ones (whose low-variance directions dropout would blow up)."""
    torch.manual_seed(0)
    m = build_model("cine-only", 2, S, width=4, dim=16, proj=8, dropout=0.3)
    dl = DataLoader(Toy(24), batch_size=8)
    refit_lda(m, dl, torch.device("cpu"), 2, passes=1)
    clean = m.cls.weight.detach().norm()
    info = refit_lda(m, dl, torch.device("cpu"), 2, passes=8)
    assert info["patients"] == 24 and info["per_class"] == [12, 12]  # 8 passes still count as 24 patients
    assert m.cls.weight.detach().norm() < 0.5 * clean


def test_refit_refuses_a_class_with_fewer_than_two_patients():
    m = build_model("cine-only", 2, S, width=4, dim=16, proj=8)
    before = m.cls.weight.detach().clone()
    with pytest.raises(ValueError, match=r"at least 2 training patients per class; counts \[4, 1\]"):
        refit_lda(m, DataLoader(Subset(Toy(8), [0, 1, 2, 4, 6]), batch_size=4), torch.device("cpu"), 2)
    assert torch.equal(m.cls.weight, before)  # nothing half-written
