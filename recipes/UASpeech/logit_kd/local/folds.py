"""Leave-one-speaker-out folds: the teacher set, the validation split and the items of each split.

Honesty rules, enforced here and checked by ``check_honesty``:
1. nothing of the held-out speaker (logits, words, ids) is used to train or to select a model;
2. validation comes from the training audio only (the teacher speakers', and with ``cross`` items
   on other speakers' audio, those speakers' too; never the held-out speaker's), grouped by
   speaker + word (the microphones of one (speaker, word) record the same utterance at once, so
   they never straddle train and valid);
3. at test time the student's input is computed only from the held-out speaker's audio.

An *item* is what the student sees once: its input streams, the streams whose ensemble is its KD
target, and the reference word. Streams are indices into a ``LogitStore``.

``input_streams``:
- ``self``: one item per teacher utterance, input = that speaker's own SA stream; KD target = the
  ensemble of the teacher speakers' streams of the same core id (same word and microphone).
- ``matched``: one item per core id, input = all teacher speakers' streams of that core id; KD
  target = their ensemble. At test time, the held-out speaker's own stream alone (S = 1).
- ``cross``: one item per utterance of the training audio, input = the fold's teacher models on that
  audio (on a teacher speaker's own audio its own model is left out: the held-out speaker has none
  at test time); KD target = their ensemble. At test time, every teacher model on the held-out
  speaker's audio. ``cross_audio`` says which audio: ``all_others`` (default) every speaker but the
  held-out one (and the excluded ones), so that the items on a non-teacher speaker's audio have as
  many streams as the test; ``teachers`` the teacher speakers' audio only (with two teachers, one
  stream per item where the test has two).
"""

from collections import defaultdict

import torch

from local.corpus import (
    GROUPS,
    SPEAKERS,
    core_id,
    intelligibility_group,
    parse_utterance_id,
    production_of,
    word_category,
)

TEACHER_SETS = ("same_level", "all_others")
INPUT_STREAMS = ("self", "matched", "cross")
CROSS_AUDIO = ("all_others", "teachers")


class FoldError(ValueError):
    """A fold that cannot be built honestly."""


def teacher_speakers(held_out, teacher_set="same_level", teachers=None, exclude=()):
    """The teacher speakers of a fold.

    teacher_set: ``same_level`` (the other speakers of the held-out speaker's intelligibility
    group) or ``all_others`` (the 14 others). ``teachers``, when given, is an explicit list that
    replaces it; ``exclude`` removes speakers from either.
    """
    if held_out not in SPEAKERS:
        raise FoldError(f"held_out {held_out!r} is not a UASpeech dysarthric speaker ({', '.join(SPEAKERS)})")
    if teachers is not None:
        teachers = list(teachers)
        unknown = [t for t in teachers if t not in SPEAKERS]
        if unknown:
            raise FoldError(f"unknown teacher speaker(s) {unknown}")
        if held_out in teachers:
            raise FoldError(
                f"the held-out speaker {held_out} is among the teachers {teachers}: "
                f"that would train on the test speaker"
            )
    elif teacher_set == "same_level":
        teachers = [s for s in GROUPS[intelligibility_group(held_out)] if s != held_out]
    elif teacher_set == "all_others":
        teachers = [s for s in SPEAKERS if s != held_out]
    else:
        raise FoldError(f"teacher_set must be one of {TEACHER_SETS}, not {teacher_set!r}")
    teachers = sorted(t for t in teachers if t not in set(exclude or ()))
    if not teachers:
        raise FoldError(f"the teacher set of {held_out} is empty (teacher_set={teacher_set}, exclude={exclude})")
    return teachers


def cross_audio_speakers(held_out, teachers, cross_audio="all_others", exclude=()):
    """The speakers whose audio the ``cross`` training items read: every speaker but the held-out
    one and the excluded ones (``all_others``), or the teacher speakers only (``teachers``)."""
    if cross_audio not in CROSS_AUDIO:
        raise FoldError(f"cross_audio must be one of {CROSS_AUDIO}, not {cross_audio!r}")
    if cross_audio == "teachers":
        return sorted(teachers)
    return sorted(s for s in SPEAKERS if s != held_out and s not in set(exclude or ()))


def store_pairs(held_out, teachers, input_streams, cross_audio="all_others", exclude=()):
    """(model, audio speaker) pairs to read for training/validation and for the test. With
    ``cross``, the teacher models on each training audio speaker's audio (``cross_audio_speakers``),
    a speaker's own model left out."""
    if input_streams not in INPUT_STREAMS:
        raise FoldError(f"input_streams must be one of {INPUT_STREAMS}, not {input_streams!r}")
    if input_streams == "cross":
        audio = cross_audio_speakers(held_out, teachers, cross_audio, exclude)
        train = [(m, s) for s in audio for m in teachers if m != s]
        if not train:
            raise FoldError(
                f"input_streams cross with the single teacher {teachers[0]} and cross_audio {cross_audio}: no "
                f"teacher model reads any training audio (its own is left out); use cross_audio all_others"
            )
        test = [(m, held_out) for m in teachers] + [(held_out, held_out)]  # the last: sa_self, optional
    else:
        train = [(t, t) for t in teachers]
        test = [(held_out, held_out)]
    return train, test


def optional_pairs(held_out, input_streams):
    """Pairs a fold reads when present: with cross streams, the held-out speaker's own SA model is
    only a baseline (a new speaker has none)."""
    return [(held_out, held_out)] if input_streams == "cross" else []


def _same_audio(store, pairs):
    """The utterance ids shared by several models on one speaker's audio: they must be the same."""
    ids = None
    for pair in pairs:
        these = [store.utt_ids[j] for j in store.pair_streams[pair]]
        if ids is None:
            ids, first = these, pair
        elif set(these) != set(ids):
            missing = sorted(set(ids) ^ set(these))[0]
            raise FoldError(
                f"SA models {first[0]} and {pair[0]} on speaker {pair[1]}'s audio do not list the same "
                f"utterances (e.g. {missing}): cross streams join them by utterance id"
            )
    return ids


def validation_groups(store, valid_fraction, seed):
    """The productions (``corpus.production_of``: one speaker's word, every microphone) held out
    for validation: ``valid_fraction`` of the words of each speaker whose audio the training store
    holds (the teacher speakers; with ``cross_audio: all_others``, every speaker but the held-out
    one), drawn with ``seed``. Whole productions, so the microphones of one recording never
    straddle train and validation. The training store holds nothing of the held-out speaker
    (``check_honesty``), so neither can validation."""
    productions = defaultdict(set)
    for spk, utt_id in zip(store.stream_speaker, store.utt_ids):
        productions[spk].add(production_of(utt_id))
    chosen = set()
    gen = torch.Generator().manual_seed(int(seed))
    for spk in sorted(productions):
        keys = sorted(productions[spk])
        n_valid = int(round(valid_fraction * len(keys)))
        if valid_fraction > 0 and n_valid == 0:
            n_valid = 1
        if n_valid >= len(keys):
            raise FoldError(
                f"valid_fraction {valid_fraction} puts all {len(keys)} words of speaker {spk} in "
                f"validation: nothing is left to train on"
            )
        for i in torch.randperm(len(keys), generator=gen)[:n_valid].tolist():
            chosen.add(keys[i])
    return chosen


def _item(streams, target, utt_id, word, self_stream=-1):
    parts = parse_utterance_id(utt_id)
    return {
        "streams": list(streams),
        "target": list(target),
        "self_stream": self_stream,
        "word": word,
        "speaker": parts["speaker"],
        "category": word_category(parts["word"]),
        "mic": parts["mic"],
    }


def build_items(train_store, test_store, held_out, teachers, input_streams, valid_groups, matched_items="all"):
    """``{"train": {id: item}, "valid": {...}, "test": {...}}`` for a fold. ``matched_items: own``
    gives ``matched`` the training items of ``self`` (one per teacher utterance, its own stream).

    ``train_store`` holds the teacher pairs only and ``test_store`` the pairs on the held-out
    speaker's audio, so the held-out speaker cannot leak into training by construction.
    """
    teachers = sorted(teachers)

    def in_valid(j):
        return production_of(train_store.utt_ids[j]) in valid_groups

    splits = {"train": {}, "valid": {}, "test": {}}
    if input_streams in ("self", "matched"):
        by_core = defaultdict(list)  # core id -> the teacher speakers' own streams
        for j, (model, spk, utt_id) in enumerate(
            zip(train_store.stream_model, train_store.stream_speaker, train_store.utt_ids)
        ):
            if model == spk and spk in teachers:
                by_core[core_id(utt_id)].append(j)
        for core, streams in sorted(by_core.items()):
            train = [j for j in streams if not in_valid(j)]
            for j in streams:
                if in_valid(j):  # validation looks like the test: one speaker's own stream
                    utt_id = train_store.utt_ids[j]
                    splits["valid"][utt_id] = _item([j], streams, utt_id, train_store.words[j])
            if input_streams == "self" or matched_items == "own":
                for j in train:
                    utt_id = train_store.utt_ids[j]
                    splits["train"][utt_id] = _item([j], train, utt_id, train_store.words[j])
            elif train:
                item = _item(train, train, train_store.utt_ids[train[0]], train_store.words[train[0]])
                item["speaker"] = "+".join(train_store.stream_speaker[j] for j in train)
                splits["train"][core] = item
    else:
        # One item per utterance of the training audio (every speaker the store holds: the
        # teachers', and with cross_audio: all_others the other non-held-out speakers'): the teacher
        # models on that audio, a teacher speaker's own model left out (the held-out speaker has
        # none at test time). On a non-teacher speaker's audio every teacher model is a stream:
        # as many streams as the test has.
        for spk in sorted(set(train_store.stream_speaker)):
            models = [m for m in teachers if m != spk]
            if not models:  # a single teacher on its own audio: no other model reads it
                continue
            for utt_id in _same_audio(train_store, [(m, spk) for m in models]):
                streams = [train_store.stream(m, utt_id) for m in models]
                split = "valid" if in_valid(streams[0]) else "train"
                splits[split][utt_id] = _item(streams, streams, utt_id, train_store.words[streams[0]])
    # The test: streams computed from the held-out speaker's audio only.
    models = teachers if input_streams == "cross" else [held_out]
    for utt_id in _same_audio(test_store, [(m, held_out) for m in models]):
        streams = [test_store.stream(m, utt_id) for m in models]
        self_stream = test_store.index.get((held_out, utt_id), -1)
        splits["test"][utt_id] = _item(streams, (), utt_id, test_store.words[streams[0]], self_stream=self_stream)
    return splits


def check_honesty(splits, train_store, test_store, held_out):
    """Raises FoldError if any of the three honesty rules above is broken by these splits."""
    if held_out in train_store.stream_model or held_out in train_store.stream_speaker:
        raise FoldError(f"the training store holds logits of the held-out speaker {held_out}")
    for name in ("train", "valid"):
        for item_id, item in splits[name].items():
            for j in item["streams"] + item["target"]:
                model, spk = train_store.stream_model[j], train_store.stream_speaker[j]
                if held_out in (model, spk):
                    raise FoldError(
                        f"{name} item {item_id} uses the stream of model {model} on "
                        f"{train_store.utt_ids[j]}: the held-out speaker is {held_out}"
                    )
    valid = {production_of(train_store.utt_ids[j]) for item in splits["valid"].values() for j in item["streams"]}
    for item_id, item in splits["train"].items():
        for j in item["streams"] + item["target"]:
            if production_of(train_store.utt_ids[j]) in valid:
                raise FoldError(
                    f"train item {item_id} uses {train_store.utt_ids[j]}, whose production "
                    f"(speaker, word) is in validation"
                )
    for item_id, item in splits["test"].items():
        for j in item["streams"] + [item["self_stream"]]:
            if j >= 0 and test_store.stream_speaker[j] != held_out:
                raise FoldError(
                    f"test item {item_id} takes a stream of speaker "
                    f"{test_store.stream_speaker[j]}'s audio, not the held-out {held_out}"
                )
