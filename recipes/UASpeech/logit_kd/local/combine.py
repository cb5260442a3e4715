"""Word-level combinations of several systems' hypotheses on the same utterances: the majority
vote and the oracle. Used by the recipe's ``majority_vote`` baseline (``scoring.py``) and by
``compare.py`` on the user's ``wer_*.txt`` files.
"""

import collections

VOTE_RULE = (
    "majority vote over whole hypothesis strings (token sequences); a tie between equally "
    "frequent hypotheses goes to the one produced by the earliest system in the given order"
)
ORACLE_RULE = (
    "per utterance the hypothesis of the system with the fewest edits (ties: earliest system "
    "in the given order); WRA oracle = utterance counted right if any system is exactly right"
)


def majority_vote(hyps_per_system):
    """Index of the system whose hypothesis wins the vote for one utterance.

    ``hyps_per_system``: one hypothesis per system (a token list or a string), in the given
    system order. Whole hypotheses are compared; the most frequent wins; among equally frequent
    hypotheses the one first produced by the earliest system wins.
    """
    keys = [tuple(h) if isinstance(h, list) else h for h in hyps_per_system]
    counts = collections.Counter(keys)
    if not counts:
        raise ValueError("no hypotheses to vote on")
    best = max(counts.values())
    return next(k for k, key in enumerate(keys) if counts[key] == best)


def oracle(edits_per_system):
    """Index of the system with the fewest edits on one utterance (ties: the earliest)."""
    return edits_per_system.index(min(edits_per_system))
