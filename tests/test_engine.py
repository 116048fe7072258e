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


@pytest.mark.parametrize("name", ["cine-only", "cc-cmr"])
def test_training_learns_patients_it_has_not_seen(name):
    dl = DataLoader(Toy(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    m = _model(name)
    if name == "cc-cmr":
        m.set_stage("student")
    opt = make_optimizer(m, TrainConfig(lr=3e-3))
    first = train_epoch(m, dl, opt, torch.device("cpu"))["loss"]
    for _ in range(12):
        last = train_epoch(m, dl, opt, torch.device("cpu"))["loss"]
    assert last < first * 0.5
    unseen = Toy(n=30, seed=1)  # other noise, other patients
    res = evaluate(m, DataLoader(unseen, batch_size=8), torch.device("cpu"), ["a", "b"])
    assert res["n"] == 30 and res["accuracy"] >= 0.9


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
    prox, _ = _one_round(0.3)
    assert not all(torch.equal(a, b) for a, b in zip(fedavg.parameters(), prox.parameters()))
    assert _dist(prox, g) < 0.8 * _dist(fedavg, g)  # pulled towards the global model
    held, g1 = _one_round(1.0)  # mu 1 removes all of the drift after every step
    assert _dist(held, g1) < 1e-6 and _dist(fedavg, g) > 1e-3
    with pytest.raises(ValueError, match="global parameters"):
        train_epoch(_model(), DataLoader(Toy(4), batch_size=4), make_optimizer(_model(), TrainConfig()),
                    torch.device("cpu"), prox_mu=1.0)


def test_mc_dropout_gives_epistemic_uncertainty():
    m = _model()
    dl = DataLoader(Toy(12), batch_size=4)
    det = predict(m, dl, torch.device("cpu"), mc_samples=0)
    assert np.all(det["uncertainty"] == 0) and det["probs"].shape == (12, 2)
    mc = predict(m, dl, torch.device("cpu"), mc_samples=8)
    # well above float noise for most patients (a pass that leaves dropout off gives ~1e-8)
    assert np.all(mc["uncertainty"] >= 0) and np.mean(mc["uncertainty"] > 1e-4) > 0.5
    # the deterministic logits are the dropout-free ones, and MC passes vary the probabilities
    assert np.allclose(mc["logits"], det["logits"], atol=1e-6)
    assert not np.allclose(mc["probs"], det["probs"], atol=1e-4)
    assert np.allclose(mc["probs"].sum(1), 1, atol=1e-5)
    assert m.training  # predict restores the mode it found


@pytest.mark.parametrize("augment", [False, True])
def test_seeded_mc_passes_do_not_depend_on_what_ran_before_and_leave_the_random_state(augment):
    """A site answers the coordinator's requests in whatever order they come: with a seed the MC
    passes (dropout masks, test-time views) are the same whatever the process drew before, and the
    process's random state after the call is what it was before it."""
    m = _model()
    dl = DataLoader(Toy(8), batch_size=4)
    runs = []
    for before in (0, 99):
        torch.manual_seed(before)
        state = torch.get_rng_state()
        runs.append(predict(m, dl, torch.device("cpu"), mc_samples=6, augment=augment, seed=7))
        assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(runs[0]["probs"], runs[1]["probs"])
    assert np.array_equal(runs[0]["uncertainty"], runs[1]["uncertainty"])
    other = predict(m, dl, torch.device("cpu"), mc_samples=6, augment=augment, seed=8)
    assert not np.allclose(other["probs"], runs[0]["probs"], atol=1e-6)
    torch.manual_seed(99)
    unseeded = predict(m, dl, torch.device("cpu"), mc_samples=6, augment=augment)  # the process's own draws
    assert not np.allclose(unseeded["probs"], runs[0]["probs"], atol=1e-6)


@pytest.mark.parametrize("name", ["cc-cmr", "cine-only"])
def test_test_time_augmentation_passes_read_augmented_cine_only(name):
    """Without dropout, plain MC passes agree exactly; augmented passes each read another view of
    the cine, so they disagree. The clean logits stay those of the study as it is, the draws repeat
    for a seed, and LGE on disk changes nothing (inference reads cine only)."""
    torch.manual_seed(0)
    m = build_model(name, 2, S, width=4, dim=16, proj=8, dropout=0.0)
    m.eval()
    dl = DataLoader(Toy(8, lge_every=1), batch_size=4)
    plain = predict(m, dl, torch.device("cpu"), mc_samples=6)
    torch.manual_seed(1)
    tta = predict(m, dl, torch.device("cpu"), mc_samples=6, augment=True)
    assert np.all(plain["uncertainty"] < 1e-6) and np.mean(tta["uncertainty"] > 1e-6) > 0.5
    assert not np.allclose(tta["probs"], plain["probs"], atol=1e-4)
    assert np.allclose(tta["logits"], plain["logits"], atol=1e-6) and np.allclose(tta["probs"].sum(1), 1, atol=1e-5)
    no_lge = Toy(8, lge_every=1)
    for item in no_lge.items:
        item.update(lge=torch.zeros_like(item["lge"]), has_lge=torch.tensor(False))
    torch.manual_seed(1)
    again = predict(m, DataLoader(no_lge, batch_size=4), torch.device("cpu"), mc_samples=6, augment=True)
    assert np.allclose(again["probs"], tta["probs"], atol=1e-6)
    one = predict(m, dl, torch.device("cpu"), mc_samples=1, augment=True)  # one pass: the study as it is
    assert np.allclose(one["probs"], predict(m, dl, torch.device("cpu"))["probs"], atol=1e-6)


def test_lge_only_is_evaluated_on_patients_with_lge():
    m = _model("lge-only")
    out = predict(m, DataLoader(Toy(12, lge_every=3), batch_size=5), torch.device("cpu"))
    assert len(out["labels"]) == 4 and sorted(out["index"].astype(int).tolist()) == [0, 3, 6, 9]


@pytest.mark.parametrize("stage,tasks", [("teacher", {"teacher_joint", "teacher_cls", "teacher_align"}),
                                         ("student", {"cls", "distill", "align"})])
def test_train_epoch_reports_every_task_of_the_stage(stage, tasks):
    m = _model()
    m.set_stage(stage)
    res = train_epoch(m, DataLoader(Toy(8), batch_size=4), make_optimizer(m, TrainConfig()), torch.device("cpu"))
    assert set(res) == tasks | {"loss", "n", "seconds"} and res["n"] == 8 and res["seconds"] > 0
    assert all(np.isfinite(res[t]) and res[t] > 0 for t in tasks)


def test_learning_rate_follows_the_schedule_within_an_epoch():
    m = _model("cine-only")
    opt = make_optimizer(m, TrainConfig(lr=0.01, fast_lr_factor=10))
    seen = []
    train_epoch(m, DataLoader(Toy(8), batch_size=2), opt, torch.device("cpu"),
                lr_at=lambda f: seen.append(f) or (1.0 - f))
    assert seen == [0.125, 0.375, 0.625, 0.875]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.125)


def test_a_site_continues_its_optimiser_only_from_its_previous_round_of_the_same_stage(tmp_path, monkeypatch):
    """Adam's moments carry over between consecutive rounds of one run at one site; anything else
    (a skipped round, a new stage, another run, a damaged file) starts a fresh optimiser."""
    from types import SimpleNamespace

    from client.local import keep_optimizer, optimizer_path, restore_optimizer

    monkeypatch.setenv("CCMR_CACHE", str(tmp_path))
    site = SimpleNamespace(name="site-a")
    net = torch.nn.Linear(3, 2)

    def stepped() -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        return opt

    opt = stepped()
    keep_optimizer(opt, site, "run-1", 3, "teacher")
    saved = opt.state_dict()["state"][0]["exp_avg_sq"]

    fresh = lambda: torch.optim.AdamW(net.parameters(), lr=1e-2)  # noqa: E731
    o = fresh()
    assert restore_optimizer(o, site, "run-1", 4, "teacher")
    assert torch.equal(o.state_dict()["state"][0]["exp_avg_sq"], saved)
    for rnd, stage, run in ((5, "teacher", "run-1"), (4, "student", "run-1"), (4, "teacher", "run-2")):
        o = fresh()
        assert not restore_optimizer(o, site, run, rnd, stage)
        assert o.state_dict()["state"] == {}
    optimizer_path(site, "run-1").write_bytes(b"not a torch file")
    assert not restore_optimizer(fresh(), site, "run-1", 4, "teacher")


class _Prior(torch.nn.Module):
    """Logits that are one learned bias: no evidence, only a prior (the shape the engine expects)."""

    name, inputs = "prior", ("cine",)

    def __init__(self, classes: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(classes))

    def forward(self, cine):
        return {"logits": self.bias.expand(cine.shape[0], -1)}

    def losses(self, out, batch):
        from ccmr_core.losses import diagnosis_loss

        ce, _ = diagnosis_loss(out["logits"], batch)
        return ce, {"cls": ce}


@pytest.mark.parametrize("adjusted", [False, True])
def test_logit_adjustment_leaves_a_sites_class_mix_out_of_the_logits(adjusted):
    """A site whose patients are 80% / 15% / 5% of three classes and whose images say nothing:
    trained plainly, the logits learn the site's prior; with the site's log prior added in the loss
    (``federated.logit_adjustment``), they learn none of it but what add-one smoothing leaves."""
    from ccmr_core.losses import class_log_prior

    labels = [0] * 32 + [1] * 6 + [2] * 2
    items = [{"cine": torch.zeros(1, 1, 2, 2), "label": torch.tensor(y), "index": torch.tensor(i)}
             for i, y in enumerate(labels)]
    prior = class_log_prior(labels, 3)
    assert torch.allclose(prior.exp(), torch.tensor([33, 7, 3]) / 43.0)  # add-one smoothed
    assert class_log_prior([0, 0], 3).isfinite().all()  # a class the site lacks: small, not -inf
    model = _Prior(3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        train_epoch(model, DataLoader(items, batch_size=40), opt, torch.device("cpu"),
                    class_log_prior=prior if adjusted else None)
    p = model.bias.detach().softmax(0)
    freq = torch.tensor([32, 6, 2]) / 40.0
    if adjusted:  # the optimum is freq / smoothed prior: all that add-one smoothing leaves
        left = freq / prior.exp()
        assert torch.allclose(p, left / left.sum(), atol=0.01), p
        assert p.max() / p.min() < 1.5  # the site's own mix: 16
    else:
        assert torch.allclose(p, freq, atol=0.01), p
