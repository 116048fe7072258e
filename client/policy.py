"""A site's own rules for which runs it takes part in (site governance).

The site sets them when it starts its SuperNode (``ccmr-client start --require-dp sample
--pin-code SHA256``), as node config the coordinator cannot change:

* ``policy-require-dp``: ``sample`` or ``site``; a run with another privacy mode is refused.
* ``policy-code-sha256``: the SHA-256 of the training code the site reviewed
  (``ccmr_core.codehash``; ``ccmr-server run`` prints it for every run); a run shipping other code
  is refused.

A refused run gets an empty 'refused' reply with the reason (printed at the site and written to
its audit log); the run goes on without the site.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ccmr_core.codehash import code_hash

APP_ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def _app_hash() -> str:
    return code_hash(APP_ROOT)  # the code cannot change under a running process


def violations(node_config: dict, privacy_mode: str) -> list[str]:
    out = []
    need = str(node_config.get("policy-require-dp", "") or "")
    if need and privacy_mode != need:
        out.append(f"this site requires differential privacy dp='{need}' and the run uses dp='{privacy_mode}'")
    pin = str(node_config.get("policy-code-sha256", "") or "")
    if pin:
        have = _app_hash()
        if have != pin:
            out.append(f"the run's training code has SHA-256 {have[:16]}..., this site accepts only {pin[:16]}...")
    return out
