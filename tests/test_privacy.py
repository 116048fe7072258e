"""Privacy properties: per-sample gradients are per-patient, one patient's change touches only
that patient's gradient, the coupling contrastive form is refused, and the budget is enforced."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import DataLoader

from ccmr_core.config import ConfigError, load_config
from ccmr_core.engine import make_optimizer, train_epoch
from ccmr_core.models import build_model
from ccmr_core.models.registry import model_inputs
from ccmr_core.privacy import BudgetExhausted, Ledger, PrivateTraining, strip_opacus_prefix

from .test_engine import Toy

S, T, H = 3, 4, 16


def _batch(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    return {"cine": torch.rand(b, S, T, H, H, generator=g), "lge": torch.rand(b, S, H, H, generator=g),
            "bio": torch.randn(b, 4, 32, generator=g), "label": torch.tensor([0, 1, 2, 1][:b]),
            "has_lge": torch.tensor([True, True, False, True][:b]), "has_bio": torch.ones(b, dtype=torch.bool),
            "meas": torch.randn(b, 2, generator=g), "has_meas": torch.tensor([[True, True], [True, False],
                                                                               [False, False], [True, True]])[:b],
            "index": torch.arange(b)}


def _trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


def _per_sample(model, batch):
    m = copy.deepcopy(model)
    gsm = GradSampleModule(m, batch_first=True, loss_reduction="sum")
    out = gsm(**model_inputs(m, batch, training=True))
    total, _ = m.losses(out, batch)
    total.sum().backward()
    n = len(batch["label"])
    return torch.stack([torch.cat([p.grad_sample[i].flatten() for p in _trainable(m)]) for i in range(n)])


def _single(model, batch, i):
    m = copy.deepcopy(model)
    one = {k: v[i : i + 1] for k, v in batch.items()}
    total, _ = m.losses(m(**model_inputs(m, one, training=True)), one)
    total.sum().backward()
    return torch.cat([p.grad.flatten() for p in _trainable(m)])


def _model(name, stage=None):
    torch.manual_seed(0)
    m = build_model(name, 5, S, width=4, dim=16, proj=8, dropout=0.0, alignment="slice", n_measurements=2)
    if stage is not None:
        m.set_stage(stage)
    return m


@pytest.mark.parametrize("name,stage", [("cc-cmr", "teacher"), ("cc-cmr", "student"), ("cine-only", None),
                                        ("dual-path", None), ("lge-only", None)])
def test_per_sample_gradients_are_per_patient(name, stage):
    model = _model(name, stage)
    b = _batch()
    ps = _per_sample(model, b)
    for i in range(len(b["label"])):
        brute = _single(model, b, i)
        assert _rel(ps[i], brute) < 1e-4, f"patient {i}"


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def _change_patient(b, i):
    b2 = {k: v.clone() for k, v in b.items()}
    b2["cine"][i] = torch.rand_like(b2["cine"][i])
    b2["lge"][i] = torch.rand_like(b2["lge"][i])
    return b2


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_changing_one_patient_changes_only_that_patients_gradient(stage):
    model = _model("cc-cmr", stage)
    b = _batch()
    g1, g2 = _per_sample(model, b), _per_sample(model, _change_patient(b, 3))
    for i in range(3):
        assert _rel(g1[i], g2[i]) < 1e-5, f"patient {i} changed"
    assert _rel(g1[3], g2[3]) > 1e-2


def test_contrastive_negatives_from_other_patients_couple_them_and_are_refused():
    torch.manual_seed(0)
    model = build_model("cc-cmr", 5, S, width=4, dim=16, proj=8, dropout=0.0, alignment="bank")
    model.set_stage("teacher")
    b = _batch()
    b["has_lge"][:] = True
    g1, g2 = _per_sample(model, b), _per_sample(model, _change_patient(b, 3))
    assert _rel(g1[0], g2[0]) > 1e-3  # another patient's gradient moved: Opacus' epsilon would be false
    with pytest.raises(ConfigError, match="negatives from other patients couple patients"):
        load_config(overrides=["privacy.mode=sample", "model.alignment=bank"])
    assert load_config(overrides=["privacy.mode=sample"]).alignment == "slice"  # auto picks the per-patient form
    assert load_config().alignment == "bank"


def _dp_cfg(**kw):
    o = ["privacy.mode=sample", "model.alignment=slice", "train.batch_size=4", "federated.rounds=3",
         "privacy.target_epsilon=5.0"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(preset="smoke", overrides=o)


def test_dp_round_trains_reports_epsilon_and_keeps_prox():
    torch.manual_seed(0)
    cfg = _dp_cfg()
    ds = Toy(16)
    eps = []
    final = {}
    for mu in (0.0, 0.3):
        torch.manual_seed(0)
        model = build_model("cc-cmr", 2, S, width=4, dim=16, proj=8, alignment="slice")
        g = [p.detach().clone() for p in model.parameters()]
        led = Ledger()
        dp = PrivateTraining(cfg, led, len(ds), noise_seed=0)  # the same noise with and without prox
        dp.check_budget()
        opt = make_optimizer(model, cfg.train)
        pm, popt, pdl = dp.wrap(model, opt, DataLoader(ds, batch_size=4))
        train_epoch(pm, pdl, popt, torch.device("cpu"), prox_mu=mu, global_params=g)
        eps.append(dp.finish())
        state = strip_opacus_prefix(pm.state_dict())
        assert not any(k.startswith("_module.") for k in state)
        final[mu] = float(sum(((p - q) ** 2).sum() for p, q in zip(pm._module.parameters(), g)))  # distance to global
    assert eps[0] > 0 and eps[0] == pytest.approx(eps[1])
    assert final[0.3] < 0.9 * final[0.0]  # the proximal step still acts under DP-SGD: pulled toward the global model


def _dp_epoch(cfg, noise_seed=None):
    """One DP-SGD epoch as a site trains it, after the round's seed from the run config (which the
    coordinator knows): the update and the patients each step sampled."""
    torch.manual_seed(1234)
    model = build_model("cine-only", 2, S, width=4, dim=16)
    start = [p.detach().clone() for p in model.parameters()]
    dp = PrivateTraining(cfg, Ledger(), 16, noise_seed=noise_seed)
    pm, popt, pdl = dp.wrap(model, make_optimizer(model, cfg.train), DataLoader(Toy(16), batch_size=4))
    torch.manual_seed(1234)
    sampled = [tuple(idx) for idx in pdl.batch_sampler]
    torch.manual_seed(1234)
    train_epoch(pm, pdl, popt, torch.device("cpu"))
    update = torch.cat([(p.detach() - s).flatten() for p, s in zip(pm._module.parameters(), start)])
    return update, sampled


def test_a_coordinator_that_knows_the_run_config_cannot_replay_the_noise_or_the_sample():
    """The coordinator sets train.seed and knows the site's index, so anything drawn from the global
    generator it seeds is replayable: noise it can subtract, a sample it can name. Two rounds
    identical in everything the coordinator knows must differ in both; with the same (test-only)
    noise seed they are identical, so the secret generators are the only difference."""
    cfg = _dp_cfg()
    (u1, s1), (u2, s2) = _dp_epoch(cfg), _dp_epoch(cfg)
    assert s1 != s2  # 4 Poisson steps over 16 patients: the same draw by chance has probability 2**-64
    assert (u1 - u2).norm() > 0.1 * u1.norm()
    (r1, t1), (r2, t2) = _dp_epoch(cfg, noise_seed=7), _dp_epoch(cfg, noise_seed=7)
    assert t1 == t2 and torch.equal(r1, r2)


def test_the_ledger_records_what_the_accountant_spent_in_a_real_round():
    cfg = _dp_cfg()
    torch.manual_seed(0)
    ds = Toy(18)
    model = build_model("cine-only", 2, S, width=4, dim=16)
    dp = PrivateTraining(cfg, Ledger(), len(ds))
    planned = dp.round_cost()
    pm, popt, pdl = dp.wrap(model, make_optimizer(model, cfg.train), DataLoader(ds, batch_size=4))
    for _ in range(cfg.federated.local_epochs):  # a round, as the ClientApp trains it
        train_epoch(pm, pdl, popt, torch.device("cpu"))
    eps = dp.finish()
    assert cfg.federated.local_epochs > 1 and dp.ledger.history == [planned]  # Opacus' own accountant: same noise, sample rate and steps as planned
    assert eps == pytest.approx(Ledger(history=[planned]).epsilon(cfg.privacy.delta))
    assert 0 < eps < cfg.privacy.target_epsilon


def test_ledger_persists_and_budget_declines():
    cfg = _dp_cfg()
    ledger = Ledger()
    spent = []
    for _ in range(3):
        dp = PrivateTraining(cfg, Ledger.from_json(ledger.to_json()), 16)
        dp.check_budget()
        dp.ledger.history.append(dp.round_cost())  # what a round's accountant records
        ledger = dp.ledger
        spent.append(ledger.epsilon(cfg.privacy.delta))
    assert spent[0] < spent[1] < spent[2] <= 5.0 + 1e-6
    assert spent[2] == pytest.approx(5.0, rel=0.05)  # the planned noise spends the budget over the run
    with pytest.raises(BudgetExhausted, match="declines to train"):
        PrivateTraining(cfg, ledger, 16).check_budget()


@pytest.mark.parametrize("name", ["cc-cmr", "cine-only", "dual-path", "lge-only"])
def test_empty_poisson_batch_first_and_later_still_steps(name):
    """Poisson sampling draws empty batches; a step must still run (noise, accountant), also
    when the very first batch of a round is empty."""
    torch.manual_seed(0)
    cfg = _dp_cfg(**{"train.batch_size": 2})
    model = build_model(name, 2, S, width=4, dim=16, proj=8, alignment="slice")
    dp = PrivateTraining(cfg, Ledger(), 8)
    pm, popt, pdl = dp.wrap(model, make_optimizer(model, cfg.train), DataLoader(Toy(8), batch_size=2))
    empty = pdl.collate_fn([])
    assert isinstance(empty, dict) and empty["cine"].shape == (0, S, T, H, H)
    full = pdl.collate_fn([Toy(8)[i] for i in range(3)])
    before = [p.detach().clone() for p in pm.parameters()]
    res = train_epoch(pm, [empty, full, empty], popt, torch.device("cpu"))
    assert res["n"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, pm.parameters()))
    assert dp.finish() > 0


def test_clip_update_bounds_the_update_keeps_its_direction_and_leaves_integers():
    from ccmr_core.privacy import clip_update

    g = torch.Generator().manual_seed(0)
    ref = {"w": torch.randn(10, 4, generator=g), "b": torch.randn(4, generator=g), "steps": torch.tensor(3)}
    state = {"w": ref["w"] + 2 * torch.randn(10, 4, generator=g), "b": ref["b"] + torch.randn(4, generator=g),
             "steps": torch.tensor(7)}
    delta = torch.cat([(state[k] - ref[k]).flatten() for k in ("w", "b")])
    out, norm = clip_update(state, ref, 1.5)
    assert norm == pytest.approx(float(delta.norm()), rel=1e-6) and norm > 1.5
    new = torch.cat([(out[k] - ref[k]).flatten() for k in ("w", "b")])
    assert float(new.norm()) == pytest.approx(1.5, rel=1e-5)
    assert float(torch.nn.functional.cosine_similarity(new, delta, dim=0)) == pytest.approx(1.0, abs=1e-6)
    assert int(out["steps"]) == 7 and out["w"].dtype == state["w"].dtype
    same, n2 = clip_update(state, ref, 10 * norm)  # inside the bound: unchanged
    assert all(torch.equal(same[k], state[k]) for k in state) and n2 == pytest.approx(norm)


def test_a_sites_lifetime_cap_holds_across_runs_whatever_the_coordinator_names_them(tmp_path, monkeypatch):
    """Issue 13: the ledger was per run key, so a coordinator could start a fresh budget by naming a
    new run. The site's cap (its own node config) is now checked against every run's ledger at the
    site, composed (RDP), at the site's own delta."""
    from types import SimpleNamespace

    from client.local import check_lifetime_budget, lifetime_ledger, write_ledger
    from client.policy import max_epsilon

    monkeypatch.setenv("CCMR_PRIVACY_DIR", str(tmp_path))
    site = SimpleNamespace(name="site-a")
    spent = Ledger(1.0, [(1.0, 0.2, 25)] * 4)  # four rounds of an earlier run
    write_ledger(site, "run-one", spent)
    e1 = spent.epsilon(1e-5)
    cost = (1.0, 0.2, 25)
    fresh = Ledger(1.0, [])
    # a new run starts at the site's lifetime spend, not at zero
    assert lifetime_ledger(site, "run-two", fresh).epsilon(1e-5) == pytest.approx(e1)
    check_lifetime_budget(site, "run-two", fresh, cost, None, 1e-5)  # no cap: the run's own target rules
    check_lifetime_budget(site, "run-two", fresh, cost, e1 * 3, 1e-5)  # room for another round
    with pytest.raises(BudgetExhausted, match="lifetime privacy budget.*cap"):
        check_lifetime_budget(site, "run-two", fresh, cost, e1 * 1.01, 1e-5)
    with pytest.raises(BudgetExhausted, match="lifetime"):  # any name the coordinator picks
        check_lifetime_budget(site, "another-name", fresh, cost, e1 * 1.01, 1e-5)
    # the run's own ledger is counted once (resume), and a damaged ledger stops training
    assert lifetime_ledger(site, "run-one", spent).epsilon(1e-5) == pytest.approx(e1)
    (tmp_path / "run-bad").mkdir()
    (tmp_path / "run-bad" / "site-a.json").write_text("{not json")
    with pytest.raises(BudgetExhausted, match="cannot be read"):
        check_lifetime_budget(site, "run-two", fresh, cost, 100.0, 1e-5)
    # the site's policy: a cap at its own delta, whatever delta the run asks for
    assert max_epsilon({"policy-max-epsilon": 3.0}) == (3.0, 1e-5) and max_epsilon({})[0] is None


def test_heads_only_fine_tuning_trains_and_accounts_with_its_own_batch():
    """privacy.finetune_batch_size applies where the sites train the heads only, and the noise is
    planned for that batch (the sample rate Opacus' accountant will record); full training and
    the coordinator's public pretraining keep train.batch_size."""
    from ccmr_core.privacy import plan_noise
    from ccmr_core.schedule import finetunes_head, site_batch_size, site_train_config

    heads = load_config(overrides=["privacy.mode=sample", "model.alignment=slice", "privacy.finetune_batch_size=32"])
    assert finetunes_head(heads) and site_batch_size(heads) == 32
    sigma, q, steps = plan_noise(heads, 64)
    assert (q, steps) == (0.5, 2)
    small = load_config(overrides=["privacy.mode=sample", "model.alignment=slice"])
    assert site_batch_size(small) == small.train.batch_size == 8
    assert plan_noise(small, 64)[1:] == (0.125, 8)
    assert sigma > plan_noise(small, 64)[0]  # fewer, larger steps: more noise per step for the same epsilon
    whole = load_config(overrides=["privacy.mode=sample", "model.alignment=slice", "privacy.finetune=all",
                                   "privacy.finetune_batch_size=32", "privacy.finetune_lr=0.05"])
    assert site_batch_size(whole) == 8
    # a federation's own batch for whole-model training at the sites (not for the heads)
    local = load_config(overrides=["privacy.mode=sample", "model.alignment=slice", "privacy.finetune=all",
                                   "federated.local_batch_size=2"])
    assert site_batch_size(local) == 2 and plan_noise(local, 64)[1:] == (1 / 32, 32)
    heads_local = load_config(overrides=["privacy.mode=sample", "model.alignment=slice", "federated.local_batch_size=2"])
    assert finetunes_head(heads_local) and site_batch_size(heads_local) == 8
    # the heads' own learning rate, likewise only where the sites train the heads
    assert site_train_config(whole).lr == whole.train.lr == 0.002
    fast = load_config(overrides=["privacy.mode=sample", "model.alignment=slice", "privacy.finetune_lr=0.05"])
    assert site_train_config(fast).lr == 0.05 and fast.train.lr == 0.002
