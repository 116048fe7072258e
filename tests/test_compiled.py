"""train.compile: the compiled convolution stacks compute what the eager ones do, keep the state
dict, compile once for any batch size, and are refused where they cannot work."""

import shutil

import pytest
import torch

from ccmr_core.config import ConfigError, load_config
from ccmr_core.models import compiled
from ccmr_core.models.blocks import FrameEncoder

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
                                    reason="inductor needs a C++ compiler for CPU kernels")


@needs_compiler
def test_compiled_stack_matches_eager_in_values_gradients_and_state_dict():
    torch.manual_seed(0)
    eager = FrameEncoder(width=4)
    routed = FrameEncoder(width=4)
    routed.load_state_dict(eager.state_dict())
    assert compiled.compile_encoders(torch.nn.Sequential(routed), torch.device("cpu")) == 1
    torch._dynamo.utils.counters.clear()
    for b in (3, 2, 5):  # a smaller last batch, then a larger one: the batch dimension is dynamic
        x = torch.randn(b, 1, 4, 16, 16)
        ye, yc = eager(x), routed(x)
        assert yc.shape == ye.shape == (b, 16, 4, 2, 2)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
        for pe, pc in zip(eager.parameters(), routed.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=5e-3, atol=1e-4)  # float rounding, summed over batches
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert routed.state_dict().keys() == eager.state_dict().keys()


def test_without_a_compiler_the_error_names_the_setting(monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(compiled.CompileUnavailable, match=r"train\.compile.*C\+\+ compiler"):
        compiled.compile_encoders(FrameEncoder(width=4), torch.device("cpu"))


def test_patient_level_dp_refuses_compile():
    with pytest.raises(ConfigError, match=r"train\.compile cannot be combined with privacy\.mode 'sample'"):
        load_config(overrides=["train.compile=true", "privacy.mode=sample", "model.alignment=slice"])
    assert load_config(overrides=["train.compile=true", "privacy.mode=site"]).train.compile
