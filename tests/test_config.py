import pytest

from ccmr_core.config import ConfigError, available_presets, dump_config, load_config


def test_defaults_load_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg.data.classes == ("NOR", "MINF", "DCM", "HCM", "ARV")
    assert cfg.data.synth.patients == 231
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_preset_overrides_defaults():
    assert "smoke" in available_presets()
    cfg = load_config(preset="smoke")
    assert cfg.data.ingest.size == 32 and cfg.data.synth.patients == 24


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text("data:\n  ingest:\n    sizee: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "data.ingest.sizee" in msg and "spacing_mm" in msg


def test_wrong_type_is_not_coerced(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  ingest:\n    frames: '16'\n")
    with pytest.raises(ConfigError, match=r"data\.ingest\.frames.*valid integer"):
        load_config(p)


def test_exponent_numbers_are_numbers_as_people_write_them(tmp_path):
    # PyYAML alone reads "1e-4" (no dot) as text, and the number field would refuse it
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 5e-4\nprivacy:\n  delta: 1E-6\n")
    cfg = load_config(p, overrides=["train.weight_decay=1e-2"])
    assert (cfg.train.lr, cfg.privacy.delta, cfg.train.weight_decay) == (5e-4, 1e-6, 1e-2)
    with pytest.raises(ConfigError, match=r"train\.lr.*valid number"):
        load_config(overrides=["train.lr=1e"])  # still not a number: refused, named


def test_test_time_augmentation_without_mc_passes_is_refused():
    with pytest.raises(ConfigError, match=r"model\.test_time_augmentation needs model\.mc_samples of at least 2 \(it is 0\)"):
        load_config(overrides=["model.test_time_augmentation=true", "model.mc_samples=0"])
    assert load_config(overrides=["model.test_time_augmentation=true"]).model.mc_samples == 20


def test_logit_adjustment_under_patient_level_dp_is_refused():
    """The site's class frequencies would shape every patient's loss without privacy accounting."""
    with pytest.raises(ConfigError, match=r"federated\.logit_adjustment cannot be combined with privacy\.mode 'sample'"):
        load_config(overrides=["federated.logit_adjustment=true", "privacy.mode=sample"])
    for mode in ("none", "site"):
        assert load_config(overrides=["federated.logit_adjustment=true", f"privacy.mode={mode}"]).federated.logit_adjustment


def test_out_of_range_names_the_bound():
    with pytest.raises(ConfigError, match=r"override.*data\.ingest\.size.*greater than or equal to 16"):
        load_config(overrides=["data.ingest.size=8"])


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="available presets: .*smoke"):
        load_config(preset="nope")


def test_bad_yaml_and_bad_override(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(overrides=["data.ingest.size"])


def test_duplicate_classes_rejected():
    with pytest.raises(ConfigError, match="unique"):
        load_config(overrides=["data.classes=[NOR, NOR]"])


def test_a_config_travels_as_content_and_a_site_opens_no_path_it_is_sent(tmp_path):
    """Issue 13: `ccmr-server run --config` handed the coordinator's file path to the sites (it only
    worked where both share a file system) and a site opened whatever path it was sent."""
    import tomli
    from flwr.common.config import parse_config_args

    from ccmr_core.config import from_run_config
    from server.cli import _typed

    text = 'train:\n  lr: 0.003  # "quoted" comment\nmodel: {name: cine-only}\n'
    (tmp_path / "study.yaml").write_text(text)
    by_path = from_run_config({"config": str(tmp_path / "study.yaml")})
    by_content = from_run_config({"config-yaml": text}, allow_paths=False)
    assert by_path == by_content and by_content.model.name == "cine-only"
    with pytest.raises(ConfigError, match="opens no path"):
        from_run_config({"config": str(tmp_path / "study.yaml")}, allow_paths=False)
    with pytest.raises(ConfigError, match="not both"):
        from_run_config({"config": str(tmp_path / "study.yaml"), "config-yaml": text})
    with pytest.raises(ConfigError, match="config-yaml.*unknown key"):
        from_run_config({"config-yaml": "trian: {lr: 1}\n"})
    # what `ccmr-server run` writes for Flower: the content (quotes, newlines) comes back intact
    import tomli_w

    rc = {"config-yaml": text, "num-server-rounds": _typed("2"), "fraction-evaluate": _typed("0.0"),
          "secure-aggregation": _typed("true"), "preset": _typed("'smoke'")}
    (tmp_path / "rc.toml").write_text(tomli_w.dumps(rc))
    assert parse_config_args([str(tmp_path / "rc.toml")]) == {**rc, "preset": "smoke"}
    assert tomli.loads(tomli_w.dumps(rc))["secure-aggregation"] is True


def test_the_config_names_exactly_the_models_the_registry_builds():
    """Model names live in the registry (each model class) and in the config's schema; they must agree."""
    from typing import get_args

    from ccmr_core.config import ModelName
    from ccmr_core.models.registry import MODEL_NAMES

    assert sorted(get_args(ModelName)) == sorted(MODEL_NAMES)
