import pytest
import torch

from ccmr_core.classes import DEFAULT_CLASSES
from ccmr_core.data.dataset import CacheDataset
from ccmr_core.data.ingest import ingest
from ccmr_core.data.transforms import (Compose, RandomAffine, RandomIntensity, RandomNoise, RandomSliceReverse,
                                       default_augmentation)

from .conftest import SMALL, labels_of


@pytest.fixture(scope="module")
def cache(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "site-a"
    ingest(cohort / "site-a", out, SMALL, progress=False, workers=1)
    return out


def test_items_have_the_contracted_shapes(cache, cohort):
    ds = CacheDataset(cache, DEFAULT_CLASSES)
    labels = labels_of(cohort / "site-a")
    assert len(ds) == len(labels) and sorted(ds.patient_ids) == sorted(labels)
    for i in range(len(ds)):
        item = ds[i]
        assert item["cine"].shape == (4, 8, 32, 32) and item["cine"].dtype == torch.float32
        assert 0.0 <= float(item["cine"].min()) and float(item["cine"].max()) <= 1.0
        assert item["lge"].shape == (4, 32, 32)
        if not item["has_lge"]:
            assert float(item["lge"].abs().sum()) == 0.0
        assert DEFAULT_CLASSES[int(item["label"])] == labels[ds.patient_ids[i]]
        assert item["has_bio"] and item["bio"].shape == (4, 32)
        assert abs(float(item["bio"].mean())) < 1e-3  # standardised per signal
        assert "patient_id" not in item


def test_lge_can_be_withheld(cache):
    ds = CacheDataset(cache, DEFAULT_CLASSES, load_lge=False)
    assert not any(bool(ds[i]["has_lge"]) for i in range(len(ds)))


def test_subset_by_patient(cache):
    full = CacheDataset(cache, DEFAULT_CLASSES)
    sub = CacheDataset(cache, DEFAULT_CLASSES, patient_ids=full.patient_ids[:2])
    assert sub.patient_ids == full.patient_ids[:2]


def test_wrong_class_list_is_refused(cache):
    with pytest.raises(ValueError, match="ingested with classes"):
        CacheDataset(cache, ["NOR", "DCM"])


def _sample():
    g = torch.Generator().manual_seed(0)
    return {"cine": torch.rand(4, 8, 32, 32, generator=g), "lge": torch.zeros(4, 32, 32),
            "has_lge": torch.tensor(False), "label": torch.tensor(2)}


def test_transforms_keep_shape_range_and_missing_lge():
    torch.manual_seed(0)
    s = _sample()
    out = default_augmentation()(s)
    assert out["cine"].shape == s["cine"].shape and out["label"] == 2
    assert 0 <= float(out["cine"].min()) and float(out["cine"].max()) <= 1
    assert float(out["lge"].abs().sum()) == 0.0  # an absent LGE stays absent


def test_affine_is_shared_by_cine_and_lge_and_is_small():
    torch.manual_seed(1)
    img = torch.zeros(32, 32)
    img[10:22, 12:20] = 1
    s = {"cine": img.expand(2, 3, 32, 32).clone(), "lge": img.expand(2, 32, 32).clone(), "has_lge": torch.tensor(True)}
    out = RandomAffine(p=1.0)(s)
    assert torch.allclose(out["cine"][0, 0], out["lge"][0], atol=1e-6)
    assert torch.allclose(out["cine"][1, 2], out["cine"][0, 0], atol=1e-6)
    overlap = (out["lge"][0] * img).sum() / img.sum()
    assert overlap > 0.5  # a small perturbation, not a different picture


def test_no_left_right_flip_or_time_reversal():
    torch.manual_seed(2)
    s = _sample()
    t = Compose([RandomIntensity(p=0.0), RandomNoise(p=0.0), RandomSliceReverse(p=1.0)])
    out = t(s)
    assert torch.equal(out["cine"], s["cine"].flip(0))  # slices reversed, frames and pixels untouched
