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
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ccmr_core.classes import DEFAULT_CLASSES
from ccmr_core.measurements import DEFAULT_MEASUREMENTS, check_names


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

    sites: int = Field(3, ge=1, le=1000)
    patients: int = Field(231, ge=1, le=100_000)
    seed: int = Field(0, ge=0)


class DataConfig(_Section):
    classes: tuple[str, ...] = Field(DEFAULT_CLASSES, min_length=2)
    measurements: tuple[str, ...] = Field(
        DEFAULT_MEASUREMENTS, description="report measurements (labels.csv columns) learnt as auxiliary "
        "targets where a site has them; [] = none")
    ingest: IngestConfig = IngestConfig()
    synth: SynthConfig = SynthConfig()
    report_column: str = Field("report", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="cmr-clip: the "
                               "reports.csv column it learns from (the synthetic cohort also has "
                               "report_without_diagnosis, whose impression leaves the diagnosis word out)")

    @field_validator("measurements")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("measurement names must be unique")
        return check_names(v)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v


ModelName = Literal["cc-cmr", "cine-only", "dual-path", "lge-only", "cmr-clip"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)


class ModelConfig(_Section):
    name: ModelName = "cc-cmr"
    width: int = Field(8, ge=2, le=256, description="channels of the first block (doubles per block)")
    dim: int = Field(128, ge=8, le=4096, description="feature size of each encoder")
    proj: int = Field(64, ge=4, le=1024, description="contrastive projection size")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="head dropout (also drives MC-dropout uncertainty)")
    alignment: Literal["auto", "bank", "slice"] = Field(
        "auto", description="CC-CMR contrastive negatives: other patients (in the batch while the teacher learns, "
        "then a bank of the site's patients), the patient's own slices (the per-patient form DP-SGD requires), or "
        "auto: slice under patient-level DP, else bank")
    region_pool: Literal["mean", "mean+max"] = Field(
        "mean+max", description="CC-CMR: how the cine encoder summarises a slice's locations (its wall segments): "
        "their mean, or mean plus maximum, so that one abnormal region is not averaged away")
    text_negation: bool = Field(False, description="CMR-CLIP: the text encoder learns one vector for the words a "
                                "negation covers ('No late gadolinium enhancement', 'DE: none'; NegEx rules, "
                                "ccmr_core/models/text.py), so that 'no X' is not read as X (off by default, set on "
                                "three seeds; a fourth showed zero-shot LGE +8 points: BENCHMARKS CMR-CLIP negation "
                                "block)")
    text_pool: Literal["mean", "attention"] = Field(
        "mean", description="CMR-CLIP: how the text encoder makes one vector of a report: the mean over its byte "
        "groups (as CMR-CLIP pools its BERT), or one learned query attending over them (attentional pooling; "
        "measured worse: zero-shot LGE +4 points, wall motion -17, probes lower: BENCHMARKS cmrclip-attn)")
    report_measurements: bool = Field(
        False, description="CMR-CLIP: the study encoder also estimates the report's measurements (data.measurements, "
        "labels.csv columns: EF, volumes, wall thickness), a second per-patient loss beside the contrastive one; "
        "still no diagnosis label (off by default: over three seeds zero-shot LGE +6 points, the few-shot and linear "
        "probes lower: BENCHMARKS cmrclip-measurements)")
    use_lge: bool = Field(True, description="CC-CMR: learn from LGE during training (false: the same cine model "
                          "with every LGE term off, the ablation)")
    teacher_share: float = Field(0.5, gt=0.0, lt=1.0, description="CC-CMR: share of the epochs (rounds) spent "
                                 "training the cine+LGE teacher before the cine student")
    temperature: float = Field(0.1, gt=0.0, le=10.0)
    learn_temperature: bool | None = Field(
        None, description="learn the contrastive temperature from model.temperature on (CLIP's logit scale); unset: "
        "the model's own default (CC-CMR learns it, CMR-CLIP keeps it fixed: learnt, it moved from 0.1 to about 0.09 and "
        "zero-shot LGE fell 2.8 points over four seeds, BENCHMARKS cmrclip-learnt)")
    mc_samples: int = Field(20, ge=0, le=1000, description="MC-dropout passes for epistemic uncertainty")
    test_time_augmentation: bool = Field(False, description="each MC-dropout pass reads its own random training "
                                         "augmentation of the cine: probabilities are the mean and the uncertainty "
                                         "the mutual information over augmented passes (needs mc_samples > 1)")
    refer_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="most validation patients the referral "
                                  "rule sends to a human: half for low confidence, half for high uncertainty")
    bio_length: int = Field(32, ge=4, le=1024, description="biomechanics samples per cycle (dual-path)")

    @model_validator(mode="after")
    def _augmentation_needs_passes(self) -> "ModelConfig":
        if self.test_time_augmentation and self.mc_samples < 2:
            raise ValueError(f"model.test_time_augmentation needs model.mc_samples of at least 2 (it is "
                             f"{self.mc_samples}): each augmented view is one MC pass; raise mc_samples or switch "
                             "test_time_augmentation off")
        return self


class TrainConfig(_Section):
    epochs: int = Field(40, ge=1, le=10_000, description="central training: epochs of the schedule (warm-up, then "
                        "cosine to zero); the model at its end is kept")
    batch_size: int = Field(8, ge=1, le=4096)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.05, ge=0.0, le=1.0)
    fast_lr_factor: float = Field(10.0, gt=0.0, le=1e4, description="learning-rate multiple for the learned task "
                                  "weights and contrastive temperature")
    label_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the training patients whose "
                                  "diagnosis training may use (label-efficiency experiments: the others still "
                                  "contribute images, LGE and report measurements)")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    augment: bool = True
    sentence_sampling: float = Field(0.0, ge=0.0, le=1.0, description="cmr-clip, with augment: the chance that a "
                                     "training item's report is replaced by one of its sentences, drawn at random "
                                     "(ConVIRT's text augmentation); 0 = whole reports only")
    keep_model: Literal["last", "best-validation"] = Field(
        "last", description="cmr-clip, central training: the model kept, the last epoch's (the end of the schedule) "
        "or the epoch's whose validation contrastive loss (the validation patients' studies and reports as one "
        "gallery) is lowest; every epoch's validation loss is logged either way. Other models keep the last. "
        "Measured worse than the last (BENCHMARKS.md, cmrclip-bestval): the validation loss rises late, while "
        "retrieval still improves")
    seed: int = Field(0, ge=0, description="training randomness (initialisation, batches, augmentation)")
    split_seed: int = Field(0, ge=0, description="which patients are train / validation / test; fixed while "
                            "the training seed varies, so that runs are compared on the same patients")
    threads: int = Field(0, ge=0, le=512, description="torch CPU threads (0 = all cores)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(False, description="compile the image encoders with torch.compile (needs a C++ "
                          "compiler on CPU): faster training steps after one to two minutes of "
                          "compilation per process (BENCHMARKS.md, throughput block); not with privacy.mode "
                          "'sample' (Opacus' per-patient hooks)")


class FederatedConfig(_Section):
    rounds: int = Field(15, ge=1, le=100_000)
    strategy: Literal["fedprox", "fedavg"] = "fedprox"
    proximal_mu: float = Field(0.01, ge=0.0, le=1.0, description="FedProx: share of a weight's drift from the "
                               "global model removed per local step at the peak learning rate (0 = FedAvg)")
    server_momentum: float = Field(0.0, ge=0.0, lt=1.0, description="FedAvgM (Flower's): the coordinator keeps a "
                                   "momentum of the averaged updates (0 = plain average)")
    server_lr: float = Field(1.0, gt=0.0, le=10.0, description="FedAvgM: the coordinator's step along the "
                             "(momentum of the) averaged update; 1 with momentum 0 = plain average")
    local_epochs: int = Field(3, ge=1, le=1000)
    local_batch_size: int = Field(0, ge=0, le=100_000, description="the batch a site trains the whole model with "
                                  "in a federation (under patient-level DP: the expected batch of Poisson sampling); "
                                  "0 = train.batch_size. A site holds a fraction of the pooled patients, so a smaller "
                                  "batch gives it more optimiser steps per epoch (BENCHMARKS.md, federated recipe); "
                                  "heads-only fine-tuning uses privacy.finetune_batch_size")
    logit_adjustment: bool = Field(False, description="each site adds the log of its own training patients' "
                                   "class frequencies to the logits in its diagnosis loss (FedLC-style logit "
                                   "adjustment for sites with different class mixes; the prior stays at the site); "
                                   "the model then predicts as if the classes were equally common. Not with "
                                   "privacy.mode 'sample' (the prior is not privatised)")
    drift_correction: Literal["none", "scaffold"] = Field(
        "none", description="'scaffold': SCAFFOLD's control variates (Karimireddy et al. 2020; ccmr_core/drift.py): "
        "each site shifts its local gradients by (the federation's mean gradient - its own), both estimated in the "
        "previous round, so that non-IID sites drift less apart; the coordinator sends its control variate with "
        "the model and each site returns the change of its own (one more model-sized array each way). Not with "
        "privacy, secure aggregation, a robust aggregator or FedAvgM")
    keep_optimizer: bool = Field(True, description="each site continues its own optimiser state (AdamW moments) "
                                 "from round to round, kept at the site, instead of restarting it every round")
    average_last: int = Field(0, ge=0, le=100_000, description="the run ends with the mean of the global models "
                              "of its last this many rounds (of its last stage) instead of the last round's: tail "
                              "averaging, post-processing at the coordinator (no privacy cost); 0 = the last round's")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    evaluate_every: int = Field(1, ge=1, le=100_000, description="the sites validate the global model every this "
                                "many rounds (and after the last); a round without it is one message phase, not two")
    validate_in: Literal["evaluate-phase", "train-reply"] = Field(
        "evaluate-phase", description="how the sites validate each round's global model: in an evaluate message "
        "phase after training ('evaluate-phase'), or before training on it in the next round, sent with the update "
        "('train-reply': one message phase per round; the last round's model still gets a phase of its own)")
    min_sites: int = Field(1, ge=1, le=10_000, description="sites that must reply before a round closes")
    validation_patients: int = Field(45, ge=0, le=100_000,
                                     description="coordinator-held synthetic validation set (0 = none)")
    round_timeout_s: float = Field(3600.0, gt=0.0)
    max_update_ratio: float = Field(10.0, ge=1.0, le=1e9, description="reject a site's update whose norm exceeds "
                                    "this multiple of the median of the other sites' update norms")
    max_site_weight: int = Field(1000, ge=1, le=10**9, description="most training patients one site's update may "
                                 "weigh in the mean; a reply claiming more (or more than max_update_ratio x the "
                                 "median of the others') is rejected")
    aggregator: Literal["mean", "median", "trimmed-mean"] = Field(
        "mean", description="mean (weighted FedAvg/FedProx), or coordinate-wise median / trimmed mean (robust)")
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed-mean: share cut at each end")
    round_retries: int = Field(2, ge=0, le=100, description="a train round with fewer than min_sites replies "
                               "(after round_timeout_s) is sent again up to this many times before the run stops")
    pretrain: Literal["auto", "none", "public"] = Field(
        "auto", description="where the global model starts: 'public' = the coordinator first trains it on a public "
        "cohort (simulation: a synthetic one with scanners of its own, kept apart from every site), at no privacy "
        "cost; 'auto' = public when the sites train with patient-level DP, else none")
    initial_model: str = Field("", description="a model.pt the coordinator supplies (e.g. trained on public ACDC / "
                               "M&Ms data) to start from; read at the coordinator, never sent as a path")
    public_generator: Literal["project", "external"] = Field(
        "project", description="which phantom draws the simulated public cohort: 'project' = the sites' own "
        "generator with scanners of its own (close to the sites: it flatters DP fine-tuning), 'external' = the "
        "external site's anatomy model, contrast and protocols (a public cohort that differs from the sites, as "
        "ACDC / M&Ms differ from a hospital's patients)")
    public_patients: int = Field(150, ge=10, le=100_000, description="size of the simulated public cohort")
    public_epochs: int = Field(40, ge=1, le=10_000, description="epochs of the coordinator's public pretraining "
                               "(as central training: at 25 a third of the pretrainings came out mediocre, BENCHMARKS)")
    public_min_accuracy: float = Field(
        0.8, ge=0.0, le=1.0, description="accuracy on the public cohort's own validation patients that the public "
        "model must reach before any site trains from it (a pretraining seed can fail: 0.62 where others reach "
        "0.86-1.0); below it the coordinator trains again with another seed (public_attempts), and stops with an "
        "error if no attempt reaches it. 0 accepts any model. With 21 validation patients (150 public ones) it "
        "catches a failed pretraining, not a mediocre one (a retrained seed passed at 0.81 and scored 0.69 on the "
        "sites: BENCHMARKS, project-phantom DP block); a larger public cohort makes it stricter")
    public_attempts: int = Field(3, ge=1, le=20, description="pretraining seeds the coordinator tries on the same "
                                 "public cohort before giving up on federated.public_min_accuracy")


class SecureAggregationConfig(_Section):
    """SecAgg+ (Flower's protocol): the coordinator sees only the weighted sum of the sites' updates."""

    enabled: bool = False
    clipping_range: float = Field(0.5, gt=0.0, le=1e3, description="each coordinate of a site's weighted "
                                  "update (weight / max_weight x (local - global)) is clipped to +-this before "
                                  "quantisation; sites report how many were clipped")
    max_weight: int = Field(1000, ge=1, le=10**6, description="largest weight (training patients) one site may "
                            "carry; a site above it refuses the round")
    quantization_bits: int = Field(24, ge=8, le=28, description="quantisation levels 2**bits over the clipping range (the sum of all sites must stay below 2**32)")
    reconstruction_fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of a round's sites whose "
                                           "shares remove a site's masks (dropout tolerance); always at least a "
                                           "strict majority, so that no site's update can be unmasked alone")


class PrivacyConfig(_Section):
    mode: Literal["none", "sample", "site"] = Field(
        "none", description="sample: patient-level DP-SGD at each site; site: clip each site's update, noise at the server")
    target_epsilon: float = Field(8.0, gt=0.0, le=1000.0, description="per-site budget for the whole run")
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0, le=1000.0, description="per-patient clipping norm (sample mode)")
    noise_multiplier: float = Field(1.0, ge=0.0, le=100.0, description="server noise (site mode)")
    clipping_norm: float = Field(1.0, gt=0.0, le=1e6, description="per-site update clipping (site mode)")
    finetune: Literal["auto", "all", "head", "classifier", "bias"] = Field(
        "auto", description="what the sites train: 'head' (the diagnostic and measurement heads and the learned "
        "loss weights on a frozen encoder: few parameters, so DP noise does not drown the signal), 'classifier' (the "
        "diagnostic layer alone), 'bias' (its per-class biases alone: the class priors), 'all', or 'auto' = head "
        "under patient-level DP when the federation starts from a pretrained model, else all")
    finetune_views: int = Field(
        8, ge=0, le=1000, description="when the sites train only the heads of a pretrained model: augmented views "
        "of each training patient put through the frozen encoders once per run, the heads then training on a "
        "random one of them each step (ccmr_core/frozen_views.py); 0 = run the encoders on a new augmentation "
        "at every step, as in full training (about ten times slower)")
    finetune_multiplicity: int = Field(
        1, ge=1, le=1000, description="when the heads train on precomputed views: views of each patient per step, "
        "whose losses are averaged before the patient's gradient is clipped (augmentation multiplicity, De et al. "
        "2022); at most privacy.finetune_views; 1 = one random view per step")
    finetune_top: bool = Field(
        False, description="when the sites train only the heads: also the encoder's top (CC-CMR: slice pooling and "
        "patient projection, 17k weights that read the frozen slice features, so the views still apply)")
    finetune_lr: float = Field(
        0.0, ge=0.0, le=10.0, description="when the sites train only the heads: their peak learning rate; 0 = "
        "train.lr (the coordinator's public pretraining keeps train.lr)")
    finetune_batch_size: int = Field(
        0, ge=0, le=100_000, description="when the sites train only the heads: their batch (under DP, the expected "
        "batch of Poisson sampling); 0 = train.batch_size. Larger batches average the DP noise over more patients "
        "per step (De et al. 2022); the coordinator's public pretraining keeps train.batch_size")


class ExperimentConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federated: FederatedConfig = FederatedConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()

    @model_validator(mode="after")
    def _aggregation_compatible(self) -> "ExperimentConfig":
        server_opt = self.federated.server_momentum > 0 or self.federated.server_lr != 1.0
        if server_opt and self.federated.aggregator != "mean":
            raise ValueError(
                f"federated.server_momentum / server_lr (FedAvgM) cannot be combined with federated.aggregator "
                f"'{self.federated.aggregator}': the momentum is kept for the mean of the updates; use aggregator "
                "'mean', or server_momentum 0 and server_lr 1 for a robust aggregator")
        if self.federated.validate_in == "train-reply" and self.federated.evaluate_every != 1:
            raise ValueError(
                f"federated.validate_in 'train-reply' validates every round on the train replies; it cannot be "
                f"combined with federated.evaluate_every {self.federated.evaluate_every}: leave evaluate_every at 1, "
                "or use validate_in 'evaluate-phase'")
        if self.federated.logit_adjustment and self.privacy.mode == "sample":
            raise ValueError(
                "federated.logit_adjustment cannot be combined with privacy.mode 'sample': the site's class "
                "frequencies would shape every patient's loss without privacy accounting; set logit_adjustment "
                "false, or use privacy.mode 'site' or 'none'")
        if self.federated.drift_correction == "scaffold":
            fed, why = self.federated, None
            if self.privacy.mode != "none":
                why = (f"privacy.mode '{self.privacy.mode}': a site's control variate is a second gradient-derived "
                       "array that the privacy accounting does not cover")
            elif self.secure_aggregation.enabled:
                why = ("secure_aggregation.enabled: the coordinator would see each site's control variate in the "
                       "clear")
            elif fed.aggregator != "mean":
                why = f"federated.aggregator '{fed.aggregator}': the control variates are means"
            elif server_opt:
                why = "federated.server_momentum / server_lr (FedAvgM): not implemented together"
            if why:
                raise ValueError(f"federated.drift_correction 'scaffold' cannot be combined with {why}; set "
                                 "drift_correction 'none', or leave the other setting at its default")
        if self.secure_aggregation.enabled and self.federated.aggregator != "mean":
            raise ValueError(
                f"secure_aggregation.enabled cannot be combined with federated.aggregator "
                f"'{self.federated.aggregator}': the coordinator sees only the sum of the updates, so a "
                "coordinate-wise median or trimmed mean cannot be computed; use aggregator 'mean'")
        return self

    @property
    def alignment(self) -> str:
        """The CC-CMR alignment this experiment uses (``model.alignment`` with 'auto' resolved)."""
        if self.model.alignment != "auto":
            return self.model.alignment
        return "slice" if self.privacy.mode == "sample" else "bank"

    @model_validator(mode="after")
    def _multiplicity_within_views(self) -> "ExperimentConfig":
        p = self.privacy
        if p.finetune_multiplicity > 1 and p.finetune_multiplicity > p.finetune_views:
            raise ValueError(
                f"privacy.finetune_multiplicity {p.finetune_multiplicity} is more than privacy.finetune_views "
                f"{p.finetune_views}: a step cannot use more views of a patient than were computed; raise "
                "finetune_views or lower finetune_multiplicity")
        return self

    @model_validator(mode="after")
    def _keep_model_only_for_cmr_clip(self) -> "ExperimentConfig":
        if self.train.keep_model != "last" and self.model.name != "cmr-clip":
            raise ValueError(
                f"train.keep_model {self.train.keep_model!r} is for model.name 'cmr-clip' only; {self.model.name} "
                "keeps the model at the end of its schedule: set train.keep_model to 'last'")
        return self

    @model_validator(mode="after")
    def _report_measurements_need_measurements(self) -> "ExperimentConfig":
        if self.model.report_measurements and not self.data.measurements:
            raise ValueError(
                "model.report_measurements needs the measurements to estimate: data.measurements is empty; list the "
                "labels.csv columns (e.g. [lvef, lvedv_ml]) or set model.report_measurements to false")
        return self

    @model_validator(mode="after")
    def _dp_needs_per_patient_losses(self) -> "ExperimentConfig":
        if self.privacy.mode == "sample" and self.model.name == "cc-cmr" and self.model.alignment == "bank":
            raise ValueError(
                "privacy.mode 'sample' (patient-level DP-SGD) cannot be combined with model.alignment 'bank': "
                "contrastive negatives from other patients couple patients, so the reported epsilon would be false; "
                "set model.alignment to 'slice' (run config alignment='slice') or use privacy.mode 'site'")
        if self.privacy.mode == "sample" and self.model.name == "cmr-clip":
            raise ValueError(
                "privacy.mode 'sample' (patient-level DP-SGD) cannot be combined with model.name 'cmr-clip': every "
                "report in a batch is every other patient's contrastive negative, so patients are coupled and the "
                "reported epsilon would be false; use privacy.mode 'site' or 'none'")
        if self.privacy.mode == "sample" and self.train.compile:
            raise ValueError(
                "train.compile cannot be combined with privacy.mode 'sample': Opacus computes each patient's "
                "gradient from hooks on the layers that compiled code bypasses; set train.compile to false")
        return self


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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: "1e-4" is a number, as people write learning
    rates (YAML 1.1 needs "1.0e-4" and reads "1e-4" as text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """YAML text to Python values (safe: plain scalars, lists and mappings only)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
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
    if not loc:  # a rule across several keys
        return err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    return f"key '{key}': {err['msg']} (got {got!r})"


def validate(data: dict[str, Any], source: str, cross_key_rules: bool = True) -> ExperimentConfig | None:
    """Validate a merged mapping; errors name ``source`` (a file or 'override'). Intermediate
    layers skip the rules across keys (a later layer may complete the combination)."""
    try:
        # JSON mode: YAML lists may fill tuples and ints may fill floats, but "3" is not an int.
        return ExperimentConfig.model_validate_json(json.dumps(data))
    except (TypeError, ValueError) as e:
        if not isinstance(e, ValidationError):
            raise ConfigError(f"{source}: values must be plain YAML scalars, lists and mappings ({e})") from None
        errors = [err for err in e.errors() if cross_key_rules or err["loc"]]
        if not errors:
            return None
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in errors)) from None


def parse_override(text: str) -> dict[str, Any]:
    """``train.lr=0.01`` -> ``{"train": {"lr": 0.01}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, for example data.ingest.size=64")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    value: Any = load_yaml(raw) if raw.strip() else ""
    for p in reversed(parts):
        value = {p: value}
    return value


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    text: tuple[str, str] | None = None,
) -> ExperimentConfig:
    """Defaults, then the preset, then ``path`` or ``text`` ((YAML content, where it came from)),
    then overrides; each layer validated."""
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
    if text is not None:
        layers.append((text[1], _parse_yaml(text[0], text[1])))
    for o in overrides:
        layers.append((f"override {o!r}", parse_override(o)))
    for source, data in layers:
        merged = _deep_merge(merged, data)
        validate(merged, source, cross_key_rules=False)
    return validate(merged, layers[-1][0])


# Flower run-config keys (kebab-case, in pyproject.toml [tool.flwr.app.config]) -> schema keys.
# In pyproject every key defaults to a sentinel ("" or -1) meaning "as the preset says".
RUN_CONFIG_KEYS: dict[str, str] = {
    "num-server-rounds": "federated.rounds",
    "strategy": "federated.strategy",
    "proximal-mu": "federated.proximal_mu",
    "local-epochs": "federated.local_epochs",
    "local-batch-size": "federated.local_batch_size",
    "logit-adjustment": "federated.logit_adjustment",
    "drift-correction": "federated.drift_correction",
    "server-momentum": "federated.server_momentum",
    "server-lr": "federated.server_lr",
    "fraction-train": "federated.fraction_train",
    "min-sites": "federated.min_sites",
    "fraction-evaluate": "federated.fraction_evaluate",
    "evaluate-every": "federated.evaluate_every",
    "validate-in": "federated.validate_in",
    "aggregator": "federated.aggregator",
    "batch-size": "train.batch_size",
    "lr": "train.lr",
    "model": "model.name",
    "alignment": "model.alignment",
    "dp": "privacy.mode",
    "target-epsilon": "privacy.target_epsilon",
    "delta": "privacy.delta",
    "max-grad-norm": "privacy.max_grad_norm",
    "noise-multiplier": "privacy.noise_multiplier",
    "synthetic-sites": "data.synth.sites",
    "synthetic-patients": "data.synth.patients",
    "seed": "data.synth.seed",
    "train-seed": "train.seed",
    "validation-patients": "federated.validation_patients",
    "secure-aggregation": "secure_aggregation.enabled",
    "round-timeout": "federated.round_timeout_s",
}
RUN_CONFIG_EXTRA = ("preset", "config", "config-yaml", "out-dir", "data-dir", "resume", "keep-superlink", "sites")


def from_run_config(run_config: dict[str, Any], allow_paths: bool = True) -> ExperimentConfig:
    """The experiment config for a Flower run: preset, the config (``config-yaml``: its YAML
    content, as `ccmr-server run` sends it; or ``config``: a file path, for a simulation on one
    machine), then the run-config keys that are not left at their sentinel ("" or -1). A hospital
    reads it with ``allow_paths=False``: it never opens a file the coordinator names."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS) - set(RUN_CONFIG_EXTRA))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted([*RUN_CONFIG_KEYS, *RUN_CONFIG_EXTRA]))}")
    overrides = []
    for key, path in RUN_CONFIG_KEYS.items():
        v = run_config.get(key, "")
        if v == "" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == -1):
            continue
        overrides.append(f"{path}={json.dumps(v)}")
    preset = str(run_config.get("preset", "") or "default")
    path = str(run_config.get("config", "") or "") or None
    content = str(run_config.get("config-yaml", "") or "") or None
    if path and content:
        raise ConfigError("run config: give the config as 'config' (a file) or 'config-yaml' (its content), not both")
    if path and not allow_paths:
        raise ConfigError("run config: the coordinator named a file ('config'); a site opens no path it is sent. "
                          "Send the configuration's content ('config-yaml'; `ccmr-server run --config` does)")
    try:
        return load_config(path, preset, overrides,
                           text=(content, "run config 'config-yaml' (the coordinator's config)") if content else None)
    except ConfigError as e:
        raise ConfigError(f"run config: {e}") from None


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run folder's config.yaml holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FederatedConfig",
    "IngestConfig",
    "PrivacyConfig",
    "SecureAggregationConfig",
    "RUN_CONFIG_KEYS",
    "from_run_config",
    "ModelConfig",
    "TrainConfig",
    "SynthConfig",
    "available_presets",
    "dump_config",
    "load_config",
    "parse_override",
    "validate",
]
