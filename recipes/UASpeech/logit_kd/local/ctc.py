"""Free-running CTC decoding of the held-out speaker's audio.

The decoder logits are teacher-forced, so their greedy WER has seen the reference prefix. The CTC
logits are not: decoding them is an honest, free-running figure, reported beside the
teacher-forced ones under its own name (``free_running_ctc`` in test_results.json). Two decoders:

- ``greedy``: SpeechBrain's ``ctc_greedy_decode`` (argmax per frame, repeats merged, blanks
  removed), then ``decode_ids(...).split(" ")`` like every other system;
- ``closed_list``: the word of the block's word list with the highest CTC likelihood, the usual
  isolated-word set-up of UASpeech. The list is the corpus's, as the teacher speakers' metadata
  give it (all 255 words of block B3 on the real files), never the held-out speaker's test
  references (F03, for one, has only 231 words in its files).

Systems: ``sa_self`` (the held-out speaker's own SA model) and, with cross streams, ``mean`` (the
teacher models on the held-out audio fused frame by frame: the mean of their frame posteriors;
the same audio gives them the same frames). CTC files are large (about 38 GB for the corpus), so
they are read lazily, memory-mapped, one utterance at a time, and only the held-out speaker's.
"""

import json

import torch
import torch.nn.functional as F
from speechbrain.decoders.ctc import ctc_greedy_decode

from local.layout import describe_pair, pair_files
from local.scoring import SystemScores
from local.store import LogitStoreError, load_tensors

BLANK = 0  # <unk> = CTC blank = pad = 0 in the SA models


def ctc_file(logit_root, model, speaker):
    return pair_files(logit_root, model, speaker)["ctc"]


def read_ctc(logit_root, model, speaker, vocab_size):
    """utterance id -> [T, V] CTC logits (memory-mapped) of one pair, counts and shapes checked."""
    files = pair_files(logit_root, model, speaker)
    path = files["ctc"]
    where = describe_pair(model, speaker)
    meta = json.loads(files["metadata"].read_text())
    data = load_tensors(path, where)
    if not isinstance(data, (list, tuple)):
        raise LogitStoreError(f"CTC file {path} ({where}) holds a {type(data).__name__}, not a list of [T, V] tensors")
    ids, frames = meta["utterance_ids"], meta.get("ctc_frame_lens")
    if len(data) != len(ids):
        raise LogitStoreError(
            f"CTC file {path} ({where}) holds {len(data)} utterances but its metadata lists {len(ids)}"
        )
    for i, (utt_id, logits) in enumerate(zip(ids, data)):
        at = f"CTC file {path} ({where}), utterance {utt_id}"
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
            raise LogitStoreError(f"{at}: expected a float [T, V] tensor")
        if logits.shape[1] != vocab_size:
            raise LogitStoreError(f"{at}: vocab size {logits.shape[1]}, the tokenizer has {vocab_size}")
        if frames is not None and logits.shape[0] != frames[i]:
            raise LogitStoreError(f"{at}: {logits.shape[0]} frames, but ctc_frame_lens says {frames[i]}")
    return dict(zip(ids, data))


class ClosedList:
    """CTC scoring of a fixed word list: the word whose pieces the CTC posteriors make likeliest."""

    def __init__(self, words, tokenizer):
        self.words = sorted(words)
        pieces = [tokenizer.encode_as_ids(w) for w in self.words]
        # Each candidate only needs the blank and its own pieces: gather those columns, so that
        # scoring 255 candidates costs [T, 255, <= 8] rather than [T, 255, V].
        width = 1 + max(len(set(p)) for p in pieces)
        self.columns = torch.zeros(len(pieces), width, dtype=torch.long)  # column 0 = blank
        self.labels = torch.zeros(len(pieces), max(len(p) for p in pieces), dtype=torch.long)
        self.lengths = torch.tensor([len(p) for p in pieces])
        for c, p in enumerate(pieces):
            unique = list(dict.fromkeys(p))  # a repeated piece keeps one label: CTC needs a blank between
            self.columns[c, 1 : 1 + len(unique)] = torch.tensor(unique)
            self.labels[c, : len(p)] = torch.tensor([1 + unique.index(t) for t in p])

    def __call__(self, logp):
        """The best word for ``logp`` [T, V] (log-probabilities)."""
        T = logp.shape[0]
        sub = logp[:, self.columns]  # [T, C, width]
        nll = F.ctc_loss(
            sub,
            self.labels,
            torch.full((len(self.words),), T),
            self.lengths,
            blank=0,
            reduction="none",
            zero_infinity=False,
        )
        return self.words[int(torch.argmin(nll))]


def ctc_systems(logit_root, held_out, teachers, cross):
    """The CTC systems whose files are on disk: ``{name: [models]}``."""
    systems = {}
    if ctc_file(logit_root, held_out, held_out).is_file():
        systems["sa_self"] = [held_out]
    if cross and all(ctc_file(logit_root, m, held_out).is_file() for m in teachers):
        systems["mean"] = list(teachers)
    return systems


def score_ctc(logit_root, held_out, systems, test_items, tokenizer, word_list):
    """``{system: {"greedy": SystemScores, "closed_list": SystemScores}}`` on the test items;
    ``word_list``: the closed list of the block (the teacher speakers' words)."""
    vocab = tokenizer.vocab_size()
    models = sorted({m for ms in systems.values() for m in ms})
    logits = {m: read_ctc(logit_root, m, held_out, vocab) for m in models}
    words = ClosedList(set(word_list), tokenizer)
    scores = {name: {"greedy": SystemScores(tokenizer), "closed_list": SystemScores(tokenizer)} for name in systems}
    for utt_id, item in test_items.items():
        meta = ([utt_id], [item["word"]], [item["category"]], [item["mic"]])
        for name, members in systems.items():
            frames = []
            for m in members:
                if utt_id not in logits[m]:
                    raise LogitStoreError(f"CTC file {ctc_file(logit_root, m, held_out)} lacks utterance {utt_id}")
                z = logits[m][utt_id].float()
                if not bool(torch.isfinite(z).all()):
                    raise LogitStoreError(
                        f"CTC file {ctc_file(logit_root, m, held_out)}, utterance {utt_id}: NaN or Inf logits"
                    )
                frames.append(F.log_softmax(z, -1))
            if len({f.shape[0] for f in frames}) != 1:
                raise LogitStoreError(f"utterance {utt_id}: the CTC frame counts of {members} differ on the same audio")
            # frame by frame: log of the mean posterior (one model: its own log-posterior)
            logp = torch.logsumexp(torch.stack(frames), 0) - torch.log(torch.tensor(float(len(frames))))
            hyp = ctc_greedy_decode(logp.unsqueeze(0), torch.ones(1), blank_id=BLANK)[0]
            scores[name]["greedy"].append_ids(meta[0], [hyp], *meta[1:])
            scores[name]["closed_list"].append_texts(meta[0], [words(logp)], *meta[1:])
    return scores
