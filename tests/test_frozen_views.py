"""Head fine-tuning on precomputed views (ccmr_core/frozen_views.py): the heads see exactly what
they would see through the frozen encoders, a patient's views come from that patient alone, the
views are kept only while the encoders stay the same, and DP-SGD trains the heads on them."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ccmr_core.config import validate
from ccmr_core.engine import make_optimizer, train_epoch
from ccmr_core.frozen_views import FrozenViews, frozen_parameters, same_frozen
from ccmr_core.models import build_model
from ccmr_core.models.registry import model_inputs
from ccmr_core.privacy import Ledger, PrivateTraining
from ccmr_core.schedule import set_stage, train_only_heads

S, T, H = 4, 6, 32
KW = dict(width=4, dim=32, proj=16, n_measurements=3, alignment="slice")
HEAD_MODELS = ["cc-cmr", "cine-only", "dual-path", "lge-only"]


class Toy(Dataset):
    """Patients with cine, LGE and report values; ``noise`` > 0 augments (torch's global RNG, as
    the project's transforms do)."""

    def __init__(self, n=6, seed=0, noise=0.05):
        g = torch.Generator().manual_seed(seed)
        self.items = [{"cine": torch.rand(S, T, H, H, generator=g), "lge": torch.rand(S, H, H, generator=g),
                       "bio": torch.randn(4, 32, generator=g), "has_lge": torch.tensor(i % 3 != 1),
                       "has_bio": torch.tensor(True), "label": torch.tensor(i % 5),
                       "meas": torch.randn(3, generator=g), "has_meas": torch.tensor([True, i % 2 == 0, True]),
                       "index": torch.tensor(i)} for i in range(n)]
        self.noise = noise

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = dict(self.items[i])
        if self.noise:
            item["cine"] = item["cine"] + self.noise * torch.randn_like(item["cine"])
            item["lge"] = item["lge"] + self.noise * torch.randn_like(item["lge"])
        return item


def heads_only(name, seed=0, part="head"):
    torch.manual_seed(seed)
    m = build_model(name, 5, S, **KW)
    set_stage(m, getattr(m, "stages", ("train",))[-1])  # CC-CMR: the student (copied from the teacher)
    train_only_heads(m, part=part)
    return m


@pytest.mark.parametrize("name", HEAD_MODELS)
def test_the_heads_see_what_the_frozen_encoders_would_give_them(name):
    m = heads_only(name).eval()  # no dropout: both paths are deterministic
    b = next(iter(DataLoader(Toy(noise=0), batch_size=6)))
    direct = m(**model_inputs(m, b, training=True))
    views = FrozenViews(m, Toy(noise=0), views=1, device=torch.device("cpu"))
    vb = next(iter(DataLoader(views, batch_size=6)))
    assert not any(k in vb for k in ("cine", "lge", "bio"))  # the images are not kept
    assert torch.equal(vb["label"], b["label"]) and torch.equal(vb["has_meas"], b["has_meas"])
    via = m(**model_inputs(m, vb, training=True))
    assert set(via) == set(direct)
    for k in direct:
        assert torch.allclose(via[k], direct[k], atol=1e-5), k
    total, _ = m.losses(via, vb)
    assert torch.allclose(total, m.losses(direct, b)[0], atol=1e-5)


def test_views_are_distinct_augmentations_fixed_by_the_seed_and_one_patient_changes_only_its_own():
    m = heads_only("cc-cmr")
    dev = torch.device("cpu")
    a = FrozenViews(m, Toy(seed=0), views=3, device=dev, seed=7)
    again = FrozenViews(m, Toy(seed=0), views=3, device=dev, seed=7)
    assert a.outputs["fc"].shape[:2] == (6, 3) and a.outputs["zl"].shape[:2] == (6, 3)
    assert torch.equal(a.outputs["fc"], again.outputs["fc"])
    assert not torch.allclose(a.outputs["fc"][:, 0], a.outputs["fc"][:, 1])  # another augmentation
    # patient 2 replaced by another one: every other patient's views are bitwise the same
    other = Toy(seed=0)
    other.items[2] = Toy(seed=99).items[2]
    b = FrozenViews(m, other, views=3, device=dev, seed=7)
    changed = [(a.outputs[k] != b.outputs[k]).flatten(1).any(1) for k in a.outputs]
    rows = torch.stack(changed).any(0)
    assert rows.tolist() == [False, False, True, False, False, False]
    # each item draws one of its patient's views
    item = a[4]
    assert any(torch.equal(item["frozen_fc"], a.outputs["fc"][4, v]) for v in range(3))


def test_views_are_kept_only_while_the_frozen_weights_stay_the_same():
    m = heads_only("cc-cmr")
    kept = frozen_parameters(m)
    assert not any(k.startswith("heads.") for k in kept) and "student_ready" in kept
    assert "calibration" not in kept  # applied after the heads: a new temperature keeps the views
    # what averaging identical weights does to them (the last bit) keeps the views
    rounded = {k: (v.float() * (1 / 3) + v.float() * (2 / 3)).to(v.dtype) for k, v in kept.items()}
    assert same_frozen(kept, rounded)
    with torch.no_grad():
        m.cine.proj[0].weight.add_(1e-3)
    assert not same_frozen(kept, frozen_parameters(m))
    with torch.no_grad():
        m.heads.cls.weight.add_(1.0)  # the heads are what trains: the views do not depend on them
        m.cine.proj[0].weight.sub_(1e-3)
    assert same_frozen(kept, frozen_parameters(m))


@pytest.mark.parametrize("part,per_step", [("head", 1), ("classifier", 1), ("head", 2)])
def test_dp_sgd_trains_only_the_heads_on_the_views(part, per_step):
    cfg = validate({"train": {"batch_size": 3, "lr": 0.05}, "model": {"alignment": "slice"},
                    "privacy": {"mode": "sample", "target_epsilon": 50.0}}, "test")
    m = heads_only("cc-cmr", part=part)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    views = FrozenViews(m, Toy(), views=2, device=torch.device("cpu"), per_step=per_step)
    loader = DataLoader(views, batch_size=3, shuffle=True)
    opt = make_optimizer(m, cfg.train)
    dp = PrivateTraining(cfg, Ledger(), len(views))
    pm, opt, loader = dp.wrap(m, opt, loader)
    for _ in range(3):
        train_epoch(pm, loader, opt, torch.device("cpu"))
    assert 0 < dp.finish() <= 50.0
    after = m.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    if part == "classifier":  # the diagnostic layer alone: nothing else shares its clipped gradients
        assert moved == {"heads.cls.weight", "heads.cls.bias"}
    else:
        assert any(k.startswith("heads.") for k in moved)
        assert {k.split(".")[0] for k in moved} <= {"heads", "weighting", "temperature"}


def test_a_model_without_frozen_outputs_is_refused_by_name():
    with pytest.raises(ValueError, match="'cmr-clip' cannot train its heads on precomputed views"):
        FrozenViews(build_model("cmr-clip", 5, S, width=4, dim=32, proj=16), Toy(), 1, torch.device("cpu"))


def test_bank_alignment_takes_its_negatives_from_the_views():
    """Without DP, CC-CMR's student aligns against a bank of the site's LGE embeddings: with views
    the bank is the teacher's embedding carried by each patient's view."""
    torch.manual_seed(0)
    m = build_model("cc-cmr", 5, S, **{**KW, "alignment": "bank"})
    set_stage(m, "student")
    train_only_heads(m)
    views = FrozenViews(m, Toy(), views=1, device=torch.device("cpu"))
    cfg = validate({"train": {"batch_size": 3}}, "test")
    res = train_epoch(m, DataLoader(views, batch_size=3), make_optimizer(m, cfg.train), torch.device("cpu"))
    with_lge = [i for i in range(6) if i % 3 != 1]
    assert sorted(m.bank_row) == with_lge and res["align"] > 0
    assert torch.allclose(m.bank[m.bank_row[3]], views.outputs["zl"][3, 0])


def test_the_encoders_top_can_train_on_the_views_but_not_what_makes_them():
    """privacy.finetune_top: CC-CMR's slice pooling and projection read the slice features, so they
    train on the views too; a trainable layer inside the frozen part is refused (stale views)."""
    torch.manual_seed(0)
    m = build_model("cc-cmr", 5, S, **KW)
    set_stage(m, "student")
    train_only_heads(m, top=True)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad}
    assert {"cine.proj", "cine.slices", "heads.cls"} <= trainable and "cine.frames" not in trainable
    views = FrozenViews(m, Toy(), views=2, device=torch.device("cpu"))
    before = m.cine.proj[0].weight.clone()
    cfg = validate({"train": {"batch_size": 3, "lr": 0.05}}, "test")
    train_epoch(m, DataLoader(views, batch_size=3), make_optimizer(m, cfg.train), torch.device("cpu"))
    assert not torch.equal(before, m.cine.proj[0].weight)
    m.cine.frames.requires_grad_(True)
    with pytest.raises(ValueError, match=r"outputs \['fc'\] depend on trainable weights"):
        FrozenViews(m, Toy(), views=1, device=torch.device("cpu"))


def test_augmentation_multiplicity_clips_the_mean_of_a_patients_views():
    """privacy.finetune_multiplicity: the per-patient gradient Opacus clips is the mean of that
    patient's views' gradients (one record per patient, whatever the number of views), and it
    depends on that patient's views alone."""
    from opacus import GradSampleModule
    from torch.utils.data import default_collate

    from ccmr_core.engine import _losses

    m = heads_only("cc-cmr")
    views = FrozenViews(m, Toy(), views=3, device=torch.device("cpu"), per_step=3)  # every view: order-free mean
    for mod in m.modules():  # no dropout: the two computations see the same heads (Opacus needs train mode)
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    trained = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    expected = []  # (patient, parameter) -> mean over views of that view's gradient, by hand
    for i in range(4):
        grads = []
        for v in range(3):
            item = {k: t[i] for k, t in views.meta.items()}
            item.update({"frozen_" + k: t[i, v] for k, t in views.outputs.items()})
            b = default_collate([item])
            m.zero_grad()
            total, _ = m.losses(m(**model_inputs(m, b, training=True)), b)
            total.sum().backward()
            grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for _, p in trained])
        # the views differ enough that one view's gradient is not their mean
        assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads[0], grads[1]))
        expected.append([torch.stack(g).mean(0) for g in zip(*grads)])
    batch = default_collate([views[i] for i in range(4)])
    assert batch["frozen_fc"].shape[:2] == (4, 3)
    gm = GradSampleModule(m)
    total, parts = _losses(gm, batch)
    assert total.shape == (4,) and parts["cls"].shape == (4,)
    total.mean().backward()
    for j, (name, p) in enumerate(trained):
        assert p.grad_sample.shape[0] == 4, name  # one gradient per patient, not per view
        for i in range(4):
            assert torch.allclose(p.grad_sample[i], expected[i][j], atol=1e-5), (name, i)
    gm._close()


def test_multiplicity_needs_that_many_views():
    from ccmr_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="finetune_multiplicity 4 is more than privacy.finetune_views 2"):
        load_config(overrides=["privacy.finetune_views=2", "privacy.finetune_multiplicity=4"])
    with pytest.raises(ValueError, match="per_step must be between 1 and views"):
        FrozenViews(heads_only("cine-only"), Toy(), views=2, device=torch.device("cpu"), per_step=3)
