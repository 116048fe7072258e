import math
import pytest
import torch

from ccmr_core.classes import DEFAULT_CLASSES
from ccmr_core.data.dataset import CacheDataset
from ccmr_core.data.ingest import ingest
from ccmr_core.data.transforms import (RandomBiasField, RandomCavityMuscle, RandomGeometry, default_augmentation,
                                       inference_augmentation)

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
        assert item["lge"].shape == (4, 32, 32) and item["has_lge"]  # every site-a patient here has LGE
        assert float(item["lge"].abs().sum()) > 0
        assert DEFAULT_CLASSES[int(item["label"])] == labels[ds.patient_ids[i]]
        assert item["has_bio"] and item["bio"].shape == (4, 32)
        assert abs(float(item["bio"].mean())) < 1e-3  # standardised per signal
        assert "patient_id" not in item


def test_a_study_read_again_comes_from_memory_unchanged_by_what_used_it(cache):
    from ccmr_core.data.study_memory import STUDIES

    ds = CacheDataset(cache, DEFAULT_CLASSES)
    first = ds[0]
    first["cine"].mul_(0.0)  # a transform changing its item in place must not change the next epoch's
    hits = STUDIES.hits
    again = ds[0]
    assert STUDIES.hits == hits + 1
    assert float(again["cine"].abs().sum()) > 0
    STUDIES.clear()
    fresh = ds[0]
    assert torch.equal(again["cine"], fresh["cine"]) and torch.equal(again["lge"], fresh["lge"])


def test_study_memory_stays_within_its_budget_and_rereads_a_rewritten_study(tmp_path):
    import numpy as np

    from ccmr_core.data.study_memory import StudyMemory

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"s{i}.npz")
        np.savez_compressed(paths[-1], cine=np.full((10, 10), i, np.float16))  # 200 bytes each
    mem = StudyMemory(budget_bytes=450)
    for p in paths:
        mem.arrays(p)
    assert mem.bytes <= 450 and len(mem._items) == 2  # the two most recently used
    assert mem.arrays(paths[3])["cine"][0, 0] == 3 and mem.hits == 1
    assert not mem.arrays(paths[3])["cine"].flags.writeable
    np.savez_compressed(paths[3], cine=np.full((10, 11), 7, np.float16))  # re-ingested: new size
    assert mem.arrays(paths[3])["cine"].shape == (10, 11)
    assert StudyMemory(budget_bytes=100).arrays(paths[0])["cine"].shape == (10, 10)  # too big to keep: still read


def test_lge_can_be_withheld(cache):
    ds = CacheDataset(cache, DEFAULT_CLASSES, load_lge=False)
    assert not any(bool(ds[i]["has_lge"]) for i in range(len(ds)))
    # a patient without LGE gets a zero volume of the contracted shape, never another patient's
    assert all(ds[i]["lge"].shape == (4, 32, 32) and float(ds[i]["lge"].abs().sum()) == 0 for i in range(len(ds)))


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


def _disc(r=8.0, n=64):
    yy, xx = torch.meshgrid(torch.arange(n) - (n - 1) / 2, torch.arange(n) - (n - 1) / 2, indexing="ij")
    return (torch.hypot(yy, xx) - r).neg().add(0.5).clamp(0, 1)


def test_geometry_is_shared_by_cine_and_lge_and_keeps_areas():
    """Shape changes, size does not: the grid is in millimetres and cavity area defines classes."""
    for seed in range(6):
        torch.manual_seed(seed)
        img = _disc()
        s = {"cine": img.expand(2, 3, 64, 64).clone(), "lge": img.expand(2, 64, 64).clone(),
             "has_lge": torch.tensor(True)}
        out = RandomGeometry(p=1.0, elastic_px=0.0)(s)
        assert torch.allclose(out["cine"][0, 0], out["lge"][0], atol=1e-6)  # one transform for every key
        assert torch.allclose(out["cine"][1, 2], out["cine"][0, 0], atol=1e-6)  # and every slice and frame
        assert float(out["cine"][0, 0].sum()) == pytest.approx(float(img.sum()), rel=0.03)
        assert not torch.allclose(out["cine"][0, 0], img, atol=0.1)  # it did change the shape or place
        elastic = RandomGeometry(p=1.0)(s)["cine"][0, 0]
        assert float(elastic.sum()) == pytest.approx(float(img.sum()), rel=0.1)


def test_no_flip_slice_reversal_or_time_reversal():
    """Slices stay base to apex and frame 0 stays end-diastole, the largest cavity of the cycle: a
    sample whose cavity shrinks from base to apex and contracts and relaxes over the cycle keeps both
    orders through the whole training augmentation (cavity muscle, geometry, intensity)."""
    torch.manual_seed(2)
    x = torch.zeros(4, 8, 64, 64)
    for k in range(4):
        for t in range(8):
            x[k, t] = _disc(16 - 3 * k - 2 * math.sin(math.pi * t / 8))
    s = {"cine": x, "lge": torch.zeros(4, 64, 64), "has_lge": torch.tensor(False)}
    for _ in range(20):
        sizes = default_augmentation()(s)["cine"].sum((-1, -2))  # (slices, frames)
        assert (sizes[:-1] > sizes[1:]).all()  # base to apex
        assert (sizes[:, :1] > sizes[:, 1:]).all()  # frame 0 is still end-diastole


def test_inference_augmentation_adds_no_cavity_muscle():
    """Test-time views vary pose, contrast and noise but add no dark discs to the blood pool (the
    training augmentation does, in about half of its draws): the cavity's centre stays uniformly
    bright in every view."""
    img = _disc(16.0)
    s = {"cine": img.expand(4, 8, 64, 64).clone(), "lge": torch.zeros(4, 64, 64), "has_lge": torch.tensor(False)}
    yy, xx = torch.meshgrid(torch.arange(64) - 31.5, torch.arange(64) - 31.5, indexing="ij")
    centre = torch.hypot(yy, xx) < 8

    def dark(aug) -> list[int]:  # per draw: centre pixels far darker than the centre's median
        out = []
        for seed in range(30):
            torch.manual_seed(seed)
            c = aug(s)["cine"][..., centre]  # (S, T, pixels)
            out.append(int((c < 0.6 * c.median()).sum()))
        return out

    assert max(dark(inference_augmentation())) == 0
    assert sum(d > 0 for d in dark(default_augmentation())) >= 5  # what the test would catch
    assert "lge" not in {k for t in inference_augmentation().transforms for k in getattr(t, "keys", ())}


def test_cavity_muscle_darkens_small_discs_near_the_centre_of_cine_only():
    """The discs sit within ``spread`` + their radius of the image centre, on a run of adjacent
    slices, are largest mid-cycle, and leave LGE and everything else untouched."""
    for seed in range(8):
        torch.manual_seed(seed)
        s = {"cine": torch.ones(8, 16, 64, 64), "lge": torch.ones(8, 64, 64), "has_lge": torch.tensor(True)}
        out = RandomCavityMuscle(p=1.0, spread=6.0, radius_px=(1.0, 2.0))(s)
        changed = out["cine"] < 1 - 1e-6  # (S, T, H, W)
        assert torch.equal(out["lge"], s["lge"])
        assert changed.any() and float(out["cine"].min()) >= 0.15 - 1e-6
        yy, xx = torch.nonzero(changed.any(0).any(0), as_tuple=True)
        assert float(torch.hypot(yy - 31.5, xx - 31.5).max()) <= 6.0 + 2.0 * 1.35 + 1.0
        one = RandomCavityMuscle(p=1.0, count=(1, 1))(s)["cine"] < 1 - 1e-6
        slices = torch.nonzero(one.flatten(1).any(1)).flatten()
        assert int(slices.max() - slices.min()) + 1 == len(slices)  # one disc: a run of adjacent slices
        area = changed.sum((-1, -2)).amax(0)  # (T,) per frame, over slices
        assert area[8] >= area[0]  # a contracting muscle is thickest mid-cycle


def test_bias_field_changes_intensity_smoothly_within_range():
    torch.manual_seed(3)
    s = {"cine": torch.full((2, 3, 32, 32), 0.5), "lge": torch.zeros(2, 32, 32), "has_lge": torch.tensor(False)}
    out = RandomBiasField(strength=0.6, p=1.0)(s)["cine"]
    assert 0 <= float(out.min()) and float(out.max()) <= 1 and float(out.std()) > 0.005
    assert float((out[..., 1:] - out[..., :-1]).abs().max()) < 0.1  # smooth: no edges made up (an edge here is 0.2+)

