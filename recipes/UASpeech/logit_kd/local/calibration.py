"""Statistics of the SA models' decodes that decide how much an ensemble or a student can gain, from
the real cross-testing files or from a synthetic tree, computed the same way for both.

For an audio speaker decoded by the 14 other SA models (each model's hypothesis per utterance):

- ``WRA mean`` / ``WRA best``: word recognition accuracy of the average and of the best model;
- ``vote - best``: the order-free majority vote (``combine.vote``, ties broken by each model's
  accuracy) minus the best model, in WRA points (what voting adds over the best single model);
- ``phi``: the mean correlation (phi coefficient) of two models' per-utterance errors;
- ``not a list word``: the share of wrong hypotheses that are no word of the block's list;
- ``first piece right``: among wrong hypotheses of words of two or more tokenizer pieces, the share
  whose first piece is the reference's (how close the wrong decodes are);
- ``oracle``: the WRA of "right if any model is right" (an upper bound of any word-level
  combination of these decodes, not a system);
- ``learned-confusion fusion``: the WRA of a word-level naive-Bayes fusion that has learned each model's
  confusions (``confusion_fusion``) on the *teacher* speakers' audio only. It says how much the
  pattern of wrong words gives the reference away: on the real files it stays well below the
  oracle; a synthetic tree whose wrong words identify the reference (an earlier generator drew
  them from one list per reference shared by every model) puts it far above, and a student
  trained on such a tree learns that answer where every teacher is wrong;
- ``fusion, pieces known``: the same fusion told how many tokenizer pieces the reference has (its
  words restricted to those of that length), which a teacher-forced decode shows a student
  (U = pieces + 1): on a short word list that number narrows the candidates far more than on the
  real list of 255 words.

The real files are beam search + CTC + LM decodes of the audio; a synthetic tree's decodes are the
teacher-forced greedy decodes of its logits (``scoring.greedy_ids``): the statistics compare what
each source offers a combination, not two identical procedures.
"""

import itertools
import json

import numpy as np
import torch

from local.combine import pick, vote
from local.folds import teacher_speakers
from local.layout import pair_files
from local.scoring import greedy_ids

STATISTICS = (
    "WRA mean",
    "WRA best",
    "vote - best",
    "phi",
    "not a list word",
    "first piece right",
    "oracle",
    "learned-confusion fusion",
    "fusion, pieces known",
)
# what a word-level fusion of the fold's models could reach: the oracle (any model right) and the
# learned-confusion fusion (fitted on the teacher speakers' decodes, so only where they are at hand)
FUSION_STATISTICS = ("oracle", "learned-confusion fusion", "fusion, pieces known")
# add-one smoothing of each model's P(output | reference) (see confusion_fusion)
SMOOTHING = 1.0


def speaker_statistics(decodes, speaker, list_words, first_piece, fusion=True):
    """The statistics of one audio speaker. ``decodes``: {(model, audio speaker): {utt_id: (hypothesis
    text, reference text)}} of every pair there is (the learned-confusion fusion is fitted on the other
    speakers' audio); the statistics are of the other 14 models on ``speaker``'s audio.
    ``list_words``: the block's words; ``first_piece(text)``: the first tokenizer piece of a text
    (None if it has none). ``fusion=False`` leaves out ``FUSION_STATISTICS`` (a folder without the
    teacher speakers' decodes, on which the fusion learns)."""
    models = fold_models(decodes, speaker)
    ids = sorted(set.intersection(*(set(decodes[(m, speaker)]) for m in models)))
    hyps = {m: {i: decodes[(m, speaker)][i][0] for i in ids} for m in models}
    refs = {i: decodes[(models[0], speaker)][i][1] for i in ids}
    right = np.array([[hyps[m][i] == refs[i] for i in ids] for m in models], dtype=float)
    wra = right.mean(1) * 100.0
    phis = []
    for a, b in itertools.combinations(range(len(models)), 2):
        if right[a].std() > 0 and right[b].std() > 0:
            phis.append(float(np.corrcoef(right[a], right[b])[0, 1]))
    rank = list(right.mean(1))
    voted = [float(hyps[models[pick(vote([hyps[m][i] for m in models]), rank, models)]][i] == refs[i]) for i in ids]
    wrong = [(hyps[m][i], refs[i]) for m in models for i in ids if hyps[m][i] != refs[i]]
    multi = [(h, r) for h, r in wrong if first_piece.multi(r)]
    out = {
        "WRA mean": float(wra.mean()),
        "WRA best": float(wra.max()),
        "vote - best": 100.0 * float(np.mean(voted)) - float(wra.max()),
        "phi": float(np.mean(phis)) if phis else float("nan"),
        "not a list word": 100.0 * sum(h not in list_words for h, _ in wrong) / max(1, len(wrong)),
        "first piece right": 100.0 * sum(first_piece(h) == first_piece(r) for h, r in multi) / max(1, len(multi)),
        "models": len(models),
        "utterances": len(ids),
    }
    if fusion:
        fused = confusion_fusion(decodes, speaker)
        fused_known = confusion_fusion(decodes, speaker, pieces=first_piece.count)
        out["oracle"] = 100.0 * float(right.max(0).mean())
        out["learned-confusion fusion"] = 100.0 * float(np.mean([fused[i] == refs[i] for i in ids]))
        out["fusion, pieces known"] = 100.0 * float(np.mean([fused_known[i] == refs[i] for i in ids]))
    return out


def fold_models(decodes, speaker):
    """The models of ``speaker``'s fold (the 14 others, ``all_others``) that decoded its audio."""
    return [m for m in teacher_speakers(speaker, "all_others") if (m, speaker) in decodes]


def confusion_fusion(decodes, speaker, smoothing=SMOOTHING, pieces=None):
    """{utt_id: fused word} of ``speaker``'s audio by a word-level naive-Bayes fusion of its fold's
    models. Each model's P(output | reference) is counted on its decodes of the *teacher* speakers'
    audio only (the 14 others but itself; nothing of ``speaker``), with add-``smoothing`` over the
    outputs that model produced there plus one slot for an output it never produced; an
    utterance's fused word is the word of the teacher speakers' list that maximises the product of
    the models' P(their output | word) (a uniform prior; ties to the alphabetically first word).
    ``pieces`` (text -> its number of tokenizer pieces), when given, restricts the words to those of
    the reference's number of pieces: what a teacher-forced decode shows (U = pieces + 1)."""
    models = fold_models(decodes, speaker)
    teachers = teacher_speakers(speaker, "all_others")
    seen = {m: [d for s in teachers if s != m and (m, s) in decodes for d in decodes[(m, s)].values()] for m in models}
    words = sorted({ref for pairs in seen.values() for _, ref in pairs})
    column = {w: k for k, w in enumerate(words)}
    ids = sorted(set.intersection(*(set(decodes[(m, speaker)]) for m in models)))
    score = np.zeros((len(ids), len(words)))
    for m in models:
        outputs = {h: k for k, h in enumerate(sorted({h for h, _ in seen[m]}))}
        counts = np.zeros((len(outputs) + 1, len(words)))  # the last row: an output never seen
        for hyp, ref in seen[m]:
            counts[outputs[hyp], column[ref]] += 1
        log_p = np.log(counts + smoothing) - np.log(counts.sum(0) + smoothing * counts.shape[0])
        rows = [outputs.get(decodes[(m, speaker)][i][0], len(outputs)) for i in ids]
        score += log_p[rows]
    if pieces is not None:
        length = np.array([pieces(w) for w in words])
        wanted = np.array([pieces(decodes[(models[0], speaker)][i][1]) for i in ids])
        score = np.where(length[None, :] == wanted[:, None], score, -np.inf)
    return {i: words[k] for i, k in zip(ids, score.argmax(1))}


class FirstPiece:
    """The first piece of a text under a SentencePiece tokenizer; ``multi``: two pieces or more."""

    def __init__(self, tokenizer):
        self.sp = tokenizer

    def __call__(self, text):
        pieces = self.sp.encode_as_ids(text) if text.strip() else []
        return pieces[0] if pieces else None

    def multi(self, text):
        return self.count(text) >= 2

    def count(self, text):
        return len(self.sp.encode_as_ids(text))


def real_decodes(files):
    """{(model, speaker): {utt: (hyp, ref)}} of the real files (``files``: the {(model, speaker):
    WerFile} of ``word_fusion.read_cross_testing``)."""
    return {key: {u.id: (" ".join(u.hyp), " ".join(u.ref)) for u in f.utterances} for key, f in files.items()}


def tree_decodes(logit_root, tokenizer, pairs):
    """The same for a logit tree: each (model, speaker) pair's teacher-forced greedy decode."""
    out = {}
    for model, speaker in pairs:
        files = pair_files(logit_root, model, speaker)
        meta = json.loads(files["metadata"].read_text())
        logits = torch.load(files["decoder"], weights_only=True)
        if isinstance(logits, torch.Tensor):
            logits = list(logits.unbind(0))
        lengths = torch.tensor([z.shape[0] for z in logits])
        decoded = greedy_ids(torch.nn.utils.rnn.pad_sequence(list(logits), batch_first=True), lengths)
        out[(model, speaker)] = {
            utt_id: (tokenizer.decode_ids(ids), word)
            for utt_id, word, ids in zip(meta["utterance_ids"], meta["target_words"], decoded)
        }
    return out
