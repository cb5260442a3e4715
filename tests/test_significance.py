"""Tests of local/significance.py: cluster bootstrap and clustered paired sign-flip test."""

import itertools

import numpy as np
import pytest

from local.corpus import production_of
from local.significance import bootstrap_ci, paired_test


def _width(ci):
    return ci[2] - ci[1]


def _grouped_bernoulli(n_groups, p, mics=7, seed=1):
    """Utterances of n_groups (speaker, word) groups; all mics of a group share one outcome."""
    rng = np.random.default_rng(seed)
    outcome = (rng.random(n_groups) < p).astype(float)
    num = np.repeat(outcome, mics)
    groups = [f"M08_B3_W{g}" for g in range(n_groups) for _ in range(mics)]
    return num, np.ones_like(num), groups


def test_production_of_strips_the_microphone():
    assert production_of("M08_B3_CW95_M2") == "M08_B3_CW95"
    assert production_of("F02_B3_LZ_M8") == "F02_B3_LZ"
    assert production_of("M01_B3_D7_M5") == production_of("M01_B3_D7_M7")
    assert production_of("M01_B3_D7_M5") != production_of("M05_B3_D7_M5")  # another speaker
    assert production_of("M08_B3_C12_M3") != production_of("M08_B3_C1_M3")
    assert production_of("no_mic_here") == "no_mic_here"


def test_bootstrap_contains_point_and_narrows_with_more_data():
    small = bootstrap_ci(*_grouped_bernoulli(40, 0.3), n_boot=1000)
    large = bootstrap_ci(*_grouped_bernoulli(1000, 0.3), n_boot=1000)
    for point, low, high in (small, large):
        assert low <= point <= high
    assert _width(large) < 0.5 * _width(small)


def test_bootstrap_point_is_the_ratio_of_sums():
    num, den = [1, 0, 2, 3], [1, 1, 2, 4]
    point, _, _ = bootstrap_ci(num, den, ["a", "a", "b", "c"], n_boot=50)
    assert point == pytest.approx(100.0 * 6 / 8)


def test_bootstrap_width_matches_normal_theory_for_independent_groups():
    # 2000 independent groups, outcome ~ Bernoulli(0.3) per group: the 95 % interval of the
    # rate is about 2 * 1.96 * sqrt(p (1 - p) / G) wide.
    num, den, groups = _grouped_bernoulli(2000, 0.3, mics=7, seed=3)
    point, low, high = bootstrap_ci(num, den, groups, n_boot=2000)
    p = point / 100.0
    expected = 100.0 * 2 * 1.96 * np.sqrt(p * (1 - p) / 2000)
    assert high - low == pytest.approx(expected, rel=0.1)


def test_clustering_matters_for_the_bootstrap():
    rng = np.random.default_rng(7)
    n = 120
    num = rng.integers(0, 3, size=n).astype(float)
    den = rng.integers(1, 4, size=n).astype(float)
    labels = [f"g{g:04d}" for g in range(n)]
    base = bootstrap_ci(num, den, labels, n_boot=2000, seed=5)

    # The same data seen by 7 microphones: 7 identical copies per group.
    num7, den7 = np.repeat(num, 7), np.repeat(den, 7)
    clustered = bootstrap_ci(num7, den7, [lab for lab in labels for _ in range(7)], n_boot=2000, seed=5)
    assert clustered[0] == pytest.approx(base[0])
    assert _width(clustered) == pytest.approx(_width(base), rel=1e-9)

    # Pretending the 7 copies were independent utterances: a falsely narrow interval (~1/sqrt(7)).
    naive = bootstrap_ci(num7, den7, [f"u{k:05d}" for k in range(7 * n)], n_boot=2000, seed=5)
    assert _width(naive) < 0.6 * _width(base)


def test_bootstrap_is_deterministic_given_the_seed():
    data = _grouped_bernoulli(60, 0.4)
    assert bootstrap_ci(*data, seed=11) == bootstrap_ci(*data, seed=11)
    assert bootstrap_ci(*data, n_boot=500, seed=11) != bootstrap_ci(*data, n_boot=500, seed=12)


def test_paired_test_identical_systems_gives_p_one():
    num, _, groups = _grouped_bernoulli(80, 0.3)
    result = paired_test(num, num.copy(), groups, n_perm=2000)
    assert result["p_value"] == 1.0
    assert result["mean_diff"] == 0.0
    assert result["n_groups"] == 80


def test_paired_test_clearly_better_system_gives_small_p():
    rng = np.random.default_rng(2)
    g = 100
    worse = np.repeat((rng.random(g) < 0.6).astype(float), 7)
    better = np.repeat((rng.random(g) < 0.15).astype(float), 7)
    groups = [f"S_B3_W{k}_M{m}" for k in range(g) for m in range(2, 9)]
    groups = [production_of(u) for u in groups]
    result = paired_test(better, worse, groups, n_perm=5000)
    assert result["p_value"] < 0.001
    assert result["p_value"] >= 1.0 / 5001  # never zero
    assert result["mean_diff"] == pytest.approx(np.mean(better - worse))
    assert result["mean_diff"] < 0


def test_paired_test_matches_exact_enumeration_on_few_groups():
    # 10 groups: the exact sign-flip p-value enumerates all 2**10 sign vectors.
    rng = np.random.default_rng(4)
    d = rng.integers(-2, 4, size=10).astype(float)
    a = np.concatenate([np.maximum(d, 0), [1, 0]])
    b = np.concatenate([np.maximum(-d, 0), [1, 0]])
    groups = [f"g{k}" for k in range(10)] + ["g0", "g1"]  # the two extra rows add 0 to d_g
    observed = abs(d.sum())
    exact = np.mean([abs(np.dot(s, d)) >= observed for s in itertools.product((-1, 1), repeat=10)])
    result = paired_test(a, b, groups, n_perm=100_000, seed=3)
    assert result["p_value"] == pytest.approx(exact, abs=0.01)


def test_clustering_matters_for_the_paired_test():
    rng = np.random.default_rng(9)
    g = 60
    a = (rng.random(g) < 0.45).astype(float)
    b = (rng.random(g) < 0.30).astype(float)
    labels = [f"g{k:03d}" for k in range(g)]
    once = paired_test(a, b, labels, n_perm=4000, seed=1)
    # 7 mics recording each production: the clustered test sees the same evidence ...
    seven = paired_test(
        np.repeat(a, 7), np.repeat(b, 7), [lab for lab in labels for _ in range(7)], n_perm=4000, seed=1
    )
    assert seven["p_value"] == once["p_value"]
    assert seven["n_groups"] == g
    # ... while treating the copies as independent overstates it.
    naive = paired_test(np.repeat(a, 7), np.repeat(b, 7), [f"u{k}" for k in range(7 * g)], n_perm=4000, seed=1)
    assert naive["p_value"] < once["p_value"]


def test_paired_test_is_deterministic_given_the_seed():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    groups = [f"g{k // 3}" for k in range(300)]
    assert paired_test(a, b, groups, seed=5) == paired_test(a, b, groups, seed=5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        bootstrap_ci([1, 2], [1], ["a", "b"])
    with pytest.raises(ValueError):
        bootstrap_ci([1, 2], [1, 1], ["a"])
    with pytest.raises(ValueError):
        paired_test([1, 2], [1, 2, 3], ["a", "b"])
