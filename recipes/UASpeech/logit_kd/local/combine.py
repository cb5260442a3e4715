"""Word-level combinations of several systems' hypotheses on the same utterances: the vote, the
best single system and the oracle. Used by the recipe's ``majority_vote`` baseline
(``scoring.py``), by ``compare.py`` on the user's ``wer_*.txt`` files and by ``word_fusion.py``.

Nothing here depends on the order in which the systems are given:

- ``vote``: per utterance, each distinct hypothesis scores the summed weight of the systems that
  produced it (weight 1 each: the majority vote). Several hypotheses may share the top score (a
  tie). ``pick`` breaks a tie by a *ranking* of the systems chosen on other data (e.g. each
  system's accuracy on the teacher speakers, never on the test): the hypothesis of the best-ranked
  system among those that produced a top hypothesis wins; systems of equal rank are ordered by
  name. ``fractional_credit`` instead gives each tied hypothesis an equal share: the expected
  result of breaking the tie at random, which needs no other data.
- ``oracle``: the fewest edits of any system (an upper bound, not a system).
"""

import collections
import math

VOTE_RULE = (
    "majority vote over whole hypotheses; ties broken by each system's accuracy on the teacher "
    "speakers (never on the test), then by name: independent of the order of the systems"
)
FRACTIONAL_RULE = (
    "majority vote over whole hypotheses; a tie between k hypotheses gives each 1/k of the "
    "utterance (the expected result of a random tie-break): independent of the order of the systems"
)
ORACLE_RULE = (
    "per utterance the fewest edits of any system; WRA oracle = utterance counted right if any "
    "system is exactly right (an upper bound, not a system)"
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
    higher is better, one value per system), ties by name."""
    return max((k for ks in top.values() for k in ks), key=lambda k: (rank[k], _name_order(names[k])))


def _name_order(name):
    # max() should prefer the alphabetically first name: invert the characters
    return [-ord(c) for c in name]


def fractional_credit(top, edits, right):
    """(expected edits, expected exactness) of one utterance's vote under a random tie-break:
    each of the top hypotheses counts 1/k. ``edits``/``right``: one value per system."""
    shares = [(edits[ks[0]], right[ks[0]]) for ks in top.values()]
    return sum(e for e, _ in shares) / len(shares), sum(r for _, r in shares) / len(shares)


def vote_weight(accuracy, n, n_words, floor=0.5):
    """Vote weight of a system from its accuracy on ``n`` utterances of other data, for a plurality
    vote among ``n_words`` possible words: log((K - 1) p / (1 - p)), the optimal weight for
    independent voters whose errors spread over the K - 1 wrong words (Nitzan and Paroush), with
    ``floor`` pseudo-counts each way so that an accuracy of 0 or 1 stays finite. It is positive
    whenever the system beats chance (p > 1/K), so that no system votes *against* a word."""
    right = accuracy * n
    p = (right + floor) / (n + 2 * floor)
    return math.log(max(n_words - 1, 1) * p / (1.0 - p))


def best_single(accuracy, names):
    """The system with the highest accuracy on other data (ties: alphabetically first name)."""
    return max(range(len(names)), key=lambda k: (accuracy[k], _name_order(names[k])))


def oracle(edits_per_system):
    """The fewest edits of any system on one utterance."""
    return min(edits_per_system)
