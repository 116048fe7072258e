"""train.compile: the compiled encoders compute what the eager ones do, keep the state dict,
compile once for any batch size, and are refused where they cannot work."""

import shutil

import pytest
import torch

from ccmr_core.config import ConfigError, load_config
from ccmr_core.models import compiled
from ccmr_core.models.blocks import FrameEncoder
from ccmr_core.models.encoders import CineEncoder, LGEEncoder
from ccmr_core.models.registry import build_model

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
                                    reason="inductor needs a C++ compiler for CPU kernels")


ENCODERS = {  # the module, its input for a batch of b, its output's shape
    "frame stack": (lambda: FrameEncoder(width=4), lambda b: torch.randn(b, 1, 4, 16, 16), lambda b: (b, 16, 4, 2, 2)),
    "cine encoder": (lambda: CineEncoder(3, 4, 32, region_pool="mean+max"), lambda b: torch.randn(b, 3, 4, 32, 32),
                     lambda b: (b, 3, 16)),
    "LGE encoder": (lambda: LGEEncoder(3, 4, 32), lambda b: torch.randn(b, 3, 32, 32), lambda b: (b, 3, 16)),
}


@needs_compiler
@pytest.mark.parametrize("kind", ENCODERS)
def test_compiled_encoder_matches_eager_in_values_gradients_and_state_dict(kind):
    make, data, shape = ENCODERS[kind]
    torch.manual_seed(0)
    eager, routed = make(), make()
    routed.load_state_dict(eager.state_dict())
    assert compiled.compile_encoders(torch.nn.Sequential(routed), torch.device("cpu")) == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for b in (3, 2, 5):  # a smaller last batch, then a larger one: the batch dimension is dynamic
        x = data(b)
        ye, yc = eager(x), routed(x)
        ye, yc = (ye[0], yc[0]) if isinstance(ye, tuple) else (ye, yc)  # (slices, patient): the slices
        assert yc.shape == ye.shape == shape(b)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
        for (name, pe), pc in zip(eager.named_parameters(), routed.parameters()):
            # float rounding, summed over batches; a weight the output does not use has no gradient
            # either way (a zero would still move it under AdamW's weight decay)
            assert (pc.grad is None) == (pe.grad is None), name
            if pe.grad is not None:
                torch.testing.assert_close(pc.grad, pe.grad, rtol=5e-3, atol=1e-4, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert routed.state_dict().keys() == eager.state_dict().keys()


def test_the_outermost_encoders_are_compiled_not_also_their_stacks():
    """CC-CMR: the student's and the teacher's cine encoders and the LGE encoder whole; the
    CNN-LSTM baseline: only its convolution stack (its LSTM stays eager)."""
    names = lambda m: [n for n, u in m.named_modules() if u in compiled.compilable_units(m)]  # noqa: E731
    assert names(build_model("cc-cmr", 5, 3, width=4, dim=32)) == ["cine", "teacher.cine", "teacher.lge"]
    assert names(build_model("cine-only", 5, 3, width=4, dim=32)) == ["cine.frames"]


def test_without_a_compiler_the_error_names_the_setting(monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(compiled.CompileUnavailable, match=r"train\.compile.*C\+\+ compiler"):
        compiled.compile_encoders(FrameEncoder(width=4), torch.device("cpu"))


def test_patient_level_dp_refuses_compile():
    with pytest.raises(ConfigError, match=r"train\.compile cannot be combined with privacy\.mode 'sample'"):
        load_config(overrides=["train.compile=true", "privacy.mode=sample", "model.alignment=slice"])
    assert load_config(overrides=["train.compile=true", "privacy.mode=site"]).train.compile


@needs_compiler
def test_training_model_compiles_the_encoders_only_when_the_config_asks():
    """The one place central training, CMR-CLIP and the ClientApp build the model they train."""
    from ccmr_core.models.registry import model_kwargs, training_model

    for flag in (False, True):
        cfg = load_config(overrides=[f"train.compile={str(flag).lower()}", "model.width=4", "model.dim=32"])
        m = training_model(cfg, model_kwargs(cfg), torch.device("cpu"))
        assert [u.runner is not None for u in compiled.compilable_units(m)] == [flag] * 3
