"""Decoding and scoring, identical to the SA pipeline (DESIGN §5).

Greedy rule: argmax at each real position, cut at the first ``</s>`` (id 2), then
``tokenizer.decode_ids(ids).split(" ")`` against ``word.split(" ")``, scored by SpeechBrain's
``ErrorRateStats`` with the hypothesis first. ``.split(" ")`` is kept on purpose: it is what produced
the SA baselines (an empty hypothesis is ``[""]``; ``<unk>`` decodes to ``" ⁇ "``, three tokens).
``WER_normalized`` (``.split()`` on both sides) is reported beside it, clearly named.

The decoder logits are teacher-forced, so every position after the first has seen the reference
prefix: this is the "teacher-forced greedy WER" that the SA pipeline's validation reported.
"""

from collections import defaultdict

from speechbrain.utils.edit_distance import wer_summary
from speechbrain.utils.metric_stats import ErrorRateStats

from local.corpus import WORD_CATEGORIES
from local.files import atomic_write
from local.store import EOS


def greedy_ids(logits, lengths):
    """Token ids per utterance: argmax over ``lengths[b]`` positions, cut at the first </s>."""
    best = logits.argmax(-1).tolist()
    hyps = []
    for seq, n in zip(best, lengths.tolist()):
        seq = seq[: int(n)]
        hyps.append(seq[: seq.index(EOS)] if EOS in seq else seq)
    return hyps


def _rates(scores):
    """WER, SER, WRA (percent) and counts of per-utterance ErrorRateStats scores."""
    summary = wer_summary(scores)
    return {
        "WER": summary["WER"],
        "SER": summary["SER"],
        "WRA": 100.0 - summary["SER"],
        "n": summary["num_scored_sents"],
        "edits": summary["num_edits"],
        "ref_words": summary["num_scored_tokens"],
    }


class SystemScores:
    """The scores of one system (the student or a baseline) on one set of utterances."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.wer = ErrorRateStats()
        self.cer = ErrorRateStats(split_tokens=True, space_token=" ")
        self.wer_normalized = ErrorRateStats()
        self.groups = {}  # utterance id -> (category, mic)
        self.hypotheses = {}
        self.references = {}

    def append(self, ids, logits, lengths, words, categories, mics):
        """Decodes ``logits`` [B, U, V] (``lengths`` [B] real positions) and scores them."""
        self.append_ids(ids, greedy_ids(logits, lengths), words, categories, mics)

    def append_ids(self, ids, token_ids, words, categories, mics):
        """Scores hypotheses given as token id lists."""
        self.append_texts(ids, [self.tokenizer.decode_ids(h) for h in token_ids], words, categories, mics)

    def append_texts(self, ids, hyp_texts, words, categories, mics):
        """Scores hypotheses given as decoded text (``.split(" ")`` into words, like the SA pipeline)."""
        hyps = [h.split(" ") for h in hyp_texts]
        refs = [w.split(" ") for w in words]
        self.wer.append(ids, hyps, refs)
        self.cer.append(ids, hyps, refs)
        self.wer_normalized.append(ids, [h.split() for h in hyp_texts], [w.split() for w in words])
        for utt_id, text, word, category, mic in zip(ids, hyp_texts, words, categories, mics):
            self.groups[utt_id] = (category, mic)
            self.hypotheses[utt_id] = text
            self.references[utt_id] = word

    def __len__(self):
        return len(self.wer.scores)

    def summary(self):
        """WER, CER, WRA, SER (percent), WER_normalized, and per word category and microphone."""
        result = _rates(self.wer.scores)
        result["CER"] = self.cer.summarize("error_rate")
        result["WER_normalized"] = self.wer_normalized.summarize("error_rate")
        by_category, by_mic = defaultdict(list), defaultdict(list)
        for score in self.wer.scores:
            category, mic = self.groups[score["key"]]
            by_category[category].append(score)
            by_mic[mic].append(score)
        order = {c: i for i, c in enumerate(WORD_CATEGORIES)}
        result["by_category"] = {c: _rates(by_category[c]) for c in sorted(by_category, key=order.get)}
        result["by_mic"] = {m: _rates(by_mic[m]) for m in sorted(by_mic)}
        return result

    def write_stats(self, path):
        """``wer_test.txt`` in SpeechBrain's format, so it diffs against existing ``wer_*.txt``."""
        atomic_write(path, self.wer.write_stats)


def majority_vote(systems, tokenizer):
    """Word-level majority vote of several systems on the same utterances: per utterance the most
    frequent whole hypothesis wins; a tie goes to the system listed first (``compare.majority_vote``)."""
    from local.compare import majority_vote as vote

    voted = SystemScores(tokenizer)
    first = systems[0]
    for utt_id in first.hypotheses:
        texts = [s.hypotheses[utt_id] for s in systems]
        winner = texts[vote([t.split(" ") for t in texts])]
        category, mic = first.groups[utt_id]
        voted.append_texts([utt_id], [winner], [first.references[utt_id]], [category], [mic])
    return voted


def format_table(results):
    """A small text table of WER / CER / WRA per system for the log."""
    lines = [f"{'system':<24} {'WER':>7} {'CER':>7} {'WRA':>7} {'n':>6}"]
    for name, r in results.items():
        lines.append(f"{name:<24} {r['WER']:7.2f} {r['CER']:7.2f} {r['WRA']:7.2f} {r['n']:6d}")
    return "\n".join(lines)
