"""Word-level combinations of several systems' hypotheses on the same utterances: the vote, the
best single system and the oracle. Used by the recipe's ``majority_vote`` baseline and its best
single teacher (``train.py``, ``decode.py``, ``scoring.py``), by ``compare.py`` on the user's
``wer_*.txt`` files and by ``word_fusion.py``: every vote of the project follows ``VOTE_RULE``,
every "best single" chosen on other data ``RANKING_RULE``; only the data of the ranking differ
(what each tool has that is not the test).

Nothing here depends on the order in which the systems are given:

- ``vote``: per utterance, each distinct hypothesis scores the summed weight of the systems that
  produced it (weight 1 each: the majority vote). Several hypotheses may share the top score (a
  tie). ``pick`` breaks a tie by the *ranking* of the systems (``RANKING_RULE``, keys from
  ``rank_key``): the hypothesis of the best-ranked system among those that produced a top
  hypothesis wins. Why not an equal share for each tied hypothesis (a random tie-break in
  expectation)? The ranked vote is a system one can run (one hypothesis per utterance, tested like
  any other system), decided on data the test does not touch, and one rule for every tool gives one
  figure for the same files; it is not necessarily the higher figure.
- ``best_single``: the best-ranked system.
- ``oracle``: the fewest edits of any system (an upper bound, not a system).
"""

import collections
import math

RANKING_RULE = (
    "systems ranked by their accuracy (exact-match share) on data that is not the test (the teacher "
    "speakers' audio; in train.py every training speaker's audio, train and validation items; in "
    "compare.py each file's other speakers' files, or --vote_rank); an exact tie of accuracies broken "
    "by a continuous statistic of the same data where the tool has logits (the mean log-probability "
    "the model gives the reference pieces), then by the alphabetically first name; a system without "
    "such data ranks below every ranked one"
)
VOTE_RULE = (
    "majority vote over whole hypotheses; a tie goes to the hypothesis of the best-ranked system "
    "among those that produced a top hypothesis (the ranking: " + RANKING_RULE + "); independent of "
    "the order of the systems"
)
ORACLE_RULE = (
    "per utterance the fewest edits of any system; WRA oracle = utterance counted right if any "
    "system is exactly right (an upper bound, not a system)"
)


def rank_key(accuracy=None, statistic=None):
    """A system's key in ``RANKING_RULE`` (higher is better; the name comes last, in ``pick`` and
    ``best_single``): its accuracy on other data, then a continuous statistic of the same data
    (higher is better; None where the tool has none). ``accuracy=None``: no data to rank the
    system on, below every ranked system."""
    return (
        -math.inf if accuracy is None else float(accuracy),
        -math.inf if statistic is None else float(statistic),
    )


def _key(hyp):
    return tuple(hyp) if isinstance(hyp, list) else hyp


def vote(hyps, weights=None):
    """The top hypotheses of one utterance: ``{hypothesis key: [indices of the systems that produced
    it]}`` for the hypotheses with the highest summed weight (several when tied)."""
    if not hyps:
        raise ValueError("no hypotheses to vote on")
    weights = [1.0] * len(hyps) if weights is None else list(weights)
    score, producers = collections.defaultdict(float), collections.defaultdict(list)
    for k, (hyp, weight) in enumerate(zip(hyps, weights)):
        score[_key(hyp)] += weight
        producers[_key(hyp)].append(k)
    best = max(score.values())
    # (a tolerance: summed float weights that are equal in exact arithmetic stay tied)
    return {h: producers[h] for h, s in score.items() if s >= best - 1e-9 * max(1.0, abs(best))}


def pick(top, rank, names):
    """The winning system index of ``vote``'s top hypotheses: the best-ranked producer (``rank``:
    one key per system, higher is better: ``rank_key`` or a plain accuracy), ties by name."""
    return max((k for ks in top.values() for k in ks), key=lambda k: (rank[k], _name_order(names[k])))


def _name_order(name):
    # max() should prefer the alphabetically first name: invert the characters
    return [-ord(c) for c in name]


def vote_weight(accuracy, n, n_words, floor=0.5):
    """Vote weight of a system from its accuracy on ``n`` utterances of other data, for a plurality
    vote among ``n_words`` possible words: log((K - 1) p / (1 - p)), the optimal weight for
    independent voters whose errors spread over the K - 1 wrong words (Nitzan and Paroush), with
    ``floor`` pseudo-counts each way so that an accuracy of 0 or 1 stays finite. It is positive
    whenever the system beats chance (p > 1/K), so that no system votes *against* a word."""
    right = accuracy * n
    p = (right + floor) / (n + 2 * floor)
    return math.log(max(n_words - 1, 1) * p / (1.0 - p))


def best_single(rank, names):
    """The best-ranked system (``RANKING_RULE``: ``rank`` one key per system, higher is better;
    ties: the alphabetically first name)."""
    return max(range(len(names)), key=lambda k: (rank[k], _name_order(names[k])))


def oracle(edits_per_system):
    """The fewest edits of any system on one utterance."""
    return min(edits_per_system)
