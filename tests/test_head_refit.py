import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch.utils.data import DataLoader

from ccmr_core.engine import predict
from ccmr_core.head_refit import layer_inputs, refit_lda
from ccmr_core.models import build_model
from tests.test_engine import S, Toy


@pytest.mark.parametrize("name", ["cc-cmr", "cine-only"])
def test_refit_layer_is_the_lda_of_the_features_it_reads(name):
    torch.manual_seed(0)
    m = build_model(name, 2, S, width=4, dim=16, proj=8)
    m.set_stage("student") if name == "cc-cmr" else None
    dl = DataLoader(Toy(24), batch_size=8)
    x, y = layer_inputs(m, dl, torch.device("cpu"))
    assert x.shape == (24, 16) and y.tolist() == [i % 2 for i in range(24)]
    info = refit_lda(m, dl, torch.device("cpu"), 2)
    assert info == {"patients": 24, "per_class": [12, 12], "features": 16}
    want = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, y).predict_proba(x)
    got = predict(m, dl, torch.device("cpu"))["probs"]  # calibration temperature 1: the LDA posterior itself
    assert np.allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == y).mean() > 0.9  # the blobs' sizes separate the classes
    assert m.training  # the mode found is restored


def test_refit_refuses_a_class_with_fewer_than_two_patients():
    m = build_model("cine-only", 2, S, width=4, dim=16, proj=8)
    before = m.cls.weight.detach().clone()
    with pytest.raises(ValueError, match=r"at least 2 training patients per class; counts \[4, 1\]"):
        refit_lda(m, DataLoader(torch.utils.data.Subset(Toy(8), [0, 1, 2, 4, 6]), batch_size=4), torch.device("cpu"), 2)
    assert torch.equal(m.cls.weight, before)  # nothing half-written
