"""Tail averaging of the global model (server/tail_average.py): which rounds enter the mean, the
mean itself, and a resumed run continuing the same mean."""

import pytest
import torch

from ccmr_core.config import load_config
from ccmr_core.models import build_model
from ccmr_core.schedule import plan_for
from server.tail_average import TailAverage, first_averaged_round


def _cc_cmr():
    return build_model("cc-cmr", 5, 4, width=4, dim=16, proj=8)


def test_the_mean_covers_the_last_rounds_of_the_last_stage_only():
    assert first_averaged_round(load_config(), _cc_cmr()) is None  # default: the last round's model
    cfg = load_config(overrides=["federated.average_last=3"])
    assert first_averaged_round(cfg, _cc_cmr()) == cfg.federated.rounds - 2
    # more rounds than the student stage has: the student's first round, not the teacher's rounds
    long = load_config(overrides=["federated.average_last=100"])
    f = long.federated
    student_start = plan_for(_cc_cmr(), f.rounds * f.local_epochs, long.model.teacher_share,
                             unit=f.local_epochs).bounds()[-1][1] // f.local_epochs + 1
    assert 1 < first_averaged_round(long, _cc_cmr()) == student_start
    # a run that starts pretrained (DP fine-tuning) has one stage: every round may enter
    dp = load_config(overrides=["federated.average_last=100", "privacy.mode=sample", "model.alignment=slice"])
    assert first_averaged_round(dp, _cc_cmr()) == 1


def _state(v: float, flag: int) -> dict:
    return {"w": torch.full((2, 3), v), "calibration": torch.tensor(1.0), "steps": torch.tensor(flag)}


def test_floating_weights_are_averaged_and_the_others_are_the_latest():
    tail = TailAverage(first=4)
    for rnd, v in enumerate([10.0, 20.0, 30.0, 1.0, 2.0, 6.0], start=1):
        tail.add(rnd, _state(v, rnd))
    out = tail.result(_state(6.0, 6))
    assert torch.allclose(out["w"], torch.full((2, 3), 3.0))  # rounds 4-6: (1 + 2 + 6) / 3
    assert out["steps"].item() == 6 and out["calibration"].item() == 1.0
    assert tail.describe(6) == "final model: the mean of the global models of rounds 4-6 (federated.average_last)"
    off = TailAverage(first=None)
    off.add(1, _state(5.0, 1))
    latest = _state(7.0, 2)
    assert off.result(latest) is latest and off.snapshot() is None and off.describe(2) is None


def test_a_resumed_run_continues_the_same_mean():
    whole, first, resumed = TailAverage(2), TailAverage(2), TailAverage(2)
    for rnd, v in [(1, 9.0), (2, 1.0), (3, 2.0)]:
        whole.add(rnd, _state(v, rnd))
        first.add(rnd, _state(v, rnd))
    saved = torch.load(_roundtrip(first.snapshot()), weights_only=True)  # as the checkpoint stores it
    resumed.restore(saved)
    for tail in (whole, resumed):
        tail.add(4, _state(5.0, 4))
    assert torch.equal(whole.result({})["w"], resumed.result({})["w"])
    assert whole.result({})["w"][0, 0].item() == pytest.approx((1 + 2 + 5) / 3)


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
