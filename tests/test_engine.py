import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ccmr_core.config import TrainConfig
from ccmr_core.engine import evaluate, make_optimizer, predict, train_epoch
from ccmr_core.models import build_model

S, T, H = 3, 4, 16


class Toy(Dataset):
    """Class k: a bright blob whose size depends on k, beating for class 0 only."""

    def __init__(self, n=40, seed=0, lge_every=2):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            y = i % 2
            cine = torch.rand(S, T, H, H, generator=g) * 0.2
            r = 3 + 3 * y
            cine[:, :, 8 - r : 8 + r, 8 - r : 8 + r] += 0.8
            lge = torch.rand(S, H, H, generator=g) * 0.2 + 0.5 * y
            self.items.append({"cine": cine, "lge": lge, "has_lge": torch.tensor(i % lge_every == 0),
                               "label": torch.tensor(y), "bio": torch.zeros(4, 32), "has_bio": torch.tensor(False),
                               "index": torch.tensor(i)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _model(name="cc-cmr"):
    torch.manual_seed(0)
    return build_model(name, 2, S, width=4, dim=16, proj=8)


def test_training_learns_a_learnable_task():
    ds = Toy()
    dl = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    m = _model("cine-only")
    opt = make_optimizer(m, TrainConfig(lr=3e-3))
    first = train_epoch(m, dl, opt, torch.device("cpu"))["loss"]
    for _ in range(15):
        last = train_epoch(m, dl, opt, torch.device("cpu"))["loss"]
    assert last < first * 0.5
    res = evaluate(m, DataLoader(ds, batch_size=8), torch.device("cpu"), ["a", "b"])
    assert res["accuracy"] >= 0.9


def _one_round(mu, global_from=None):
    m = _model()
    if global_from is not None:
        m.load_state_dict(global_from.state_dict())
    g = [p.detach().clone() for p in m.parameters()]
    torch.manual_seed(1)
    dl = DataLoader(Toy(16), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = make_optimizer(m, TrainConfig(optimizer="sgd", lr=0.05, weight_decay=0.0))
    train_epoch(m, dl, opt, torch.device("cpu"), prox_mu=mu, global_params=g)
    return m, g


def _dist(m, g):
    return float(sum(((p - q) ** 2).sum() for p, q in zip(m.parameters(), g)) ** 0.5)


def test_fedprox_term_changes_the_update_and_mu_zero_is_fedavg():
    fedavg, g = _one_round(0.0)
    fedavg2, _ = _one_round(0.0)
    assert all(torch.equal(a, b) for a, b in zip(fedavg.parameters(), fedavg2.parameters()))  # deterministic
    prox, _ = _one_round(5.0)
    assert not all(torch.equal(a, b) for a, b in zip(fedavg.parameters(), prox.parameters()))
    assert _dist(prox, g) < _dist(fedavg, g)  # pulled towards the global model
    with pytest.raises(ValueError, match="global parameters"):
        train_epoch(_model(), DataLoader(Toy(4), batch_size=4), make_optimizer(_model(), TrainConfig()),
                    torch.device("cpu"), prox_mu=1.0)


def test_mc_dropout_gives_epistemic_uncertainty():
    m = _model()
    dl = DataLoader(Toy(12), batch_size=4)
    det = predict(m, dl, torch.device("cpu"), mc_samples=0)
    assert np.all(det["uncertainty"] == 0) and det["probs"].shape == (12, 2)
    mc = predict(m, dl, torch.device("cpu"), mc_samples=8)
    assert np.all(mc["uncertainty"] >= 0) and mc["uncertainty"].max() > 0
    assert np.allclose(mc["probs"].sum(1), 1, atol=1e-5)
    assert m.training  # predict restores the mode it found


def test_lge_only_is_evaluated_on_patients_with_lge():
    m = _model("lge-only")
    out = predict(m, DataLoader(Toy(12, lge_every=3), batch_size=5), torch.device("cpu"))
    assert len(out["labels"]) == 4 and sorted(out["index"].astype(int).tolist()) == [0, 3, 6, 9]


def test_train_epoch_reports_every_task():
    m = _model()
    res = train_epoch(m, DataLoader(Toy(8), batch_size=4), make_optimizer(m, TrainConfig()), torch.device("cpu"))
    assert {"loss", "cls", "align", "joint", "distill", "n", "seconds"} <= set(res) and res["n"] == 8
    assert copy.deepcopy(res) == res
