"""Confidence intervals and paired tests for results over UASpeech utterances.

Why clustered
-------------
UASpeech records every spoken word with a microphone array: the utterances
``M08_B3_CW95_M2`` ... ``M08_B3_CW95_M8`` are one and the same production of
``CW95`` by ``M08``, captured by up to seven microphones at once. Their errors
are strongly correlated (a word the speaker slurred is usually misrecognised on
every channel), so the utterances are *not* independent samples. Treating them
as independent inflates the sample size about sevenfold and gives intervals
that are too narrow and p-values that are too small.

The independent unit is therefore the *group* (speaker, word): the utterance id
without its ``_<MIC>`` suffix (``corpus.production_of``). Both procedures here
resample or permute whole groups:

* :func:`bootstrap_ci` -- cluster (group) bootstrap of a ratio statistic
  ``100 * sum(num) / sum(den)`` (WER: edits / reference words; WRA or SER:
  correct / 1), percentile interval.
* :func:`paired_test` -- paired randomization (sign-flip) test between two
  systems scored on the same utterances; the per-group difference is the unit
  whose sign is exchangeable under the null hypothesis.

Everything is deterministic given ``seed`` (``numpy.random.default_rng``).
"""

import numpy as np

# Upper bound on the number of array cells built at once (bootstrap rows x groups).
_CHUNK_CELLS = 4_000_000


def _group_index(groups, n):
    """Integer group index per utterance (groups sorted by label) and the group count."""
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} utterances")
    if n == 0:
        raise ValueError("no utterances")
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    inverse = inverse.reshape(-1)
    return inverse, int(inverse.max()) + 1


def _as_vector(values, name):
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values")
    return arr


def bootstrap_ci(num, den, groups, n_boot=2000, seed=0, level=0.95):
    """Cluster-bootstrap percentile interval of ``100 * sum(num) / sum(den)``.

    Arguments
    ---------
    num, den : sequences of numbers, one entry per utterance
        WER: ``num`` = edits, ``den`` = reference words.
        WRA: ``num`` = 1 if the utterance is exactly right else 0, ``den`` = 1.
    groups : sequence of hashable, one label per utterance
        The cluster of each utterance, normally ``corpus.production_of(utt_id)``. The
        microphones of one (speaker, word) are one production, hence one
        cluster: whole groups are resampled with replacement, so the interval
        reflects the number of independent words, not of channels.
    n_boot : int
        Bootstrap replicates.
    seed : int
        Seed of ``numpy.random.default_rng``; the result is a function of it.
    level : float
        Coverage of the two-sided percentile interval.

    Returns
    -------
    (point, low, high) : floats, in percent.
    """
    num = _as_vector(num, "num")
    den = _as_vector(den, "den")
    if num.shape != den.shape:
        raise ValueError(f"num has {num.size} entries, den {den.size}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    index, n_groups = _group_index(groups, num.size)
    if den.sum() == 0:
        raise ValueError("sum(den) is 0: the ratio is undefined")
    point = 100.0 * num.sum() / den.sum()

    num_g = np.bincount(index, weights=num, minlength=n_groups)
    den_g = np.bincount(index, weights=den, minlength=n_groups)

    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot, dtype=np.float64)
    rows = max(1, _CHUNK_CELLS // n_groups)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        draw = rng.integers(0, n_groups, size=(stop - start, n_groups))
        n_sum = num_g[draw].sum(axis=1)
        d_sum = den_g[draw].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats[start:stop] = np.where(d_sum > 0, 100.0 * n_sum / d_sum, np.nan)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanpercentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(point), float(low), float(high)


def paired_test(err_a, err_b, groups, n_perm=10000, seed=0):
    """Two-sided paired randomization (sign-flip) test, clustered by group.

    Both systems were scored on the same utterances (same order). Per group
    ``g`` (speaker + word, i.e. all microphones of one production) the
    difference ``d_g = sum_{u in g} (err_a[u] - err_b[u])`` is formed. Under H0
    (the systems are exchangeable) the sign of each ``d_g`` is equally likely
    to be + or -, independently across groups -- but *not* across the
    microphones of one group, which share one production; flipping whole
    groups keeps that dependence. The p-value is

        p = (1 + #{perm: |sum_g s_g d_g| >= |sum_g d_g|}) / (1 + n_perm)

    with ``s_g`` drawn uniformly from {-1, +1}.

    Arguments
    ---------
    err_a, err_b : sequences of numbers, one per utterance
        Per-utterance errors (edits for WER, 0/1 for sentence error / WRA).
    groups : sequence of hashable
        Cluster label per utterance, normally ``corpus.production_of(utt_id)``.
    n_perm : int
        Random sign assignments.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    dict with ``p_value``, ``mean_diff`` (per-utterance mean of
    ``err_a - err_b``: negative means A makes fewer errors), ``n_groups``,
    ``n`` (utterances), ``sum_diff`` and ``n_perm``.
    """
    err_a = _as_vector(err_a, "err_a")
    err_b = _as_vector(err_b, "err_b")
    if err_a.shape != err_b.shape:
        raise ValueError(f"err_a has {err_a.size} entries, err_b {err_b.size}")
    if n_perm < 1:
        raise ValueError(f"n_perm must be positive, got {n_perm}")
    index, n_groups = _group_index(groups, err_a.size)
    diff = err_a - err_b
    d_g = np.bincount(index, weights=diff, minlength=n_groups)
    observed = abs(d_g.sum())
    # Tolerance against float round-off for non-integer errors; exact for integers.
    tol = 1e-9 * max(1.0, float(np.abs(d_g).sum()))

    rng = np.random.default_rng(seed)
    hits = 0
    rows = max(1, _CHUNK_CELLS // n_groups)
    for start in range(0, n_perm, rows):
        stop = min(n_perm, start + rows)
        signs = rng.integers(0, 2, size=(stop - start, n_groups), dtype=np.int8) * 2 - 1
        stat = np.abs(signs @ d_g)
        hits += int(np.count_nonzero(stat >= observed - tol))
    return {
        "p_value": (1.0 + hits) / (1.0 + n_perm),
        "mean_diff": float(diff.mean()),
        "sum_diff": float(d_g.sum()),
        "n": int(err_a.size),
        "n_groups": n_groups,
        "n_perm": int(n_perm),
    }


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate):
    the k-th smallest is multiplied by (m - k + 1), made monotone, capped at 1. Same order as given."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def hierarchical_ci(num, den, groups, n_boot=2000, seed=0, level=0.95):
    """Bootstrap percentile interval of a figure averaged over training seeds:
    ``mean_k 100 * sum(num[k]) / sum(den)``, resampling both the seeds (with replacement) and whole
    groups, so that the interval holds the seed-to-seed variance as well as the sampling of the
    test words. ``num``: [seeds, utterances]; ``den``: [utterances]. With one seed it is
    ``bootstrap_ci``'s interval. Returns (point, low, high) in percent."""
    num = np.atleast_2d(np.asarray(num, dtype=np.float64))
    den = _as_vector(den, "den")
    if num.shape[1] != den.size:
        raise ValueError(f"num has {num.shape[1]} utterances, den {den.size}")
    index, n_groups = _group_index(groups, den.size)
    n_seeds = num.shape[0]
    num_g = np.stack([np.bincount(index, weights=row, minlength=n_groups) for row in num])  # [K, G]
    den_g = np.bincount(index, weights=den, minlength=n_groups)
    point = float(np.mean(100.0 * num.sum(1) / den.sum()))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    rows = max(1, _CHUNK_CELLS // (n_groups * n_seeds))
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        seeds = rng.integers(0, n_seeds, size=(stop - start, n_seeds))
        draw = rng.integers(0, n_groups, size=(stop - start, n_groups))
        d_sum = den_g[draw].sum(axis=1)  # [B]
        n_sum = num_g[seeds[:, :, None], draw[:, None, :]].sum(axis=2)  # [B, K]
        with np.errstate(divide="ignore", invalid="ignore"):
            stats[start:stop] = np.where(d_sum > 0, 100.0 * n_sum.mean(axis=1) / d_sum, np.nan)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanpercentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return point, float(low), float(high)
