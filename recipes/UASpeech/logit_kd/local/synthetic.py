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

How the teacher-forced logits are made, per position u of an utterance (target token t_u):
the SA model's top token is t_u with a probability that grows with the speaker's intelligibility
(and is higher after the first position: teacher forcing feeds the reference prefix). When it is
wrong, the top token is the *shared* confusion partner of t_u (the same for every speaker, so the
ensemble does not fix it), <unk> (id 0, which decodes to " ⁇ "), an early </s>, a *distractor*
piece that no word of the closed list uses (a LibriSpeech-sized tokenizer has many; a student can
learn they are never right), or another piece. The true token keeps a secondary boost of random
size, so it is often, not always, second. Errors are otherwise drawn independently per speaker,
which is why an ensemble of speakers beats one of them.

Command line: ``make_demo_tree.py``.
"""

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import torch

from local.corpus import HELD_OUT, INTELLIGIBILITY, MICS, SPEAKERS
from local.files import write_json
from local.layout import SUMMARY_FILE, pair_files

GENERATOR_VERSION = 6
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


def _speaker_accuracy(speaker):
    """Top-token accuracy of a speaker's SA model on its own audio, ordered by intelligibility."""
    return 0.4 + 0.55 * INTELLIGIBILITY[speaker] / 100.0


def _pair_accuracy(model, speaker):
    """An SA model is best on its own speaker; on another one it degrades with the distance in
    intelligibility (off-diagonal pairs, used by ``input_streams: cross``)."""
    if model == speaker:
        return _speaker_accuracy(speaker)
    gap = abs(INTELLIGIBILITY[model] - INTELLIGIBILITY[speaker]) / 100.0
    return _speaker_accuracy(speaker) * (0.85 - 0.5 * gap)


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


class _Confusions:
    """Token-level structure shared by all SA models: which pieces the closed list uses, and the
    shared confusion partner of each of them."""

    def __init__(self, sp, words, seed):
        self.vocab = sp.vocab_size()
        self.word_tokens = [sp.encode_as_ids(w) for w in words]
        used = sorted({t for w in words for t in sp.encode_as_ids(w)} | {2})
        self.in_list = torch.tensor(used)
        mask = torch.ones(self.vocab, dtype=torch.bool)
        mask[self.in_list] = False
        mask[:3] = False
        self.distractors = torch.nonzero(mask).flatten()
        if len(self.distractors) == 0:
            self.distractors = self.in_list
        gen = _rng(seed, "confusions")
        partner = self.in_list[torch.randperm(len(self.in_list), generator=gen)]
        same = partner == self.in_list
        partner[same] = self.in_list[(torch.nonzero(same).flatten() + 1) % len(self.in_list)]
        self.partner = torch.zeros(self.vocab, dtype=torch.long)
        self.partner[self.in_list] = partner


def _decoder_logits(target, first, accuracy, conf, gen):
    """Teacher-forced logits [P, V] of all positions of a pair at once (see the module docstring).

    target: [P] the token each position predicts; first: [P] whether it is an utterance's first
    position; accuracy: [P] the SA model's top-token accuracy on that utterance's first position.
    """
    P, V = len(target), conf.vocab
    logits = 1.5 * torch.randn(P, V, generator=gen)
    acc = torch.where(first, accuracy, 1.0 - 0.5 * (1.0 - accuracy))  # teacher forcing helps later
    correct = torch.rand(P, generator=gen) < acc
    # A wrong top token is the shared partner (35 %), <unk> (5 %, decodes to " ⁇ "), an early </s>
    # (5 %: at the first position, an empty hypothesis), a distractor piece (35 %) or another
    # piece of the closed list (20 %).
    candidates = torch.stack(
        [
            conf.partner[target],
            torch.zeros(P, dtype=torch.long),
            torch.full((P,), 2, dtype=torch.long),
            conf.distractors[torch.randint(0, len(conf.distractors), (P,), generator=gen)],
            conf.in_list[torch.randint(0, len(conf.in_list), (P,), generator=gen)],
        ]
    )
    kind = torch.bucketize(torch.rand(P, generator=gen), torch.tensor([0.35, 0.4, 0.45, 0.8]))
    rows = torch.arange(P)
    top = torch.where(correct, target, candidates[kind, rows])
    logits[rows, conf.partner[target]] += 3.0 * torch.rand(P, generator=gen)  # shared "dark knowledge"
    # When the model is wrong, the evidence left for the true token varies: often second, not always.
    logits[rows, target] += torch.where(correct, torch.zeros(P), 7.5 * torch.rand(P, generator=gen))
    logits[rows, top] += 9.0 + torch.randn(P, generator=gen)
    return logits, top


def _ctc_logits(tokens, accuracy, frames, conf, gen):
    """Frame-level CTC logits [T, V]: blank everywhere, the pieces the model heard spread over the
    frames. It hears the right word with probability ``accuracy``, else another word of the list
    (a free-running decode has no reference prefix to lean on)."""
    logits = torch.randn(frames, conf.vocab, generator=gen)
    logits[:, 0] += 6.0
    if float(torch.rand(1, generator=gen)) >= accuracy:
        tokens = conf.word_tokens[int(torch.randint(0, len(conf.word_tokens), (1,), generator=gen))]
    pieces = [int(t) for t in tokens if int(t) != 2]
    for i, piece in enumerate(pieces):
        frame = min(frames - 1, int((i + 0.5) * frames / max(1, len(pieces))))
        logits[frame, piece] += 9.0
    return logits


def _write_pair(pair_dir, model, speaker, utts, sp, conf, seed, form, ctc):
    """Writes one (SA model, audio speaker) pair into ``pair_dir``; its content depends only on
    (seed, model, speaker), so pairs can be added to a tree later with the same result."""
    gen = _rng(seed, "logits", model, speaker)
    tokens = [sp.encode_as_ids(word) + [2] for _, word, _ in utts]
    lengths = [len(t) for t in tokens]
    # the array's centre microphones are a bit better
    quality = torch.tensor([1.0 - 0.02 * abs(int(utt_id.rsplit("_", 1)[1][1]) - 5) for utt_id, _, _ in utts])
    per_position = torch.tensor(lengths)
    target = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
    first = torch.tensor([u == 0 for n in lengths for u in range(n)])
    utt_accuracy = _pair_accuracy(model, speaker) * quality
    logits, _ = _decoder_logits(target, first, utt_accuracy.repeat_interleave(per_position), conf, gen)
    decoder = [t.clone() for t in logits.split(lengths)]
    pair_dir.mkdir(parents=True)
    files = {kind: pair_dir / path.name for kind, path in pair_files(pair_dir, model, speaker).items()}
    if form == "stacked":
        if len(set(lengths)) != 1:
            raise ValueError(f"{model}/{speaker}: the stacked form needs equal lengths")
        torch.save(torch.stack(decoder), files["decoder"])
    else:
        torch.save(decoder, files["decoder"])
    if ctc:
        ctc_list = [
            _ctc_logits(t, float(a), frames, conf, gen) for t, a, (_, _, frames) in zip(tokens, utt_accuracy, utts)
        ]
        torch.save(ctc_list, files["ctc"])
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
    generated = False
    try:
        info = json.loads((folder / "SYNTHETIC.json").read_text())
        current = info.get("generator_version") == GENERATOR_VERSION and info.get("seed") == seed
    except (OSError, ValueError):
        current = False
    ctc = tuple(HELD_OUT.values())
    if not current:
        generate_tree(folder, scale="demo", seed=seed, ctc=ctc)
        generated = True
    missing = [(m, s) for m, s in pairs if not (folder / "logit_extraction" / m / s).is_dir()]
    if missing:
        add_pairs(folder, missing, ctc=ctc)
        generated = True
    return folder / "logit_extraction", folder / "tokenizer.model", generated
