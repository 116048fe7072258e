"""A site's own rules for which runs it takes part in (site governance).

The site sets them when it starts its SuperNode, in a policy file it keeps (``ccmr-client start
--policy site-policy.yaml``: require_dp, require_secagg, allowed_code, max_epsilon,
min_eval_patients) or as flags (``--require-dp sample --pin-code SHA256``), as node config the
coordinator cannot change:

* ``policy-require-dp``: ``sample`` or ``site``; a run with another privacy mode is refused.
* ``policy-require-secagg``: ``true``; a run without secure aggregation (SecAgg+) is refused.
* ``policy-code-sha256``: the SHA-256 (or a comma-separated list) of the training code the site reviewed
  (``ccmr_core.codehash``; ``ccmr-server run`` prints it for every run); a run whose app (FAB)
  holds other code is refused. The site answers with its own installed code in any case
  (client/worker.py); the pin is about what the coordinator runs and ships.
* ``policy-max-epsilon``: the site's lifetime cap on patient-level DP: epsilon over every run it
  took part in (RDP composed over the runs' ledgers at the site), at ``policy-delta`` (default
  1e-5, whatever delta a run asks for). A round that would exceed it is declined.
* ``policy-min-eval-patients``: no evaluation statistics computed on fewer patients leave the site
  (``ccmr-client start`` sets 5 unless told otherwise; a simulation without the key: 1). Counts,
  histograms and loss sums over one or two patients describe those patients, and a coordinator
  could craft a model to read them out (an evaluation oracle).

A refused run gets an empty 'refused' reply with the reason (printed at the site and written to
its audit log); the run goes on without the site.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ccmr_core.codehash import code_hash

APP_ROOT = Path(__file__).resolve().parents[1]
# set by the site's worker (client/worker.py): the code hash of the app the coordinator shipped
FAB_CODE_KEY = "coordinator-code-sha256"


@lru_cache(maxsize=1)
def _app_hash() -> str:
    return code_hash(APP_ROOT)  # the code cannot change under a running process


def violations(node_config: dict, privacy_mode: str, secure: bool) -> list[str]:
    """The site's rules this run breaks (empty: the site takes part). ``secure``: the request
    arrived through secure aggregation."""
    out = []
    need = str(node_config.get("policy-require-dp", "") or "")
    if need and privacy_mode != need:
        out.append(f"this site requires differential privacy dp='{need}' and the run uses dp='{privacy_mode}'")
    if _true(node_config.get("policy-require-secagg", False)) and not secure:
        out.append("this site requires secure aggregation and the run does not use it "
                   "(run config secure-aggregation=true)")
    pins = [p.strip() for p in str(node_config.get("policy-code-sha256", "") or "").split(",") if p.strip()]
    if pins:
        # the site's worker answers with the site's own code and reports what the coordinator
        # shipped; a SuperNode that runs the shipped app (simulation) checks that app itself
        have = str(node_config.get(FAB_CODE_KEY) or _app_hash())
        if have not in pins:
            out.append(f"the run's training code has SHA-256 {have[:16]}..., this site accepts only "
                       f"{', '.join(p[:16] + '...' for p in pins)}")
    return out


DEFAULT_MIN_EVAL_PATIENTS = 5


class SitePolicy(BaseModel):
    """The site's rules, as a file the hospital keeps (``ccmr-client start --policy FILE``) or as
    flags; they become node config of the site's SuperNode, which the coordinator cannot change."""

    model_config = ConfigDict(extra="forbid")
    require_dp: Literal["", "sample", "site"] = ""
    require_secagg: bool = False
    allowed_code: list[str] = Field(default_factory=list, description="SHA-256 of code versions the site reviewed")
    max_epsilon: float | None = Field(None, gt=0)
    min_eval_patients: int = Field(DEFAULT_MIN_EVAL_PATIENTS, ge=1)

    @field_validator("allowed_code")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        bad = [h for h in v if not re.fullmatch(r"[0-9a-f]{64}", h)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a SHA-256 (64 hex digits, as `ccmr-server run` prints)")
        return v

    def node_config(self) -> str:
        out = f"policy-min-eval-patients={self.min_eval_patients}"
        if self.max_epsilon is not None:
            out += f" policy-max-epsilon={self.max_epsilon!r}"
        if self.require_dp:
            out += f' policy-require-dp="{self.require_dp}"'
        if self.require_secagg:
            out += ' policy-require-secagg="true"'
        if self.allowed_code:
            out += f' policy-code-sha256="{",".join(self.allowed_code)}"'
        return out


def load_policy(path: str | Path) -> SitePolicy:
    """The site's policy file; errors name the file, the key and what is allowed."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the site policy ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise PolicyError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: the site policy must be a mapping of rules ({', '.join(SitePolicy.model_fields)})")
    try:
        return SitePolicy.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        allowed = ", ".join(SitePolicy.model_fields)
        raise PolicyError(f"{path}: {key}: {err['msg']} (rules a site policy may set: {allowed})") from None


class PolicyError(ValueError):
    pass
SITE_DELTA = 1e-5


def max_epsilon(node_config: dict) -> tuple[float | None, float]:
    """(the site's lifetime epsilon cap or None, the delta it is measured at)."""
    cap = node_config.get("policy-max-epsilon", "")
    delta = float(node_config.get("policy-delta", SITE_DELTA) or SITE_DELTA)
    return (float(cap) if str(cap).strip() not in ("", "none") else None), delta


def min_eval_patients(node_config: dict) -> int:
    try:
        return max(1, int(node_config.get("policy-min-eval-patients", 1)))
    except (TypeError, ValueError):
        return DEFAULT_MIN_EVAL_PATIENTS  # a value the site cannot read: the safe default


def _true(v) -> bool:
    return v is True or str(v).strip().lower() in ("true", "1", "yes")
