"""Decoding and scoring, identical to the SA pipeline.

Greedy rule: argmax at each real position, cut at the first ``</s>`` (id 2), then
``tokenizer.decode_ids(ids).split(" ")`` against ``word.split(" ")``, scored by SpeechBrain's
``ErrorRateStats`` with the hypothesis first. ``.split(" ")`` is kept on purpose: it is what produced
the SA baselines (an empty hypothesis is ``[""]``; ``<unk>`` decodes to ``" ⁇ "``, three tokens).
``WER_normalized`` (``.split()`` on both sides) is reported beside it, clearly named.

The decoder logits are teacher-forced, so every position after the first has seen the reference
prefix: this is the "teacher-forced greedy WER" that the SA pipeline's validation reported.
"""

from collections import defaultdict

from speechbrain.utils.metric_stats import ErrorRateStats

from local.combine import pick, rank_key, vote
from local.corpus import WORD_CATEGORIES
from local.files import atomic_write, write_json
from local.store import EOS
from local.tables import text_table


def greedy_ids(logits, lengths):
    """Token ids per utterance: argmax over ``lengths[b]`` positions, cut at the first </s>."""
    best = logits.argmax(-1).tolist()
    hyps = []
    for seq, n in zip(best, lengths.tolist()):
        seq = seq[: int(n)]
        hyps.append(seq[: seq.index(EOS)] if EOS in seq else seq)
    return hyps


def rates(edits, ref_words):
    """WER, SER, WRA (percent) and counts of a set of utterances from their per-utterance edits and
    reference words, summed as SpeechBrain's ``wer_summary`` sums them: WER = 100 * sum(edits) /
    sum(reference words) (0 without reference words), SER = 100 * share of utterances with at
    least one edit, WRA = 100 - SER (word recognition accuracy: the exact-match rate)."""
    edits, ref_words = list(edits), list(ref_words)
    n, total_edits, total_ref = len(edits), sum(edits), sum(ref_words)
    wrong = sum(1 for e in edits if e > 0)
    ser = 100.0 * wrong / n if n else float("nan")
    return {
        "n": n,
        "WER": 100.0 * total_edits / total_ref if total_ref else 0.0,
        "SER": ser,
        "WRA": 100.0 - ser,
        "edits": total_edits,
        "ref_words": total_ref,
        "erroneous": wrong,
    }


def _rates(scores):
    """``rates`` of ErrorRateStats' per-utterance score dicts."""
    return rates([s["num_edits"] for s in scores], [s["num_ref_tokens"] for s in scores])


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
        self.exact_pieces = {}  # utterance id -> whether the hypothesis' pieces are the reference's

    def append(self, ids, logits, lengths, words, categories, mics):
        """Decodes ``logits`` [B, U, V] (``lengths`` [B] real positions) and scores them."""
        self.append_ids(ids, greedy_ids(logits, lengths), words, categories, mics)

    def append_ids(self, ids, token_ids, words, categories, mics):
        """Scores hypotheses given as token id lists (and whether they are the reference's pieces)."""
        self.append_texts(ids, [self.tokenizer.decode_ids(h) for h in token_ids], words, categories, mics)
        for utt_id, hyp, word in zip(ids, token_ids, words):
            self.exact_pieces[utt_id] = list(hyp) == self.tokenizer.encode_as_ids(word)

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
        # The share of utterances whose pieces are exactly the reference's: the same for teacher-
        # forced and free-running greedy decoding of a causal model, where WRA (the word, whatever
        # its pieces) can differ between the two (docs/scoring.md). None for hypotheses given as text.
        exact = [self.exact_pieces[s["key"]] for s in self.wer.scores if s["key"] in self.exact_pieces]
        result["WRA_pieces"] = 100.0 * sum(exact) / len(exact) if exact and len(exact) == len(self.wer.scores) else None
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

    def edits(self):
        """utterance id -> (word edits, reference words), as ErrorRateStats scored them."""
        return {s["key"]: (s["num_edits"], s["num_ref_tokens"]) for s in self.wer.scores}


def write_utterances(path, systems):
    """Every system's result on every test utterance, for the study report (which then never
    re-parses the ``wer_test*.txt`` files): ``{"ids", "references", "categories", "mics",
    "ref_words", "systems": {name: {"hypotheses", "edits"}}}``, in the order of the first system."""
    first = next(iter(systems.values()))
    ids = list(first.edits())
    data = {
        "ids": ids,
        "references": [first.references[i] for i in ids],
        "categories": [first.groups[i][0] for i in ids],
        "mics": [first.groups[i][1] for i in ids],
        "ref_words": [first.edits()[i][1] for i in ids],
        "systems": {},
    }
    for name, scores in systems.items():
        edits = scores.edits()
        if set(edits) != set(ids):
            raise ValueError(f"system {name} was not scored on the same utterances as {next(iter(systems))}")
        data["systems"][name] = {"hypotheses": [scores.hypotheses[i] for i in ids], "edits": [edits[i][0] for i in ids]}
    write_json(path, data, indent=None)


def majority_vote(systems, tokenizer, rank):
    """Word-level majority vote of several systems on the same utterances (``combine.VOTE_RULE``):
    per utterance the most frequent whole hypothesis wins; a tie goes to the hypothesis of the
    best-ranked system (``rank``: name -> ``combine.rank_key`` of its accuracy and mean
    log-probability on the fold's training audio, never on the test, or the accuracy alone; a
    system without one ranks last), then the alphabetically first name. Returns (SystemScores,
    number of tied utterances)."""
    names = sorted(systems)
    rank = [r if isinstance(r, tuple) else rank_key(r) for r in (rank.get(n) for n in names)]
    voted, ties = SystemScores(tokenizer), 0
    first = systems[names[0]]
    for utt_id in first.hypotheses:
        texts = [systems[n].hypotheses[utt_id] for n in names]
        top = vote([t.split(" ") for t in texts])
        ties += len(top) > 1
        winner = texts[pick(top, rank, names)]
        category, mic = first.groups[utt_id]
        voted.append_texts([utt_id], [winner], [first.references[utt_id]], [category], [mic])
    return voted, ties


def teacher_ranks(info):
    """``teacher_<M>`` -> the ``combine.rank_key`` of teacher model M in a fold's ranking
    (``test_results.json``'s ``teacher_ranking``: its accuracy and mean log-probability on the
    fold's training audio; ``teacher_accuracy`` alone for a run made before it): the vote's tie-break."""
    ranking = info.get("teacher_ranking") or {m: {"accuracy": a} for m, a in info.get("teacher_accuracy", {}).items()}
    return {f"teacher_{m}": rank_key(r["accuracy"], r.get("mean_logprob")) for m, r in ranking.items()}


def results_table(results):
    """The log's table of WER / CER / WRA per system."""
    return text_table(
        ["system", "WER", "CER", "WRA", "n"],
        [[name, f"{r['WER']:.2f}", f"{r['CER']:.2f}", f"{r['WRA']:.2f}", r["n"]] for name, r in results.items()],
    )
