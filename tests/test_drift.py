"""SCAFFOLD's drift correction at a site (ccmr_core/drift.py): the gradients it shifts, the control
variate it keeps, and what it refuses from a coordinator."""

import pytest
import torch
from torch import nn

from ccmr_core.drift import DriftCorrection


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _steps(model, hook, lr=0.1, k=4):
    """k plain-SGD steps on fixed random batches; returns the raw gradients of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    raw = []
    for _ in range(k):
        x, y = torch.randn(5, 4, generator=g), torch.randint(0, 2, (5,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if hook is not None:
            hook()
        opt.step()
    return raw


def test_without_control_variates_training_is_unchanged_and_c_i_is_the_mean_gradient():
    plain, hooked = _model(), _model()
    _steps(plain, None)
    hook = DriftCorrection(hooked)
    raw = _steps(hooked, hook)
    for (n, a), b in zip(plain.named_parameters(), hooked.parameters()):
        assert torch.equal(a, b), n
    new = hook.new_local()
    for n in new:
        assert torch.allclose(new[n], sum(r[n] for r in raw) / len(raw))
    assert hook.shift_norm() == 0.0


def test_the_shift_and_the_new_c_i_are_scaffolds_option_ii_under_sgd():
    """Every step moves by -lr (g + c - c_i); the site's next c_i equals SCAFFOLD's
    c_i - c + (x - y) / (K lr), and what it sends is that minus its old c_i."""
    lr, k = 0.05, 6
    model = _model()
    x0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    c = {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    ci = {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    hook = DriftCorrection(model, c, ci)
    _steps(model, hook, lr=lr, k=k)
    new, change = hook.new_local(), hook.change()
    for n, p in model.named_parameters():
        option_ii = ci[n] - c[n] + (x0[n] - p.detach()) / (k * lr)
        assert torch.allclose(new[n], option_ii, atol=1e-5), n
        assert torch.allclose(change[n], new[n] - ci[n])
    expected = torch.sqrt(sum(((c[n] - ci[n]) ** 2).sum() for n in c))
    assert hook.shift_norm() == pytest.approx(float(expected), rel=1e-5)


def test_a_frozen_parameter_is_not_shifted_and_keeps_its_c_i():
    model = _model()
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    old = {"0.weight": torch.full((3, 4), 0.5)}
    hook = DriftCorrection(model, {"0.weight": torch.ones(3, 4)}, old)
    _steps(model, hook)
    assert torch.equal(model[0].weight, before)
    assert torch.equal(hook.new_local()["0.weight"], old["0.weight"])
    assert "0.weight" not in hook.change() and "2.bias" in hook.change()


@pytest.mark.parametrize("bad, match", [
    ({"2.bias": torch.zeros(7)}, r"coordinator's control variate for '2\.bias' has shape \(7,\), the parameter \(2,\)"),
    ({"2.bias": torch.tensor([float("nan"), 0.0])}, r"'2\.bias' is not finite"),
])
def test_a_hostile_control_variate_is_refused_with_the_parameter_named(bad, match):
    with pytest.raises(ValueError, match=match):
        DriftCorrection(_model(), bad, None)


def test_a_sites_c_i_is_kept_per_run_and_a_damaged_one_starts_again(tmp_path, monkeypatch):
    """c_i stays at the site between rounds of one run (client/local.py): a later round reads the
    c_i kept after the site's last round (also across rounds it was not sampled in), the same round
    done again (a resumed coordinator) the c_i that round started from, and an earlier round none;
    another run does not read it, and a file that is not a kept c_i reads as none (SCAFFOLD's first
    round)."""
    from types import SimpleNamespace

    from client.local import control_path, keep_control, read_control

    monkeypatch.setenv("CCMR_CACHE", str(tmp_path))
    site = SimpleNamespace(name="site-a")
    c1 = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3)}
    c2 = {k: v + 1 for k, v in c1.items()}
    keep_control(site, "run-1", 1, c1, None)
    keep_control(site, "run-1", 2, c2, c1)

    def same(a, b):
        return a is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)

    assert same(read_control(site, "run-1", 3), c2) and same(read_control(site, "run-1", 5), c2)
    assert same(read_control(site, "run-1", 2), c1)  # round 2 again: what it started from
    assert read_control(site, "run-1", 1) is None
    assert read_control(site, "run-2", 3) is None
    control_path(site, "run-1").write_bytes(b"not a torch file")
    assert read_control(site, "run-1", 3) is None
    for other in ([1, 2, 3], dict(c1), {"round": "2", "c": c2}):  # readable, but not a kept c_i
        torch.save(other, control_path(site, "run-1"))
        assert read_control(site, "run-1", 3) is None
