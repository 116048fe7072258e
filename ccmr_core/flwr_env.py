"""Environment defaults for Flower in this project's virtual environment.

Imported at interpreter start-up by ``ccmr_flwr_env.pth`` (installed with the package), so that a
plain ``flwr run .`` and the local SuperLink it starts (which inherits this environment) behave
as the project needs, without the user exporting anything:

* FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: no per-run ``uv sync``, which would resolve
  torch==2.13.0 to the multi-gigabyte CUDA build, or fail offline; apps run in this environment.
* FLWR_DISABLE_UPDATE_CHECK=1 and FLWR_TELEMETRY_ENABLED=0: no calls out of a hospital network.
* RAY_DEDUP_LOGS=0: every site's log line is shown in the stream.

Only defaults: a value already set in the environment wins. Nothing else is imported here.
"""

import os

DEFAULTS = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}

for _k, _v in DEFAULTS.items():
    os.environ.setdefault(_k, _v)
