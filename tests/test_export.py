"""`ccmr export`: the exported cine-only model gives the PyTorch model's outputs and carries its
class list and preprocessing."""

import numpy as np
import pytest
import torch

from ccmr_core.cli import main
from ccmr_core.export import CineInference, export_model, load_exported
from ccmr_core.inference import Predictor


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_equals_pytorch_and_carries_its_metadata(trained_run, tmp_path, fmt):
    run, _ = trained_run
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.ts")
    export_model(run / "model.pt", fmt, out)
    fn, meta = load_exported(out)
    ref = Predictor(run / "model.pt", mc_samples=0)
    assert meta["classes"] == ref.classes
    assert meta["preprocessing"]["slices"] == 4 and meta["preprocessing"]["size"] == 32
    assert meta["input"]["shape"] == ["batch", 4, 8, 32, 32]
    assert meta["source_model"]["sha256"] == ref.identity["sha256"]
    net = CineInference(ref.model)
    for batch in (1, 3):  # the batch size is free
        x = np.random.default_rng(batch).random((batch, 4, 8, 32, 32), dtype=np.float32)
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        got = fn(x)
        assert got.shape == (batch, 5)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
        # and what `ccmr predict` says for each study (calibrated probabilities, dropout off)
        for i in range(batch):
            said = ref.predict(x[i])["probabilities"]
            np.testing.assert_allclose(got[i], [said[c] for c in ref.classes], atol=1e-5)


def test_export_refuses_to_overwrite_and_names_the_problem(trained_run, tmp_path, capsys):
    run, _ = trained_run
    out = tmp_path / "m.ts"
    assert main(["export", str(run / "model.pt"), "--format", "torchscript", "--out", str(out)]) == 0
    assert "NOR, MINF, DCM, HCM, ARV" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["export", str(run / "model.pt"), "--format", "torchscript", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
