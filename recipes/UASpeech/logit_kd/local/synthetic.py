"""A synthetic SA logit extraction, in exactly the on-disk format of the real one.

The real decoder logits are not public, so the recipe ships this generator: it is the embedded
default of every fold (``demo`` scale, generated on first use) and the input of the benchmarks
(``full`` scale: 15 speakers, the real utterance counts and token lengths, vocab 5000).

    <out>/tokenizer.model                                     # SentencePiece, unk 0, <s> 1, </s> 2
    <out>/logit_extraction/<MODEL>/<SPK>/<SPK>_decoder_logits.pt
    <out>/logit_extraction/<MODEL>/<SPK>/<SPK>_ctc_logits.pt  # only with ctc=True
    <out>/logit_extraction/<MODEL>/<SPK>/<SPK>_metadata.json
    <out>/logit_extraction/extraction_summary.json
    <out>/SYNTHETIC.json                                      # what made it; marks it as synthetic

How the logits are made. Each SA model first *decodes* each utterance, and its teacher-forced
logits are then written so that their greedy decode is that hypothesis:

- the hypothesis is the reference with the pair's accuracy: the speaker's accuracy under the other
  SA models, measured on the real cross-testing files (``CROSS_ACCURACY``), spread over the models
  as the real ones are (``MODEL_SPREAD``); a model on its own speaker's audio is better
  (``OWN_BONUS``, not calibrated: the real files hold no such decode);
- errors are correlated across models through each utterance's shared difficulty (its production's
  and its own), tuned so that the models' errors correlate as in the real files (phi, by group);
- a wrong hypothesis is, with the real shares of the speaker's intelligibility group, a near miss
  (a multi-piece word whose first piece is right), no word of the list (empty, <unk>, pieces no
  word uses), or a word of the reference's *neighbourhood*: every other word of the list, weighted
  by how alike the two sound (shared letters, first letter, length in letters and in pieces;
  symmetric), drawn afresh per (model, utterance). Models that mishear one utterance often hear the same word (what that
  utterance sounds like), so that, as on the real files, a vote of the models adds little over the
  best one; but no word identifies a reference: a wrong word points back to every word like it.
  Generator 7 drew wrong words from one short list per reference shared by every model and speaker,
  so the *set* of wrong words named the reference: a student of 14 teachers was right where all
  of them were wrong (cross M01: 64 WRA against an oracle of 40), and a naive-Bayes fusion fitted
  on the teacher speakers scored above the oracle (``calibrate_demo.py`` now measures that fusion
  against the real files' figure);
- in the logits the hypothesis' pieces are on top (by a larger margin when it is right) and the
  pieces of words drawn from *its* neighbourhood are the runner-ups; nothing singles out the
  reference when the model is wrong (an earlier generator boosted it, which flattered the student).

``calibrate_demo.py`` prints these statistics of the demo tree beside the real ones, and a test
keeps them within stated tolerances. What the demo cannot show: how confident real SA models are,
and what their runner-up pieces hold (the real files keep only the final words), so the size of a
student's gain on it says little about its gain on real logits; it shows that the recipe runs, that
the students learn, and the direction of the comparisons, on data shaped like the real decodes.

Command line: ``make_demo_tree.py``.
"""

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from local.corpus import HELD_OUT, INTELLIGIBILITY, MICS, SPEAKERS, intelligibility_group
from local.files import write_json
from local.layout import SUMMARY_FILE, pair_files

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 9
DEMO_SEED = 2026

# Word lists of the synthetic corpus (block B3). Keys follow UASpeech: D0-D9, LA-LZ, C1-C19,
# CW1-CW100, UW1-UW100. The words are ours; only their categories mirror the corpus.
DIGITS = "ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE".split()
LETTERS = (
    "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIET KILO LIMA MIKE NOVEMBER "
    "OSCAR PAPA QUEBEC ROMEO SIERRA TANGO UNIFORM VICTOR WHISKEY XRAY YANKEE ZULU"
).split()
COMMANDS = (
    "COMMAND BACKSPACE DELETE ENTER ESCAPE SHIFT CONTROL TAB SPACE UP DOWN LEFT RIGHT "
    "HOME END COPY PASTE SENTENCE PARAGRAPH"
).split()
COMMON = (
    "THE OF AND TO A IN IS YOU THAT IT HE WAS FOR ON ARE AS WITH HIS THEY I AT BE THIS HAVE FROM "
    "OR ONE HAD BY WORD BUT NOT WHAT ALL WERE WE WHEN YOUR CAN SAID THERE USE AN EACH WHICH SHE DO "
    "HOW THEIR IF WILL WAY ABOUT MANY THEN THEM WRITE WOULD LIKE SO THESE HER LONG MAKE THING SEE "
    "HIM TWO HAS LOOK MORE DAY COULD GO COME DID NUMBER SOUND NO MOST PEOPLE MY OVER KNOW WATER "
    "THAN CALL FIRST WHO MAY DOWN SIDE BEEN NOW FIND ANY NEW WORK PART TAKE GET PLACE MADE"
).split()
_SYLLABLES = (
    "BA BE BI BO BU DA DE DI DO DU FA FE FI FO GA GE GO KA KE KI KO LA LE LI LO LU MA ME MI MO "
    "NA NE NI NO PA PE PI PO RA RE RI RO SA SE SI SO TA TE TI TO VA VE VI ZA ZE ZO SH CH TH ST "
    "ER AR OR IN ON EN AN UM OX IX"
).split()
# Pieces the closed word list never uses: the synthetic SA tokenizer learns them from these filler
# words (the real one is the 5000-piece LibriSpeech tokenizer, of which the 255 words use a few).
_FILLER = (
    "GARDEN RIVER MOUNTAIN WINDOW PAPER LETTER MOTHER FATHER BROTHER SISTER QUIETLY JOURNEY "
    "WHISPERED KINGDOM HARBOUR SILVER FOREST BEYOND THOUGHT NEVER ALWAYS PERHAPS CAPTAIN LADY "
    "HORSES YELLOW WONDERFUL SUDDENLY STRANGE BRIGHT VILLAGE CHURCH DOCTOR MORNING EVENING"
).split()


def _rng(seed, *names):
    """A torch generator seeded from a stable hash of (seed, names): same tree on every machine."""
    digest = hashlib.sha256("/".join([str(seed), *names]).encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def _pseudo_words(n, seed, tag):
    """n distinct upper-case pseudo-words made of syllables (deterministic)."""
    gen = _rng(seed, "pseudo", tag)
    words, seen = [], set()
    while len(words) < n:
        k = 2 + int(torch.randint(0, 3, (1,), generator=gen))
        word = "".join(_SYLLABLES[int(i)] for i in torch.randint(0, len(_SYLLABLES), (k,), generator=gen))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def word_list(scale, seed):
    """Word key -> word. ``demo``: 44 words over the five categories; ``full``: all 255."""
    uncommon = _pseudo_words(100, seed, "UW")
    table = {f"D{i}": w for i, w in enumerate(DIGITS)}
    table.update({f"L{chr(65 + i)}": w for i, w in enumerate(LETTERS)})
    table.update({f"C{i + 1}": w for i, w in enumerate(COMMANDS)})
    table.update({f"CW{i + 1}": w for i, w in enumerate(COMMON)})
    table.update({f"UW{i + 1}": w for i, w in enumerate(uncommon)})
    if scale == "demo":
        keep = (
            [f"D{i}" for i in range(10)]
            + [f"L{c}" for c in "ABCDEFGH"]
            + [f"C{i}" for i in range(1, 7)]
            + [f"CW{i}" for i in range(1, 11)]
            + [f"UW{i}" for i in range(1, 11)]
        )
        table = {k: table[k] for k in keep}
    return table


def demo_word_keys(seed=DEMO_SEED):
    """{word key: word} of the demo tree's made-up uncommon words (UW1..UW100): no real UASpeech
    recording has these words, so a file whose references hold them comes from a demo tree."""
    return {f"UW{i + 1}": w for i, w in enumerate(_pseudo_words(100, seed, "UW"))}


def train_tokenizer(path, words, vocab_size, seed):
    """Trains a unigram SentencePiece model with the SA id convention (unk 0, <s> 1, </s> 2)."""
    import sentencepiece as spm

    filler = _FILLER + _pseudo_words(max(0, vocab_size * 6 - len(_FILLER)), seed, "filler")
    # The closed list is frequent (so most of its words are one to three pieces); filler words
    # give the tokenizer pieces that the closed list never uses.
    sentences = list(words) * 4 + filler
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    Path(path).write_bytes(model.getvalue())


# Calibration to the real SA outputs (the SA project's cross-testing files: every SA model decoding
# every other speaker with beam search + CTC + LM), measured by calibrate_demo.py:
# - the mean word accuracy of the other 14 SA models on each speaker's audio;
CROSS_ACCURACY = {
    "F02": 0.114, "F03": 0.062, "F04": 0.469, "F05": 0.716, "M01": 0.070, "M04": 0.029, "M05": 0.369,
    "M07": 0.207, "M08": 0.774, "M09": 0.740, "M10": 0.800, "M11": 0.323, "M12": 0.025, "M14": 0.680,
    "M16": 0.499,
}  # fmt: skip
# - the spread (log-odds) of the 14 other models' accuracies on one speaker: they take the evenly
#   spaced normal quantiles of this spread, in an order that mixes a model's own quality (a model
#   good on one speaker tends to be good on the others) with the pair's;
MODEL_SPREAD = 0.3
# - by the audio speaker's intelligibility group: the share of wrong decodes that are no word of the
#   list, and of wrong multi-piece words whose first piece is right (errors are closer to the
#   reference for intelligible speakers).
NOT_A_WORD = {"high": 0.15, "mid": 0.2, "low": 0.27, "very_low": 0.47}
FIRST_PIECE_RIGHT = {"high": 0.28, "mid": 0.064, "low": 0.039, "very_low": 0.019}
# - the latent correlation of two models' errors on one utterance, by group, tuned so that the mean
#   phi of the models' errors matches the real files (calibrate_demo.py prints both).
ERROR_CORRELATION = {"high": 0.7, "mid": 0.68, "low": 0.67, "very_low": 0.52}
MIC_SHARE = 0.8  # of an utterance's shared difficulty, the part common to the microphones of its production
# - by group, the breadth (temperature) of a word's confusion neighbourhood (``_Confusions``): small,
#   a wrong word is nearly always one of the few words most like the reference; large, any word of
#   the list. With AGREEMENT, tuned so that a naive-Bayes fusion that learns each model's confusions
#   on the teacher speakers gets from the wrong words what it gets on the real files.
CONFUSION_BREADTH = {"high": 0.2, "mid": 0.3, "low": 0.3, "very_low": 0.2}
# - by group, the chance that a model which mishears an utterance hears what the utterance sounds
#   like (``_sounds_like``, one neighbour per utterance, shared by the models) rather than its own
#   draw from the neighbourhood: wrong decodes agree with each other as much as on the real files,
#   where a vote of 14 models adds -2 to +4 WRA points over the best one.
AGREEMENT = {"high": 0.7, "mid": 0.45, "low": 0.5, "very_low": 0.6}
# - the similarity lost per piece of difference in length between two words (tokenizer pieces): a
#   teacher-forced decode shows how many pieces the reference has (U = pieces + 1), which on the
#   demo's 44 words narrows the candidates far more than on the real 255 (a fusion that knows it
#   would reach 55 WRA on M01 against 26 on the real files); confusions that keep the piece count
#   make that knowledge add about as much as on the real files (calibrate_demo.py). The demo's
#   confusions keep it more often than the real ones do (72 % against 49 %): the price of a short list.
PIECE_GAP = 0.45
# Not in the real files, so not calibrated: an SA model on its *own* speaker's audio (the diagonal)
# is better than the others by OWN_BONUS log-odds.
OWN_BONUS = 1.5


def pair_accuracy(model, speaker, seed=DEMO_SEED):
    """Expected word accuracy of SA model ``model`` on ``speaker``'s audio: the speaker's calibrated
    cross-model accuracy, shifted by the model's place among the speaker's other models (see
    MODEL_SPREAD), plus OWN_BONUS on the diagonal."""
    from statistics import NormalDist

    logit = math.log(CROSS_ACCURACY[speaker] / (1.0 - CROSS_ACCURACY[speaker]))
    if model == speaker:
        return 1.0 / (1.0 + math.exp(-(logit + OWN_BONUS)))
    others = [m for m in SPEAKERS if m != speaker]

    def score(m):
        quality = float(torch.randn(1, generator=_rng(seed, "model", m)))
        return quality + float(torch.randn(1, generator=_rng(seed, "pair", m, speaker)))

    order = sorted(others, key=score)
    rank = order.index(model) if model in order else len(order) // 2
    logit += MODEL_SPREAD * NormalDist().inv_cdf((rank + 0.5) / len(order))
    return 1.0 / (1.0 + math.exp(-logit))


def _utterances(speaker, words, scale, seed, metadata_dir):
    """(utt_id, word, ctc_frames) of a speaker, in ascending duration order like the real files."""
    if metadata_dir is not None:
        meta = json.loads((Path(metadata_dir) / f"{speaker}_metadata.json").read_text())
        return list(zip(meta["utterance_ids"], meta["target_words"], meta["ctc_frame_lens"]))
    gen = _rng(seed, "utterances", speaker)
    keys = list(words)
    if speaker == "F03":  # F03 lacks some words in the real corpus (231 of 255)
        drop = set(torch.randperm(len(keys), generator=gen)[: max(1, len(keys) * 24 // 255)].tolist())
        keys = [k for i, k in enumerate(keys) if i not in drop]
    slowness = 1.0 + (100.0 - INTELLIGIBILITY[speaker]) / 50.0
    utts = []
    for key in keys:
        for mic in MICS[speaker]:
            chars = len(words[key])
            if scale == "demo":  # short CTC sequences keep the optional demo CTC files small
                frames = 3 + chars + int(torch.randint(0, 3, (1,), generator=gen))
            else:
                frames = int(30 + 9 * chars * slowness + 20 * float(torch.rand(1, generator=gen)))
            utts.append((f"{speaker}_B3_{key}_{mic}", words[key], frames))
    utts.sort(key=lambda u: (u[2], u[0]))
    return utts


def similarity(a, b):
    """How alike two words sound, crudely and symmetrically: the share of letters they have in
    common, the same first letter, close lengths. What a confusion neighbourhood is made of."""
    shared = len(set(a) & set(b)) / len(set(a) | set(b))
    return shared + 0.5 * (a[:1] == b[:1]) - 0.15 * abs(len(a) - len(b))


class _Confusions:
    """What an SA model may hear instead of a word: its *neighbourhood*, every other word of the list
    weighted by ``exp((similarity - PIECE_GAP * difference in pieces) / CONFUSION_BREADTH[group])``
    (symmetric, so a wrong word points back to the words like it, not to one reference); the pieces
    that no word of the list uses (distractors: a LibriSpeech-sized tokenizer has many); and, per
    word, the words that share its first piece. Each wrong word is drawn afresh per (model,
    utterance): nothing is a fixed list of one reference's confusions shared by every model
    (generator 7 had such lists, and a student or a naive-Bayes fusion read the reference off the
    set of wrong words)."""

    def __init__(self, sp, words, seed):
        self.sp = sp
        self.vocab = sp.vocab_size()
        self.words = sorted(words)
        self.pieces = {w: sp.encode_as_ids(w) for w in self.words}
        used = sorted({t for p in self.pieces.values() for t in p} | {2})
        mask = torch.ones(self.vocab, dtype=torch.bool)
        mask[torch.tensor(used)] = False
        mask[:3] = False
        self.distractors = torch.nonzero(mask).flatten().tolist() or used
        self.same_first = {
            w: [o for o in self.words if o != w and self.pieces[o][0] == self.pieces[w][0]] for w in self.words
        }
        self._kernels = {}

    def neighbourhood(self, word, group):
        """(words, weights) a wrong decode of ``word`` is drawn from: every word that a teacher-forced
        decode can spell out (no more pieces than the reference's positions) and, for a multi-piece
        word, whose first piece differs (a right first piece is a near miss, drawn apart)."""
        if (word, group) not in self._kernels:
            first, n = self.pieces[word][0], len(self.pieces[word])
            others = [
                o
                for o in self.words
                if o != word and len(self.pieces[o]) <= n + 1 and (n < 2 or self.pieces[o][0] != first)
            ]
            weights = torch.tensor(
                [
                    math.exp(
                        (similarity(word, o) - PIECE_GAP * abs(len(self.pieces[o]) - n)) / CONFUSION_BREADTH[group]
                    )
                    for o in others
                ]
            )
            self._kernels[(word, group)] = (others, weights)
        return self._kernels[(word, group)]

    def wrong_word(self, word, near_miss, not_a_word, group, gen, heard=None):
        """A wrong hypothesis for ``word``: a word sharing its first piece (``near_miss``, when the
        word has several pieces), else no word of the list (``not_a_word``: empty, <unk> or made of
        distractor pieces), else ``heard`` (a word of its neighbourhood that the audio sounds like)
        or a word drawn from its neighbourhood."""
        first = self.pieces[word][0]
        if near_miss and len(self.pieces[word]) >= 2:
            if self.same_first[word] and float(torch.rand(1, generator=gen)) < 0.5:
                return self.pieces[
                    self.same_first[word][int(torch.randint(0, len(self.same_first[word]), (1,), generator=gen))]
                ]
            return [first] + self._distractors(1, gen)
        if not_a_word:
            kind = float(torch.rand(1, generator=gen))
            if kind < 0.25:
                return []  # an empty hypothesis
            if kind < 0.4:
                return [0]  # <unk>, which decodes to " ⁇ "
            pieces = self._distractors(1 + int(torch.randint(0, 3, (1,), generator=gen)), gen)
            return pieces if pieces[0] != first else pieces[::-1]
        heard = heard or self.neighbour(word, group, gen)
        return self.pieces[heard] if heard else self._distractors(1, gen)

    def neighbour(self, word, group, gen):
        """A word drawn from ``word``'s neighbourhood (None when it is empty)."""
        others, weights = self.neighbourhood(word, group)
        return others[int(torch.multinomial(weights, 1, generator=gen))] if others else None

    def _distractors(self, n, gen):
        return [self.distractors[int(k)] for k in torch.randint(0, len(self.distractors), (n,), generator=gen)]

    def runner_ups(self, pieces, group, gen, k=3):
        """The runner-up words of a hypothesis' logits: ``k`` words drawn from *its* neighbourhood
        (none for a non-word), so that they say what the hypothesis sounds like, not the reference."""
        text = self.sp.decode_ids(pieces) if pieces else ""
        if text not in self.pieces:
            return []
        others, weights = self.neighbourhood(text, group)
        if not others:
            return []
        picked = torch.multinomial(weights, min(k, len(others)), replacement=False, generator=gen)
        return [others[int(j)] for j in picked]


def _normal_scores(n, gen):
    """n standard normal draws, stratified: the evenly spaced normal quantiles in a random order, so
    that a speaker's few productions (44 in the demo tree) have the calibrated mean difficulty
    rather than that of a small random sample."""
    from statistics import NormalDist

    quantiles = [NormalDist().inv_cdf((k + 0.5) / n) for k in range(n)]
    return [quantiles[int(k)] for k in torch.randperm(n, generator=gen)]


def _latents(speaker, utts, seed):
    """Each utterance's shared difficulty (the same for every SA model): a part common to the
    microphones of its production (speaker, word) and a part of its own."""
    gen = _rng(seed, "latent", speaker)
    keys = sorted({u[0].rsplit("_", 1)[0] for u in utts})
    production = dict(zip(keys, _normal_scores(len(keys), gen)))
    mic = dict(zip(sorted(u[0] for u in utts), _normal_scores(len(utts), gen)))
    return {
        u[0]: math.sqrt(MIC_SHARE) * production[u[0].rsplit("_", 1)[0]] + math.sqrt(1 - MIC_SHARE) * mic[u[0]]
        for u in utts
    }


def _sounds_like(speaker, utts, conf, seed):
    """What each utterance's audio sounds like when it is misheard (the same for every SA model): a
    word drawn from its reference's neighbourhood, per utterance."""
    gen = _rng(seed, "sounds_like", speaker)
    group = intelligibility_group(speaker)
    return {u[0]: conf.neighbour(u[1], group, gen) for u in sorted(utts)}


def hypotheses(model, speaker, utts, conf, seed):
    """The SA model's decode of each utterance (token ids): the reference with the pair's accuracy
    (errors correlated across models through the utterance's shared difficulty), else a wrong word
    with the calibrated shares of near misses and non-words, the rest a word of the reference's
    neighbourhood: with probability ``AGREEMENT`` what the audio sounds like (shared by the models
    that mishear it), else this model's own draw."""
    from statistics import NormalDist

    gen = _rng(seed, "hypotheses", model, speaker)
    threshold = NormalDist().inv_cdf(pair_accuracy(model, speaker, seed))
    latent = _latents(speaker, utts, seed)
    sounds_like = _sounds_like(speaker, utts, conf, seed)
    group = intelligibility_group(speaker)
    out = []
    for utt_id, word, _ in utts:
        y = math.sqrt(ERROR_CORRELATION[group]) * latent[utt_id]
        y += math.sqrt(1 - ERROR_CORRELATION[group]) * float(torch.randn(1, generator=gen))
        if y < threshold:
            out.append(conf.pieces[word])
            continue
        near = float(torch.rand(1, generator=gen)) < FIRST_PIECE_RIGHT[group]
        not_a_word = float(torch.rand(1, generator=gen)) < NOT_A_WORD[group]
        agree = float(torch.rand(1, generator=gen)) < AGREEMENT[group]
        out.append(conf.wrong_word(word, near, not_a_word, group, gen, sounds_like[utt_id] if agree else None))
    return out


def _decoder_logits(hyps, references, conf, group, gen):
    """Teacher-forced logits [U, V] of each utterance (U = reference pieces + 1) whose greedy decode
    is its hypothesis (cut at U: a teacher-forced decode cannot run longer). The top piece of each
    position is the hypothesis' (then </s>), with a margin that is larger when the decode is right;
    the pieces of words drawn from the hypothesis' own neighbourhood are the runner-ups. Nothing
    singles out the reference when the decode is wrong. (One noise tensor for all the utterances of
    a pair: the same logits as one by one, made faster.)"""
    lengths = [len(r) + 1 for r in references]
    logits = 1.5 * torch.randn(sum(lengths), conf.vocab, generator=gen)
    top, right, rows, cols, start = [], [], [], [], 0
    for hyp, reference, U in zip(hyps, references, lengths):
        top += (list(hyp) + [2] + [0] * U)[:U]
        right += [list(hyp) == list(reference)] * U
        for neighbour in conf.runner_ups(hyp, group, gen):
            pieces = (conf.pieces[neighbour] + [2])[:U]
            rows += range(start, start + len(pieces))
            cols += pieces
        start += U
    if rows:
        boost = 1.0 + 3.0 * torch.rand(len(rows), generator=gen)
        logits.index_put_((torch.tensor(rows), torch.tensor(cols)), boost, accumulate=True)
    margin = torch.where(torch.tensor(right), 7.0, 5.0) + torch.randn(len(top), generator=gen)
    logits[torch.arange(len(top)), torch.tensor(top)] = logits.max(-1).values + margin.clamp(min=0.5)
    return [part.clone() for part in logits.split(lengths)]


def _ctc_logits(hyp, frames, conf, gen):
    """Frame-level CTC logits [T, V]: blank everywhere, the pieces of the same decode spread over
    the frames (a free-running decode of the same audio)."""
    logits = torch.randn(frames, conf.vocab, generator=gen)
    logits[:, 0] += 6.0
    pieces = [int(t) for t in hyp if int(t) not in (0, 2)]
    for i, piece in enumerate(pieces):
        frame = min(frames - 1, int((i + 0.5) * frames / max(1, len(pieces))))
        logits[frame, piece] += 9.0
    return logits


def _write_pair(pair_dir, model, speaker, utts, sp, conf, seed, form, ctc):
    """Writes one (SA model, audio speaker) pair into ``pair_dir``; its content depends only on
    (seed, model, speaker), so pairs can be added to a tree later with the same result."""
    gen = _rng(seed, "logits", model, speaker)
    hyps = hypotheses(model, speaker, utts, conf, seed)
    group = intelligibility_group(speaker)
    decoder = _decoder_logits(hyps, [conf.pieces[word] for _, word, _ in utts], conf, group, gen)
    lengths = [len(d) for d in decoder]
    pair_dir.mkdir(parents=True)
    files = {kind: pair_dir / path.name for kind, path in pair_files(pair_dir, model, speaker).items()}
    if form == "stacked":
        if len(set(lengths)) != 1:
            raise ValueError(f"{model}/{speaker}: the stacked form needs equal lengths")
        torch.save(torch.stack(decoder), files["decoder"])
    else:
        torch.save(decoder, files["decoder"])
    if ctc:
        torch.save([_ctc_logits(h, frames, conf, gen) for h, (_, _, frames) in zip(hyps, utts)], files["ctc"])
    meta = {
        "model_name": model,
        "num_utterances": len(utts),
        "vocab_size": conf.vocab,
        "utterance_ids": [u[0] for u in utts],
        "token_lens": [[1.0] for _ in utts],  # a relative length in the real files: useless
        "target_words": [u[1] for u in utts],
        "vocab_size_decoder": conf.vocab,
        "vocab_size_ctc": conf.vocab,
        "ctc_frame_lens": [u[2] for u in utts],
    }
    files["metadata"].write_text(json.dumps(meta))
    return sum(t.numel() * 4 for t in decoder)


def _wants_ctc(ctc, speaker):
    """ctc: False, True, or the audio speakers whose pairs get CTC files."""
    return ctc is True or (not isinstance(ctc, bool) and speaker in set(ctc or ()))


class _Corpus:
    """Everything a pair's content depends on besides (model, speaker): words, tokenizer,
    utterances of each speaker, shared confusions. Rebuilt identically from the same inputs."""

    def __init__(self, tokenizer_file, scale, seed, speakers, metadata_dir=None, words=None):
        import sentencepiece as spm

        self.table = dict(words) if words is not None else word_list(scale, seed)
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
        self.per_speaker = {s: _utterances(s, self.table, scale, seed, metadata_dir) for s in speakers}
        all_words = {w for utts in self.per_speaker.values() for _, w, _ in utts}
        self.conf = _Confusions(self.sp, sorted(all_words), seed)
        self.seed = seed

    def write_pair(self, pair_dir, model, speaker, form="list", ctc=False):
        return _write_pair(
            pair_dir,
            model,
            speaker,
            self.per_speaker[speaker],
            self.sp,
            self.conf,
            self.seed,
            form,
            _wants_ctc(ctc, speaker),
        )


def _expand_pairs(pairs, speakers):
    if pairs == "diagonal":
        return [(s, s) for s in speakers]
    if pairs == "all":
        return [(m, s) for m in speakers for s in speakers]
    return [tuple(p) for p in pairs]


def _write_summary(tree, summary):
    for path in (tree / "logit_extraction" / SUMMARY_FILE, tree / "SYNTHETIC.json"):
        write_json(path, summary, indent=1)


def generate_tree(
    out,
    scale="demo",
    seed=DEMO_SEED,
    speakers=SPEAKERS,
    pairs="diagonal",
    tokenizer_file=None,
    metadata_dir=None,
    ctc=False,
    stacked=(),
    words=None,
):
    """Writes a synthetic logit extraction under ``out`` (atomically: a half-made tree never
    appears under that name). Returns the summary written to SYNTHETIC.json.

    pairs: ``diagonal`` (each SA model on its own speaker, what exists today), ``all`` (every model
    on every speaker's audio) or a list of (model, speaker). ctc: write CTC files for every pair
    (True) or for the pairs on these audio speakers. stacked: (model, speaker) pairs to write as
    one [N, U, V] tensor (all their lengths must be equal). words: a word-key -> word table to use
    instead of the built-in one.
    """
    out = Path(out)
    if scale not in ("demo", "full"):
        raise ValueError(f"scale must be demo or full, not {scale!r}")
    check_replaceable(out)
    remove_stale_builds(out.parent, f".{out.name}.tmp-")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "logit_extraction").mkdir(parents=True)
    try:
        if tokenizer_file is None:
            table = dict(words) if words is not None else word_list(scale, seed)
            train_tokenizer(tmp / "tokenizer.model", table.values(), 240 if scale == "demo" else 5000, seed)
        else:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
        corpus = _Corpus(tmp / "tokenizer.model", scale, seed, speakers, metadata_dir, words)
        pairs = _expand_pairs(pairs, speakers)
        stacked = {tuple(p) for p in stacked}
        nbytes = 0
        for model, speaker in pairs:
            form = "stacked" if (model, speaker) in stacked else "list"
            nbytes += corpus.write_pair(tmp / "logit_extraction" / model / speaker, model, speaker, form, ctc)
        summary = {
            "synthetic": True,
            "generator_version": GENERATOR_VERSION,
            "scale": scale,
            "seed": seed,
            "vocab_size": corpus.sp.vocab_size(),
            "pairs": [list(p) for p in pairs],
            "n_utterances": {s: len(u) for s, u in corpus.per_speaker.items()},
            "decoder_float32_bytes": nbytes,
            "ctc_speakers": sorted({s for _, s in pairs if _wants_ctc(ctc, s)}),
            "built_in_words": words is None and metadata_dir is None,
        }
        _write_summary(tmp, summary)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


class DemoTreeError(ValueError):
    """A folder the demo tree cannot be written to: one line naming it."""


def is_demo_tree(folder):
    """True when ``folder`` holds a SYNTHETIC.json written by this module."""
    try:
        return json.loads((Path(folder) / "SYNTHETIC.json").read_text()).get("synthetic") is True
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(folder):
    """DemoTreeError unless ``folder`` is absent, an empty folder or a tree this module wrote: a
    synthetic tree never replaces a folder the recipe did not make (a real logit tree, results)."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DemoTreeError(f"{folder} is a file, not a folder: a synthetic tree cannot be written there")
    if any(folder.iterdir()) and not is_demo_tree(folder):
        raise DemoTreeError(
            f"{folder} is a folder that this recipe did not make (it holds no SYNTHETIC.json of a demo tree): "
            f"it is never replaced by a synthetic tree; give another folder (e.g. --demo_folder=demo_data)"
        )


def remove_stale_builds(parent, prefix):
    """Removes the temporary folders ``<prefix><pid>`` in ``parent`` whose process is gone (a
    generation killed midway); a build still running keeps its folder."""
    if not Path(parent).is_dir():
        return
    for path in Path(parent).glob(prefix + "*"):
        pid = path.name[len(prefix) :]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def add_pairs(tree, pairs, ctc=False):
    """Adds (model, speaker) pairs to a tree made by ``generate_tree`` with the built-in words;
    each pair appears atomically and equals what generating it with the tree would have given."""
    tree = Path(tree)
    summary = json.loads((tree / "SYNTHETIC.json").read_text())
    if not summary.get("built_in_words"):
        raise ValueError(f"{tree}: pairs can only be added to a tree of the built-in word list")
    corpus = _Corpus(tree / "tokenizer.model", summary["scale"], summary["seed"], tuple(summary["n_utterances"]))
    for model, speaker in pairs:
        final = tree / "logit_extraction" / model / speaker
        if final.exists():
            continue
        remove_stale_builds(final.parent, f".{speaker}.tmp-")
        tmp = final.parent / f".{speaker}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        summary["decoder_float32_bytes"] += corpus.write_pair(tmp, model, speaker, "list", ctc)
        os.replace(tmp, final)
        summary["pairs"].append([model, speaker])
        if _wants_ctc(ctc, speaker):
            summary["ctc_speakers"] = sorted(set(summary["ctc_speakers"]) | {speaker})
    _write_summary(tree, summary)


def ensure_demo_tree(folder, seed=DEMO_SEED, pairs=()):
    """The embedded demo tree: generated on first use (each SA model on its own speaker), reused
    afterwards, remade if it was made by another generator version; ``pairs`` it lacks (teachers
    on other speakers' audio, for ``input_streams: cross``) are added. CTC files are written for
    the pairs on the four held-out speakers' audio (what the free-running CTC decode reads).
    Returns (logit_root, tokenizer_file, generated_now)."""
    folder = Path(folder)
    check_replaceable(folder)
    generated = False
    try:
        info = json.loads((folder / "SYNTHETIC.json").read_text())
        current = info.get("generator_version") == GENERATOR_VERSION and info.get("seed") == seed
    except (OSError, ValueError):
        current = False
    ctc = tuple(HELD_OUT.values())
    if not current:
        start = time.monotonic()
        logger.info("Generating the SYNTHETIC demo tree under %s (first use) ...", folder)
        generate_tree(folder, scale="demo", seed=seed, ctc=ctc)
        logger.info("Generated the demo tree in %.1f s", time.monotonic() - start)
        generated = True
    missing = [(m, s) for m, s in pairs if not (folder / "logit_extraction" / m / s).is_dir()]
    if missing:
        add_pairs(folder, missing, ctc=ctc)
        generated = True
    return folder / "logit_extraction", folder / "tokenizer.model", generated
