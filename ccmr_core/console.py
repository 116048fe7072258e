"""Saying what happened where a person reads it: a warning goes to the log (a deployment's files)
and to the console (a simulation's stream, a site's terminal) in the same words."""

from __future__ import annotations

import logging


def warn(log: logging.Logger, message: str) -> None:
    log.warning(message)
    print(message, flush=True)
