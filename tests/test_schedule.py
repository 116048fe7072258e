"""The run's plan: stages on round boundaries, one learning-rate curve, and who trains what."""

import pytest

from ccmr_core.config import load_config
from ccmr_core.models import build_model
from ccmr_core.schedule import Plan, finetune_part, finetunes_head, plan_for, starts_pretrained, train_only_heads


def test_stages_split_the_epochs_on_round_boundaries():
    p = Plan(epochs=45, stages=("teacher", "student"), first_share=0.5, unit=3)  # 15 rounds of 3 epochs
    assert p.bounds() == [("teacher", 0, 24), ("student", 24, 45)]  # 8 of 15 rounds, never mid-round
    assert [p.stage_at(e) for e in (0, 23, 24, 44)] == ["teacher", "teacher", "student", "student"]
    assert Plan(epochs=40, stages=("teacher", "student"), first_share=0.5).bounds()[0] == ("teacher", 0, 20)
    one_round = Plan(epochs=1, stages=("teacher", "student"))
    assert one_round.stage_at(0) == "teacher"  # nothing left for a second stage
    assert Plan(epochs=10).bounds() == [("train", 0, 10)]


def test_learning_rate_warms_up_then_decays_to_zero_across_stages():
    p = Plan(epochs=40, stages=("teacher", "student"), first_share=0.5, warmup=0.05)
    lr = [p.lr_factor(t) for t in (0.0, 1.0, 2.0, 10.0, 19.9, 20.1, 30.0, 40.0)]
    assert lr[0] < 0.05 and lr[1] < lr[2] == pytest.approx(1.0, abs=0.01)  # warm-up over 2 of 40 epochs
    assert lr[3] > lr[4] == pytest.approx(lr[5], abs=0.01)  # no restart at the stage boundary
    assert lr[6] < lr[5] and lr[7] == pytest.approx(0.0, abs=1e-6)


def test_a_pretrained_start_trains_only_the_last_stage():
    m = build_model("cc-cmr", 5, 4, width=4, dim=16, proj=8)
    assert plan_for(m, 30, 0.5).stages == ("teacher", "student")
    assert plan_for(m, 30, 0.5, pretrained=True).stages == ("student",)
    assert plan_for(build_model("cine-only", 5, 4, width=4, dim=16), 30, 0.5).stages == ("train",)


def test_who_starts_pretrained_and_who_trains_only_heads():
    assert not starts_pretrained(load_config())
    dp = load_config(overrides=["privacy.mode=sample"])
    assert starts_pretrained(dp) and finetunes_head(dp)  # auto: DP starts from public pretraining
    assert finetune_part(dp) == "head"  # ... and trains the heads
    assert finetune_part(load_config(overrides=["privacy.mode=sample", "privacy.finetune=classifier"])) == "classifier"
    assert finetune_part(load_config(overrides=["privacy.finetune=classifier"])) == "classifier"
    assert finetune_part(load_config(overrides=["privacy.finetune=bias"])) == "bias"
    assert not finetunes_head(load_config(overrides=["privacy.mode=sample", "privacy.finetune=all"]))
    assert not starts_pretrained(load_config(overrides=["privacy.mode=sample", "federated.pretrain=none"]))
    assert not finetunes_head(load_config(overrides=["privacy.mode=sample", "federated.pretrain=none"]))
    assert finetunes_head(load_config(overrides=["privacy.finetune=head"]))  # the no-DP comparison
    assert starts_pretrained(load_config(overrides=["federated.initial_model=/models/public.pt"]))


@pytest.mark.parametrize("name", ["cc-cmr", "cine-only", "dual-path", "lge-only"])
def test_train_only_heads_leaves_the_heads_and_loss_weights(name):
    m = build_model(name, 5, 4, width=4, dim=16, proj=8)
    if hasattr(m, "set_stage"):
        m.set_stage("student")
    train_only_heads(m)
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(m.head_modules) | {"weighting", "temperature"}
    assert any(n.split(".")[0] in m.head_modules for n, p in m.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["cc-cmr", "cine-only", "dual-path", "lge-only"])
def test_train_only_the_classifier_leaves_the_diagnostic_layer_alone(name):
    m = build_model(name, 5, 4, width=4, dim=16, proj=8, n_measurements=3)  # CC-CMR: a measurement head too
    if hasattr(m, "set_stage"):
        m.set_stage("student")
    train_only_heads(m, part="classifier")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    layer = "heads.cls" if name == "cc-cmr" else "cls"
    assert trainable == {f"{layer}.weight", f"{layer}.bias"}
    train_only_heads(m, part="bias")  # freezes further: the per-class biases alone
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {f"{layer}.bias"}
    with pytest.raises(ValueError, match="part must be 'head', 'classifier' or 'bias', got 'encoder'"):
        train_only_heads(m, part="encoder")
