"""One typed, validated configuration schema, loaded from YAML.

Every section is a frozen pydantic model with ``extra="forbid"`` and strict types, so an unknown
key, a wrong type or an out-of-range value fails with a :class:`ConfigError` that names the file,
the dotted key and what is allowed.

Layering: built-in defaults < ``configs/default.yaml`` < ``configs/presets/<name>.yaml`` < a user
file < ``key.path=value`` overrides. Every layer is validated with its own file name in errors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ccmr_core.classes import DEFAULT_CLASSES


class ConfigError(ValueError):
    """A configuration file or override is invalid. The message says where and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class IngestConfig(_Section):
    """How a site's DICOM becomes fixed-size arrays in the cache."""

    slices: int = Field(8, ge=1, le=32, description="short-axis slices after resampling (base to apex)")
    frames: int = Field(16, ge=2, le=64, description="cine frames per cardiac cycle after resampling")
    size: int = Field(64, ge=16, le=512, description="in-plane matrix (size x size) of the crop")
    spacing_mm: float = Field(2.5, gt=0.3, le=10.0, description="in-plane pixel spacing of the crop")
    intensity_percentiles: tuple[float, float] = Field(
        (1.0, 99.5), description="per-series intensity window mapped to [0, 1]"
    )
    min_slices: int = Field(3, ge=1, le=32, description="fewer distinct cine slice positions is an error")
    min_frames: int = Field(8, ge=2, le=256, description="fewer cine frames per slice is an error")
    workers: int = Field(0, ge=0, le=64, description="decode processes (0 = one per CPU core)")

    @field_validator("intensity_percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError("must be two percentiles with 0 <= low < high <= 100")
        return v


class SynthConfig(_Section):
    """The bundled synthetic multi-site cohort."""

    sites: int = Field(3, ge=1, le=32)
    patients: int = Field(231, ge=1, le=100_000)
    seed: int = Field(0, ge=0)


class DataConfig(_Section):
    classes: tuple[str, ...] = Field(DEFAULT_CLASSES, min_length=2)
    ingest: IngestConfig = IngestConfig()
    synth: SynthConfig = SynthConfig()

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v


class ModelConfig(_Section):
    name: Literal["cc-cmr", "cine-only", "dual-path", "lge-only"] = "cc-cmr"
    width: int = Field(8, ge=2, le=256, description="channels of the first block (doubles per block)")
    dim: int = Field(128, ge=8, le=4096, description="feature size of each encoder")
    proj: int = Field(64, ge=4, le=1024, description="contrastive projection size")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="head dropout (also drives MC-dropout uncertainty)")
    alignment: Literal["batch", "slice"] = Field(
        "batch", description="contrastive negatives: other patients in the batch, or the patient's own slices "
        "(the per-patient form required with DP-SGD)")
    temperature: float = Field(0.07, gt=0.0, le=10.0)
    learn_temperature: bool = True
    mc_samples: int = Field(20, ge=0, le=1000, description="MC-dropout passes for epistemic uncertainty")
    bio_length: int = Field(32, ge=4, le=1024, description="biomechanics samples per cycle (dual-path)")


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(8, ge=1, le=4096)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    patience: int = Field(8, ge=1, le=10_000, description="epochs without validation improvement before stopping")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    augment: bool = True
    seed: int = Field(0, ge=0)
    threads: int = Field(0, ge=0, le=512, description="torch CPU threads (0 = all cores)")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ExperimentConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------
# loading


def configs_dir() -> Path:
    """The folder with default.yaml and presets/ (repo checkout, Flower app bundle or wheel)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here / "_configs"):
        if (cand / "default.yaml").is_file():
            return cand
    raise ConfigError(f"cannot find configs/default.yaml next to {here}; is the install complete?")


def available_presets() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "presets").glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = ExperimentConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        where = ".".join(str(p) for p in loc[:-1]) or "top level"
        return f"unknown key '{key}'; allowed keys in {where}: {allowed}"
    got = err.get("input")
    return f"key '{key}': {err['msg']} (got {got!r})"


def validate(data: dict[str, Any], source: str) -> ExperimentConfig:
    """Validate a merged mapping; errors name ``source`` (a file or 'override')."""
    try:
        # JSON mode: YAML lists may fill tuples and ints may fill floats, but "3" is not an int.
        return ExperimentConfig.model_validate_json(json.dumps(data))
    except (TypeError, ValueError) as e:
        if not isinstance(e, ValidationError):
            raise ConfigError(f"{source}: values must be plain YAML scalars, lists and mappings ({e})") from None
        lines = [_describe(err) for err in e.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def parse_override(text: str) -> dict[str, Any]:
    """``train.lr=0.01`` -> ``{"train": {"lr": 0.01}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, for example data.ingest.size=64")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for p in reversed(parts):
        value = {p: value}
    return value


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ExperimentConfig:
    """Defaults, then the preset, then ``path``, then overrides; each layer validated."""
    merged: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    default = configs_dir() / "default.yaml"
    layers.append((str(default), _read_yaml(default)))
    if preset and preset != "default":
        p = configs_dir() / "presets" / f"{preset}.yaml"
        if not p.is_file():
            raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(available_presets())}")
        layers.append((str(p), _read_yaml(p)))
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    for o in overrides:
        layers.append((f"override {o!r}", parse_override(o)))
    for source, data in layers:
        merged = _deep_merge(merged, data)
        validate(merged, source)
    return validate(merged, layers[-1][0])


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run folder's config.yaml holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "IngestConfig",
    "ModelConfig",
    "TrainConfig",
    "SynthConfig",
    "available_presets",
    "dump_config",
    "load_config",
    "parse_override",
    "validate",
]
