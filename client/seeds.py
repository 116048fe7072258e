"""The seeds a site's ClientApp draws its training, evaluation and frozen-view randomness from
(augmentation, dropout, shuffling, MC-dropout passes; never DP noise, which is secret:
``ccmr_core/privacy.py``).

Each (run seed, purpose, round, site) gets its own seed, so no two sites, rounds or purposes share
a random stream, and no run seed's streams overlap another's. The first formula,
``seed * 1000 + round * 31 + site`` for training, ``seed * 1000 + 500 + site`` for evaluation and
``seed * 1000 + site`` for the frozen views, is distinct only for fewer than 31 sites and 16 rounds
(site 31 of a round took site 0's seed of the next); it is kept where it is distinct, so the runs of
small federations repeat those the benchmarks measured, and every other case takes a 62-bit hash of
the four numbers above 2**40, out of that formula's range.
"""

from __future__ import annotations

import numpy as np

PURPOSES = ("train", "evaluate", "views")
_HASHED = 2**40  # the first formula stays below run seed x 1000 + 1000


def _first_formula(seed: int, purpose: str, rnd: int, site: int) -> int | None:
    if purpose == "train" and site < 31 and 1 <= rnd and rnd * 31 + site < 500:
        return seed * 1000 + rnd * 31 + site
    if purpose == "evaluate" and site < 500:
        return seed * 1000 + 500 + site
    if purpose == "views" and site < 31:
        return seed * 1000 + site
    return None


def site_seed(seed: int, purpose: str, rnd: int, site: int) -> int:
    """The seed of one site's ``purpose`` ('train', 'evaluate' or 'views') in round ``rnd`` (0 where
    the purpose has no round) of a run with ``train.seed`` ``seed``."""
    if purpose not in PURPOSES:
        raise ValueError(f"seed purpose {purpose!r}: choose one of {', '.join(PURPOSES)}")
    if seed < 0 or rnd < 0 or site < 0:
        raise ValueError(f"seed {seed}, round {rnd}, site {site}: each must be 0 or more")
    first = _first_formula(seed, purpose, rnd, site)
    if first is not None and first < _HASHED:
        return first
    state = np.random.SeedSequence([seed, PURPOSES.index(purpose), rnd, site]).generate_state(1, np.uint64)[0]
    return _HASHED + int(state) % 2**62
