import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn

from ccmr_core.losses import measurement_loss, patient_alignment_loss, slice_alignment_loss
from ccmr_core.models import MODEL_NAMES, build_model
from ccmr_core.models.blocks import TaskWeighting, Temperature
from ccmr_core.models.registry import MODELS, model_inputs

S, T, H = 4, 6, 32
KW = dict(width=4, dim=32, proj=16, n_measurements=3)
# the models trained under patient-level DP-SGD (CMR-CLIP refuses it: in-batch negatives), and the
# diagnosing ones (CMR-CLIP has no diagnosis head; tests/test_cmr_clip.py covers it)
DP_MODELS = [n for n in MODEL_NAMES if getattr(MODELS[n], "patient_level_dp", True)]
CLASSIFIERS = [n for n in MODEL_NAMES if hasattr(MODELS[n], "head")]


def batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"cine": torch.rand(b, S, T, H, H, generator=g), "lge": torch.rand(b, S, H, H, generator=g),
            "bio": torch.randn(b, 4, 32, generator=g), "label": torch.arange(b) % 5,
            "has_lge": torch.tensor([True, False, True][:b]), "has_bio": torch.ones(b, dtype=torch.bool),
            "meas": torch.randn(b, 3, generator=g), "has_meas": torch.tensor([[True, True, False], [False] * 3,
                                                                                [True] * 3])[:b],
            "index": torch.arange(b)}


def stages(name):
    return [(s, build_model(name, 5, S, **KW)) for s in getattr(build_model(name, 5, S, **KW), "stages", ["train"])]


def test_the_config_schema_offers_exactly_the_registered_models():
    from ccmr_core.config import MODEL_NAMES as CONFIG_NAMES

    assert set(CONFIG_NAMES) == set(MODEL_NAMES)


def test_only_cmr_clip_is_exempt():
    assert set(MODEL_NAMES) - set(DP_MODELS) == {"cmr-clip"} == set(MODEL_NAMES) - set(CLASSIFIERS)


@pytest.mark.parametrize("name", DP_MODELS)
def test_opacus_accepts_every_model_as_is(name):
    m = build_model(name, 5, S, **KW)
    assert ModuleValidator.validate(m, strict=False) == []
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def channels_last(p):
    return p.stride(1) == 1  # (out, in, depth, height, width) stored with the input channels innermost


def kernels(m):
    return [p for p in m.parameters() if p.dim() == 5 and p.shape[2:].numel() > 1]  # 1x1x1: both layouts alike


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_convolution_kernels_are_channels_last_also_after_loading_a_default_layout_checkpoint(name):
    m = build_model(name, 5, S, **KW)
    assert kernels(m) and all(channels_last(p) for p in kernels(m))
    plain = {k: v.clone(memory_format=torch.contiguous_format) for k, v in m.state_dict().items()}
    assert not any(channels_last(v) for v in plain.values() if v.dim() == 5 and v.shape[2:].numel() > 1)
    other = build_model(name, 5, S, **KW)
    other.load_state_dict(plain)  # a checkpoint of an older release or another site's layout
    assert all(channels_last(p) for p in kernels(other))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_channels_last_computes_what_the_default_layout_computes(name):
    m = build_model(name, 5, S, **KW).eval()
    reference = build_model(name, 5, S, **KW)._apply(lambda t: t.clone(memory_format=torch.contiguous_format))
    reference.load_state_dict(m.state_dict())
    reference.eval()
    assert not any(channels_last(p) for p in kernels(reference))
    inputs = model_inputs(m, batch(), training=False)
    with torch.no_grad():
        torch.testing.assert_close(m.head(m.embed(**inputs)), reference.head(reference.embed(**inputs)),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_shapes_and_per_sample_losses_in_every_stage(name):
    for stage, m in stages(name):
        if hasattr(m, "set_stage"):
            m.set_stage(stage)
        b = batch()
        out = m(**model_inputs(m, b, training=True))
        total, parts = m.losses(out, b)
        assert total.shape == (3,) and torch.isfinite(total).all(), stage
        total.mean().backward()
        trainable = [p for p in m.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for p in trainable), stage
        with torch.no_grad():
            assert m.head(m.embed(**model_inputs(m, b, training=False))).shape == (3, 5)


def test_cc_cmr_inference_reads_cine_only():
    torch.manual_seed(0)
    m = build_model("cc-cmr", 5, S, **KW).eval()
    b1, b2 = batch(seed=1), batch(seed=1)
    b2["lge"] = torch.rand_like(b2["lge"]) * 5
    b2["has_lge"] = torch.tensor([False, False, False])
    i1, i2 = model_inputs(m, b1, training=False), model_inputs(m, b2, training=False)
    assert set(i1) == {"cine"}
    with torch.no_grad():
        assert torch.equal(m(**i1)["logits"], m(**i2)["logits"])
        assert torch.equal(m.head(m.embed(**i1)), m(**i1)["logits"])


def test_stages_freeze_the_other_half_and_the_student_starts_from_the_teacher_once():
    torch.manual_seed(0)
    m = build_model("cc-cmr", 5, S, **KW)
    assert m.stages == ("teacher", "student")
    m.set_stage("teacher")
    assert all(p.requires_grad for p in m.teacher.parameters())
    assert not any(p.requires_grad for p in list(m.cine.parameters()) + list(m.heads.parameters()))
    with torch.no_grad():
        for p in m.teacher.cine.parameters():
            p.add_(0.1)
    m.set_stage("student")
    assert float(m.student_ready) == 1.0
    for a, b in zip(m.cine.state_dict().values(), m.teacher.cine.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert all(p.requires_grad for p in m.cine.parameters())
    with torch.no_grad():  # the student moves on; entering the stage again must not reset it
        for p in m.cine.parameters():
            p.add_(1.0)
    m.set_stage("student")
    assert not torch.equal(next(m.cine.parameters()), next(m.teacher.cine.parameters()))
    # the flag as an aggregate brings it back (SecAgg+ quantisation: not exactly 1): still the student
    state = {**m.state_dict(), "student_ready": torch.tensor(0.99999)}
    fresh = build_model("cc-cmr", 5, S, **KW)
    fresh.load_state_dict(state)
    fresh.set_stage("student")
    assert torch.equal(next(fresh.cine.parameters()), next(m.cine.parameters()))
    with pytest.raises(ValueError, match="no stage"):
        m.set_stage("warmup")


def test_ablation_has_no_lge_path_at_all():
    m = build_model("cc-cmr", 5, S, **KW, use_lge=False)
    assert m.teacher is None and m.stages == ("student",)
    b = batch()
    out = m(**model_inputs(m, b, training=True))
    _, parts = m.losses(out, b)
    assert set(parts) == {"cls", "measure"}


def test_region_pool_adds_the_locations_maximum_to_their_mean_with_the_same_parameters():
    """CC-CMR's ``region_pool``: the same parameters either way (a state dict moves between them);
    with "mean+max" a slice's feature is its locations' mean plus their maximum (one akinetic
    segment is not averaged away), with "mean" their mean; an unknown value is refused by name."""
    from ccmr_core.config import ConfigError, load_config
    from ccmr_core.models.encoders import CineEncoder

    torch.manual_seed(0)
    mean, both = CineEncoder(S, 4, 32), CineEncoder(S, 4, 32, region_pool="mean+max")
    both.load_state_dict(mean.state_dict())
    assert [n for n, _ in mean.named_parameters()] == [n for n, _ in both.named_parameters()]
    maps = []
    for enc in (mean, both):
        enc.eval()
        enc.regions.register_forward_hook(lambda _m, _i, out: maps.append(out))
    x = torch.rand(2, S, T, H, H)
    with torch.no_grad():
        fm, fb = mean.slice_features(x), both.slice_features(x)
    r = maps[0]  # (B, C, S, h, w): the same map in both (same weights, same input)
    assert torch.equal(maps[0], maps[1]) and r.shape[-1] > 1
    assert torch.allclose(fm, r.mean((-1, -2)).transpose(1, 2))
    assert torch.allclose(fb, (r.mean((-1, -2)) + r.amax((-1, -2))).transpose(1, 2))
    m = build_model("cc-cmr", 5, S, **KW, region_pool="mean+max")
    assert m.cine.region_pool == m.teacher.cine.region_pool == "mean+max"
    with pytest.raises(ConfigError, match="region_pool"):
        load_config(overrides=["model.region_pool=max"])


def test_patients_without_lge_have_no_lge_terms():
    m = build_model("cc-cmr", 5, S, **KW)
    b = batch()
    for stage, keys in (("teacher", ("teacher_joint", "teacher_align")), ("student", ("distill", "align"))):
        m.set_stage(stage)
        _, parts = m.losses(m(**model_inputs(m, b, training=True)), b)
        for k in keys:
            assert float(parts[k][1]) == 0.0 and float(parts[k][0]) > 0.0, (stage, k)


def test_the_student_distils_only_where_the_diagnosis_is_known():
    """A hidden diagnosis (label-efficiency runs) must not come back as the teacher's pseudo-label:
    the patient keeps its LGE alignment but has no distillation term."""
    m = build_model("cc-cmr", 5, S, **KW)
    m.set_stage("student")
    b = {**batch(), "has_label": torch.tensor([True, True, False])}  # patients 0 and 2 have LGE
    _, parts = m.losses(m(**model_inputs(m, b, training=True)), b)
    assert float(parts["distill"][0]) > 0.0 and float(parts["distill"][2]) == 0.0
    assert float(parts["align"][2]) > 0.0


def test_measurement_terms_follow_what_each_report_states():
    pred = torch.zeros(3, 3)
    target = torch.tensor([[1.0, 2.0, 50.0], [9.0, 9.0, 9.0], [1.0, 0.0, 0.0]])
    present = torch.tensor([[True, True, False], [False] * 3, [True, False, False]])
    loss = measurement_loss(pred, target, present)
    assert float(loss[1]) == 0.0  # nothing reported
    assert float(loss[0]) == pytest.approx((0.5 + 1.5) / 2)  # smooth-L1 of 1 and 2; the 50 is not stated
    assert float(loss[2]) == pytest.approx(0.5)


def test_bank_alignment_uses_the_sites_other_patients_as_negatives():
    torch.manual_seed(0)
    m = build_model("cc-cmr", 5, S, **KW)
    m.set_stage("student")
    b = batch()
    m.prepare_epoch([b], torch.device("cpu"))
    assert m.bank.shape == (2, 16) and set(m.bank_row) == {0, 2}  # only patients with LGE
    _, parts = m.losses(m(**model_inputs(m, b, training=True)), b)
    assert float(parts["align"][1]) == 0.0 and float(parts["align"][0]) > 0.0
    assert "bank" not in m.state_dict() and "bank_row" not in m.state_dict()  # never leaves the site


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
    z = F.normalize(torch.randn(6, 16), dim=-1)
    has = torch.ones(6, dtype=torch.bool)
    matched = patient_alignment_loss(z, z, temp, has).mean()
    shuffled = patient_alignment_loss(z, z[torch.randperm(6)], temp, has).mean()
    assert matched < shuffled
    has[2] = False
    assert float(patient_alignment_loss(z, z, temp, has)[2]) == 0.0
    bank = F.normalize(torch.randn(10, 16), dim=-1)
    right = patient_alignment_loss(bank[:4], bank, temp, torch.ones(4, dtype=torch.bool), positives=torch.arange(4))
    wrong = patient_alignment_loss(bank[:4], bank, temp, torch.ones(4, dtype=torch.bool), positives=torch.arange(4) + 4)
    assert (right < wrong).all()
    zs = F.normalize(torch.randn(3, 5, 16), dim=-1)
    per = slice_alignment_loss(zs, zs, temp, torch.tensor([True, True, False]))
    assert per.shape == (3,) and float(per[2]) == 0.0
    other = zs.clone()
    other[1] = F.normalize(torch.randn(5, 16), dim=-1)
    changed = slice_alignment_loss(zs, other, temp, torch.tensor([True, True, False]))
    assert torch.equal(changed[0], per[0]) and not torch.equal(changed[1], per[1])  # per patient only
