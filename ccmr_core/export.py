"""``ccmr export``: a cine-only inference model for use outside this project.

The exported graph takes cine prepared as in training (float32, shape (B, S, T, H, W), values in
[0, 1], resampled in patient space: the grid is in the embedded metadata) and returns class
probabilities (B, C). Dropout is off, so the output is the deterministic prediction; epistemic
uncertainty needs MC-dropout passes and stays with ``ccmr predict``. The class list, the
preprocessing parameters, the referral confidence threshold and the source model's identity
travel inside the file: TorchScript as the extra file ``ccmr.json``, ONNX as the metadata entry
``ccmr``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ccmr_core.files import atomic_path, sha256_file
from ccmr_core.inference import Predictor

FORMATS = ("torchscript", "onnx")
METADATA_KEY = "ccmr"


class CineInference(nn.Module):
    """cine (B, S, T, H, W) -> class probabilities (B, C), through the model's cine path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, cine: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model.head(self.model.embed(cine)) / self.model.calibration, dim=-1)


def metadata(pred: Predictor) -> dict:
    g = pred.ingest
    refer = pred.thresholds or {}
    return {
        "format": 1,
        "classes": pred.classes,
        "input": {"name": "cine", "dtype": "float32", "shape": ["batch", g.slices, g.frames, g.size, g.size],
                  "axes": "patient, short-axis slice (base to apex), cardiac phase (from the R wave), row, column",
                  "range": [0.0, 1.0]},
        "output": {"name": "probabilities", "shape": ["batch", len(pred.classes)]},
        "preprocessing": {"slices": g.slices, "frames": g.frames, "size": g.size, "spacing_mm": g.spacing_mm,
                          "intensity_percentiles": list(g.intensity_percentiles),
                          "how": "cine short-axis stack ordered along the slice normal, frames by trigger time, "
                                 "resampled onto a size x size grid of spacing_mm centred on the heart, slices "
                                 "evenly from base to apex, frames evenly over one cycle; each series' "
                                 "intensities mapped from the given percentiles to [0, 1] "
                                 "(ccmr_core/data/resample.py)"},
        "refer_below_confidence": refer.get("confidence"),
        "source_model": pred.identity,
    }


def export_model(model_path: str | Path, fmt: str, out: str | Path, force: bool = False) -> dict:
    """Write the inference model to ``out``; returns its metadata."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {out.parent} does not exist")
    pred = Predictor(model_path, mc_samples=0)
    meta = metadata(pred)
    net = CineInference(pred.model)
    g = pred.ingest
    example = torch.rand(2, g.slices, g.frames, g.size, g.size)
    text = json.dumps(meta, indent=1)
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(net, example, check_trace=False)
        with atomic_path(out) as p:
            torch.jit.save(traced, str(p), _extra_files={"ccmr.json": text})
    else:
        import onnx

        with atomic_path(out) as p, torch.no_grad():
            torch.onnx.export(net, (example,), str(p), input_names=["cine"], output_names=["probabilities"],
                              dynamic_shapes={"cine": {0: torch.export.Dim("batch", min=1, max=4096)}},
                              dynamo=True, external_data=False, verbose=False)
            m = onnx.load(str(p))
            m.metadata_props.add(key=METADATA_KEY, value=text)
            m.doc_string = "CC-CMR cine-only inference: cine (B,S,T,H,W) in [0,1] -> class probabilities"
            onnx.save(m, str(p))
    meta["sha256"] = sha256_file(out)
    return meta


def load_exported(path: str | Path):
    """(callable on a float32 numpy array -> probabilities, metadata): how a user runs the file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":  # TorchScript is a zip archive
        extra = {"ccmr.json": ""}
        m = torch.jit.load(str(path), _extra_files=extra)
        return (lambda x: m(torch.from_numpy(x)).detach().numpy()), json.loads(extra["ccmr.json"])
    import onnx
    import onnxruntime as ort

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda x: sess.run(["probabilities"], {"cine": x})[0]), json.loads(meta[METADATA_KEY])
