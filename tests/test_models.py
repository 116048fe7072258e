import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from ccmr_core.losses import clip_loss, slice_alignment_loss
from ccmr_core.models import MODEL_NAMES, build_model
from ccmr_core.models.blocks import TaskWeighting, Temperature
from ccmr_core.models.registry import model_inputs

S, T, H = 4, 6, 32


def batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"cine": torch.rand(b, S, T, H, H, generator=g), "lge": torch.rand(b, S, H, H, generator=g),
            "bio": torch.randn(b, 4, 32, generator=g), "label": torch.arange(b) % 5,
            "has_lge": torch.tensor([True, False, True][:b]), "has_bio": torch.ones(b, dtype=torch.bool)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_opacus_accepts_every_model_as_is(name):
    m = build_model(name, 5, S, width=4, dim=32, proj=16)
    assert ModuleValidator.validate(m, strict=False) == []
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_and_per_sample_losses(name):
    m = build_model(name, 5, S, width=4, dim=32, proj=16)
    b = batch()
    out = m(**model_inputs(m, b, training=True))
    assert out["logits"].shape == (3, 5)
    total, parts = m.losses(out, b)
    assert total.shape == (3,) and torch.isfinite(total).all()
    total.mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_cc_cmr_inference_reads_cine_only():
    torch.manual_seed(0)
    m = build_model("cc-cmr", 5, S, width=4, dim=32, proj=16).eval()
    b1, b2 = batch(seed=1), batch(seed=1)
    b2["lge"] = torch.rand_like(b2["lge"]) * 5
    b2["has_lge"] = torch.tensor([False, False, False])
    i1, i2 = model_inputs(m, b1, training=False), model_inputs(m, b2, training=False)
    assert set(i1) == {"cine"}
    with torch.no_grad():
        assert torch.equal(m(**i1)["logits"], m(**i2)["logits"])
        assert torch.equal(m.head(m.embed(**i1)), m(**i1)["logits"])


def test_patients_without_lge_have_no_lge_terms():
    m = build_model("cc-cmr", 5, S, width=4, dim=32, proj=16)
    b = batch()
    _, parts = m.losses(m(**model_inputs(m, b, training=True)), b)
    for k in ("align", "joint", "distill"):
        assert float(parts[k][1]) == 0.0 and float(parts[k][0]) > 0.0


def test_task_weighting_learns_to_downweight_noisy_tasks():
    w = TaskWeighting(["easy", "noisy"])
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    for _ in range(200):
        losses = torch.stack([torch.full((8,), 0.1), torch.full((8,), 5.0)], -1)
        x = torch.stack([losses, torch.ones_like(losses)], -1)
        opt.zero_grad()
        w(x).mean().backward()
        opt.step()
    weights = w.weights()
    assert weights["easy"] > 5 * weights["noisy"]  # optimum exp(-s) = 1/L
    assert weights["noisy"] == pytest.approx(1 / 5.0, rel=0.1)


def test_masked_task_gives_no_gradient():
    w = TaskWeighting(["a", "b"])
    x = torch.stack([torch.full((4, 2), 2.0), torch.tensor([[1.0, 0.0]] * 4)], -1)  # L=2: d/ds != 0
    w(x).sum().backward()
    assert float(w.log_vars.grad[1]) == 0.0 and float(w.log_vars.grad[0]) != 0.0


def test_temperature_fixed_or_learnable():
    assert sum(p.numel() for p in Temperature(0.1, learnable=False).parameters()) == 0
    t = Temperature(0.1)
    assert float(t(torch.ones(1))) == pytest.approx(10.0)


def test_contrastive_losses_reward_matching_pairs():
    temp = Temperature(0.1, learnable=False)
    z = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    has = torch.ones(6, dtype=torch.bool)
    matched = clip_loss(z, z, temp, has).mean()
    shuffled = clip_loss(z, z[torch.randperm(6)], temp, has).mean()
    assert matched < shuffled
    has[2] = False
    assert float(clip_loss(z, z, temp, has)[2]) == 0.0
    zs = torch.nn.functional.normalize(torch.randn(3, 5, 16), dim=-1)
    per = slice_alignment_loss(zs, zs, temp, torch.tensor([True, True, False]))
    assert per.shape == (3,) and float(per[2]) == 0.0
    other = zs.clone()
    other[1] = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    changed = slice_alignment_loss(zs, other, temp, torch.tensor([True, True, False]))
    assert torch.equal(changed[0], per[0]) and not torch.equal(changed[1], per[1])  # per patient only
