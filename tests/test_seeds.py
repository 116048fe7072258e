"""The seeds of a site's training, evaluation and frozen views (client/seeds.py): distinct for
every site, round, purpose and run seed, also with many sites; unchanged where the first formula
was already distinct, so small federations repeat the runs the benchmarks measured."""

import pytest

from client.seeds import PURPOSES, site_seed


def test_no_two_sites_rounds_purposes_or_run_seeds_share_a_seed():
    keys = [(seed, purpose, rnd if purpose == "train" else 0, site)
            for seed in range(3) for purpose in PURPOSES for rnd in range(1, 41) for site in range(120)]
    keys = sorted(set(keys))
    seeds = [site_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys)
    assert all(0 <= s < 2**64 for s in seeds)  # what torch.manual_seed accepts


def test_site_31_no_longer_takes_site_0s_seed_of_the_next_round():
    assert site_seed(0, "train", 1, 31) != site_seed(0, "train", 2, 0)
    assert site_seed(0, "train", 17, 0) != site_seed(0, "evaluate", 0, 27)  # round 17 reached the evaluation range
    assert site_seed(0, "views", 0, 31) != site_seed(0, "train", 1, 0)


def test_small_federations_keep_the_seeds_the_benchmarks_ran_with():
    for seed in (0, 4, 8):
        for site in range(3):
            assert site_seed(seed, "evaluate", 0, site) == seed * 1000 + 500 + site
            assert site_seed(seed, "views", 0, site) == seed * 1000 + site
            for rnd in range(1, 16):
                assert site_seed(seed, "train", rnd, site) == seed * 1000 + rnd * 31 + site


@pytest.mark.parametrize("args,match", [((0, "test", 1, 0), "seed purpose 'test': choose one of train, evaluate"),
                                        ((0, "train", 1, -1), "site -1: each must be 0 or more")])
def test_a_bad_request_is_named(args, match):
    with pytest.raises(ValueError, match=match):
        site_seed(*args)
