"""Environment defaults for Flower in this project's virtual environment.

Imported at interpreter start-up by ``ccmr_flwr_env.pth`` (installed with the package), so that a
plain ``flwr run .`` and the local SuperLink it starts (which inherits this environment) behave
as the project needs, without the user exporting anything:

* FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: no per-run ``uv sync``, which would resolve
  torch==2.13.0 to the multi-gigabyte CUDA build, or fail offline; apps run in this environment.
* FLWR_DISABLE_UPDATE_CHECK=1 and FLWR_TELEMETRY_ENABLED=0: no calls out of a hospital network.
* RAY_DEDUP_LOGS=0: every site's log line is shown in the stream.

Only defaults: a value already set in the environment wins. Nothing else is imported here.

``child_env`` is the environment for the Flower processes the project starts itself (SuperLink,
SuperNode, ``flwr run``): the same defaults, and this interpreter's bin folder first on PATH,
because those processes start ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
name.
"""

import os
import sys

DEFAULTS = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}

for _k, _v in DEFAULTS.items():
    os.environ.setdefault(_k, _v)


def child_env(clean: bool = False, **extra: str) -> dict:
    """os.environ with the defaults above, this environment's bin folder first on PATH, then
    ``extra``. ``clean`` drops inherited FLWR_* settings first (a test or benchmark that must not
    pick up the caller's FLWR_HOME or port)."""
    env = {k: v for k, v in os.environ.items() if not (clean and k.startswith("FLWR_"))}
    for k, v in DEFAULTS.items():
        env.setdefault(k, v)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def flower_bin(name: str) -> str:
    """A console script of this environment (flwr, flower-superlink, flower-supernode, ...)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else name
