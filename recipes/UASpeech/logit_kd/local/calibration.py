"""Statistics of the SA models' decodes that decide how much an ensemble or a student can gain, from
the real cross-testing files or from a synthetic tree, computed the same way for both.

For an audio speaker decoded by several SA models (each model's hypothesis per utterance):

- ``WRA mean`` / ``WRA best``: word recognition accuracy of the average and of the best model;
- ``vote - best``: the order-free majority vote (``combine.vote``, ties broken by each model's
  accuracy) minus the best model, in WRA points (what voting adds over the best single model);
- ``phi``: the mean correlation (phi coefficient) of two models' per-utterance errors;
- ``not a list word``: the share of wrong hypotheses that are no word of the block's list;
- ``first piece right``: among wrong hypotheses of words of two or more tokenizer pieces, the share
  whose first piece is the reference's (how close the wrong decodes are).

The real files are beam search + CTC + LM decodes of the audio; a synthetic tree's decodes are the
teacher-forced greedy decodes of its logits (``scoring.greedy_ids``): the statistics compare what
each source offers a combination, not two identical procedures.
"""

import itertools

import numpy as np
import torch

from local.combine import pick, vote
from local.layout import pair_files
from local.scoring import greedy_ids

STATISTICS = ("WRA mean", "WRA best", "vote - best", "phi", "not a list word", "first piece right")


def speaker_statistics(hyps, refs, list_words, first_piece):
    """The statistics of one audio speaker. ``hyps``: {model: {utt_id: hypothesis text}}; ``refs``:
    {utt_id: reference text}; ``list_words``: the block's words; ``first_piece(text)``: the first
    tokenizer piece of a text (None if it has none)."""
    models = sorted(hyps)
    ids = sorted(set.intersection(*(set(h) for h in hyps.values())))
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
    return {
        "WRA mean": float(wra.mean()),
        "WRA best": float(wra.max()),
        "vote - best": 100.0 * float(np.mean(voted)) - float(wra.max()),
        "phi": float(np.mean(phis)) if phis else float("nan"),
        "not a list word": 100.0 * sum(h not in list_words for h, _ in wrong) / max(1, len(wrong)),
        "first piece right": 100.0 * sum(first_piece(h) == first_piece(r) for h, r in multi) / max(1, len(multi)),
        "models": len(models),
        "utterances": len(ids),
    }


class FirstPiece:
    """The first piece of a text under a SentencePiece tokenizer; ``multi``: two pieces or more."""

    def __init__(self, tokenizer):
        self.sp = tokenizer

    def __call__(self, text):
        pieces = self.sp.encode_as_ids(text) if text.strip() else []
        return pieces[0] if pieces else None

    def multi(self, text):
        return len(self.sp.encode_as_ids(text)) >= 2


def real_hypotheses(files, speaker):
    """({model: {utt: hyp}}, {utt: ref}) of the real files of every model on ``speaker``'s audio
    (``files``: word_fusion.read_cross_testing's {(model, speaker): WerFile})."""
    hyps, refs = {}, {}
    for (model, spk), parsed in files.items():
        if spk != speaker:
            continue
        hyps[model] = {u.id: " ".join(u.hyp) for u in parsed.utterances}
        refs.update({u.id: " ".join(u.ref) for u in parsed.utterances})
    return hyps, refs


def tree_hypotheses(logit_root, tokenizer, models, speaker):
    """The same for a logit tree: each model's teacher-forced greedy decode of ``speaker``'s audio."""
    import json

    hyps, refs = {}, {}
    for model in models:
        files = pair_files(logit_root, model, speaker)
        meta = json.loads(files["metadata"].read_text())
        logits = torch.load(files["decoder"], weights_only=True)
        if isinstance(logits, torch.Tensor):
            logits = list(logits.unbind(0))
        decoded = {}
        for utt_id, word, z in zip(meta["utterance_ids"], meta["target_words"], logits):
            ids = greedy_ids(z.unsqueeze(0), torch.tensor([z.shape[0]]))[0]
            decoded[utt_id] = tokenizer.decode_ids(ids)
            refs[utt_id] = word
        hyps[model] = decoded
    return hyps, refs
