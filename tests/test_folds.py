"""Intelligibility groups, teacher sets, the validation split and the honesty rules."""

import collections

import pytest

from local.corpus import GROUPS, HELD_OUT, INTELLIGIBILITY, MICS, SPEAKERS, core_id, production_of, word_category
from local.folds import FoldError, build_items, check_honesty, store_pairs, teacher_speakers, validation_groups
from local.store import LogitStore, TokenTable, load_tokenizer


def test_corrected_intelligibility_groups():
    assert sorted(s for g in GROUPS.values() for s in g) == sorted(SPEAKERS) and len(SPEAKERS) == 15
    # The seed project's table put F03, M04, M12 in "high"; they are very low, with M01.
    assert set(GROUPS["very_low"]) == {"M04", "F03", "M12", "M01"}
    assert set(GROUPS["high"]) == {"M09", "M14", "M10", "M08", "F05"}
    assert HELD_OUT == {"high": "M08", "mid": "M05", "low": "M16", "very_low": "M01"}
    for _group, members in GROUPS.items():
        lo, hi = min(INTELLIGIBILITY[s] for s in members), max(INTELLIGIBILITY[s] for s in members)
        for other in GROUPS.values():
            if other is not members:
                assert all(not (lo < INTELLIGIBILITY[s] < hi) for s in other)


def test_utterance_ids_and_word_categories():
    assert core_id("M05_B3_CW42_M6") == "B3_CW42_M6"
    assert [word_category(k) for k in ("D0", "LA", "LZ", "C1", "C19", "CW1", "CW100", "UW7")] == [
        "D",
        "L",
        "L",
        "C",
        "C",
        "CW",
        "CW",
        "UW",
    ]
    with pytest.raises(ValueError):
        core_id("M05_CW42_M6")
    with pytest.raises(ValueError):
        word_category("X3")
    assert MICS["M01"] == ("M5", "M6", "M7") and len(MICS["M11"]) == 6 and len(MICS["F02"]) == 7


@pytest.mark.parametrize(
    "held_out,expected",
    [
        ("M08", ["F05", "M09", "M10", "M14"]),
        ("M05", ["F04", "M11"]),
        ("M16", ["F02", "M07"]),
        ("M01", ["F03", "M04", "M12"]),
    ],
)
def test_same_level_teachers(held_out, expected):
    assert teacher_speakers(held_out, "same_level") == expected


def test_all_others_and_explicit_teachers():
    assert teacher_speakers("M01", "all_others") == sorted(s for s in SPEAKERS if s != "M01")
    assert teacher_speakers("M01", "all_others", exclude=["M04"]) == sorted(
        s for s in SPEAKERS if s not in ("M01", "M04")
    )
    assert teacher_speakers("M08", teachers=["F02", "M05"]) == ["F02", "M05"]
    with pytest.raises(FoldError, match="held-out speaker M08 is among the teachers"):
        teacher_speakers("M08", teachers=["F02", "M08"])
    with pytest.raises(FoldError, match="empty"):
        teacher_speakers("M05", "same_level", exclude=["F04", "M11"])
    with pytest.raises(FoldError, match="not a UASpeech"):
        teacher_speakers("M99")
    with pytest.raises(FoldError, match="teacher_set"):
        teacher_speakers("M08", "everyone")


def _fold(
    tree, held_out, input_streams, teacher_set="same_level", valid_fraction=0.2, seed=7, cross_audio="all_others"
):
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    teachers = teacher_speakers(held_out, teacher_set)
    train_pairs, test_pairs = store_pairs(held_out, teachers, input_streams, cross_audio)
    train = LogitStore(tree / "logit_extraction", tokens, train_pairs)
    test = LogitStore(tree / "logit_extraction", tokens, test_pairs)
    groups = validation_groups(train, valid_fraction, seed)
    splits = build_items(train, test, held_out, teachers, input_streams, groups)
    return train, test, groups, splits, teachers


@pytest.mark.parametrize("input_streams", ["self", "matched"])
@pytest.mark.parametrize("held_out", ["M08", "M01"])
def test_honesty_rules_hold(demo_tree, held_out, input_streams):
    teacher_set = "all_others" if held_out == "M01" else "same_level"
    train, test, groups, splits, teachers = _fold(demo_tree, held_out, input_streams, teacher_set)
    check_honesty(splits, train, test, held_out)
    # 1. nothing of the held-out speaker in training or validation, not even its words' ids
    assert held_out not in train.stream_speaker and held_out not in train.stream_model
    for name in ("train", "valid"):
        for item_id, item in splits[name].items():
            assert held_out not in item_id
            assert all(train.stream_speaker[j] in teachers for j in item["streams"] + item["target"])
    # 2. validation from teacher speakers only, whole (speaker, word) groups
    valid_groups = {production_of(train.utt_ids[j]) for it in splits["valid"].values() for j in it["streams"]}
    assert valid_groups == groups and all(g.split("_")[0] in teachers for g in valid_groups)
    train_groups = {
        production_of(train.utt_ids[j]) for it in splits["train"].values() for j in it["streams"] + it["target"]
    }
    assert not valid_groups & train_groups
    for group in valid_groups:  # every microphone of a validation group is in validation
        mics = {it["mic"] for uid, it in splits["valid"].items() if uid.startswith(f"{group}_")}
        assert mics == set(MICS[group.split("_")[0]])
    # 3. the test input comes from the held-out speaker's audio only, one stream per utterance
    assert len(splits["test"]) == sum(1 for s in test.stream_speaker if s == held_out)
    for item in splits["test"].values():
        assert [test.stream_speaker[j] for j in item["streams"]] == [held_out]
        assert item["target"] == []


def test_matched_items_join_speakers_by_core_id(demo_tree):
    train, _, _, splits, teachers = _fold(demo_tree, "M08", "matched")
    for core, item in splits["train"].items():
        assert len(item["streams"]) >= 1 and item["streams"] == item["target"]
        assert {core_id(train.utt_ids[j]) for j in item["streams"]} == {core}
        assert len({train.stream_speaker[j] for j in item["streams"]}) == len(item["streams"])


def test_self_items_target_the_ensemble_of_the_core_id(demo_tree):
    train, _, groups, splits, _ = _fold(demo_tree, "M05", "self")
    for utt_id, item in splits["train"].items():
        assert item["streams"] == [train.stream(utt_id[:3], utt_id)]
        assert item["streams"][0] in item["target"]
        assert {core_id(train.utt_ids[j]) for j in item["target"]} == {core_id(utt_id)}
        assert all(production_of(train.utt_ids[j]) not in groups for j in item["target"])


def test_validation_split_depends_on_seed_only(demo_tree):
    a = _fold(demo_tree, "M08", "self", seed=1)[2]
    b = _fold(demo_tree, "M08", "self", seed=1)[2]
    c = _fold(demo_tree, "M08", "self", seed=2)[2]
    assert a == b and a != c


def test_check_honesty_catches_leaks(demo_tree):
    train, test, groups, splits, teachers = _fold(demo_tree, "M08", "self")
    # a validation group leaking into training
    valid_id, valid_item = next(iter(splits["valid"].items()))
    leaked = {**splits, "train": dict(splits["train"])}
    some_train = next(iter(leaked["train"]))
    leaked["train"][some_train] = {
        **leaked["train"][some_train],
        "target": leaked["train"][some_train]["target"] + valid_item["streams"],
    }
    with pytest.raises(FoldError, match="is in validation"):
        check_honesty(leaked, train, test, "M08")
    # a held-out stream in the training store
    with pytest.raises(FoldError, match="held-out"):
        check_honesty(splits, test, test, "M08")
    # a test item fed with another speaker's audio
    bad_test = {**splits, "test": {k: {**v, "streams": [0]} for k, v in splits["test"].items()}}
    with pytest.raises(FoldError, match="not the held-out"):
        check_honesty(bad_test, train, train, "M08")


def test_cross_streams_honesty(demo_tree_cross):
    """cross_audio: all_others (the default): the teacher models on every non-held-out speaker's audio;
    on a teacher speaker's own audio its own model is left out, on any other speaker's audio every
    teacher model is a stream, in the test's order. Validation comes from every training audio
    speaker, never the held-out one."""
    train, test, groups, splits, teachers = _fold(demo_tree_cross, "M16", "cross")
    check_honesty(splits, train, test, "M16")
    assert teachers == ["F02", "M07"]
    audio = sorted(s for s in SPEAKERS if s != "M16")
    assert sorted(set(train.stream_speaker)) == audio and "M16" not in train.stream_model
    for name in ("train", "valid"):
        for utt_id, item in splits[name].items():
            spk = utt_id[:3]
            # never the speaker's own model (the held-out speaker has none at test time)
            assert [train.stream_model[j] for j in item["streams"]] == [t for t in teachers if t != spk]
            assert {train.stream_speaker[j] for j in item["streams"]} == {spk}
            assert item["target"] == item["streams"]
    # every training audio speaker gives training and validation productions; the held-out one neither
    for name in ("train", "valid"):
        assert {u[:3] for u in splits[name]} == set(audio)
    assert {g[:3] for g in groups} == set(audio)
    for item in splits["test"].values():
        assert [test.stream_model[j] for j in item["streams"]] == teachers
        assert {test.stream_speaker[j] for j in item["streams"]} == {"M16"}
        assert test.stream_model[item["self_stream"]] == "M16" and item["self_stream"] not in item["streams"]


def test_two_teacher_cross_items_have_the_tests_two_streams(demo_tree_cross):
    """With two same_level teachers (M16: F02, M07) the test has two streams. cross_audio:
    teachers gives every training item one stream (each teacher's audio read by the other's model)
    and a one-teacher target; all_others gives the items on the 12 other speakers' audio both."""
    _, _, _, old, _ = _fold(demo_tree_cross, "M16", "cross", cross_audio="teachers")
    assert {len(item["streams"]) for name in ("train", "valid") for item in old[name].values()} == {1}
    train, _, _, splits, _ = _fold(demo_tree_cross, "M16", "cross")
    test_streams = {len(item["streams"]) for item in splits["test"].values()}
    assert test_streams == {2}
    counts = collections.Counter(len(item["streams"]) for item in splits["train"].values())
    # the teacher speakers' own audio keeps one stream (its own model left out), the others have two
    teacher_audio = sum(1 for u in splits["train"] if u[:3] in ("F02", "M07"))
    assert counts[1] == teacher_audio and counts[2] == len(splits["train"]) - teacher_audio
    assert counts[2] > 5 * counts[1]
    for utt_id, item in splits["train"].items():
        if utt_id[:3] not in ("F02", "M07"):
            assert [train.stream_model[j] for j in item["streams"]] == ["F02", "M07"]


@pytest.mark.parametrize("input_streams", ["self", "matched", "cross"])
@pytest.mark.parametrize("cross_audio", ["all_others", "teachers"])
def test_no_pair_of_the_held_out_speaker_is_ever_read_for_training(input_streams, cross_audio):
    """The pairs of the training store, for every held-out speaker and teacher set: never the
    held-out speaker's model or audio; an excluded speaker's audio is not read either."""
    for held_out in SPEAKERS:
        for teacher_set in ("same_level", "all_others"):
            teachers = teacher_speakers(held_out, teacher_set)
            train, test = store_pairs(held_out, teachers, input_streams, cross_audio)
            assert train and all(held_out not in pair for pair in train)
            assert all(s == held_out for _, s in test)
            if input_streams == "cross":
                audio = {s for _, s in train}
                assert audio == (set(SPEAKERS) - {held_out} if cross_audio == "all_others" else set(teachers))
                assert {m for m, _ in train} == set(teachers) and all(m != s for m, s in train)
    excluded = store_pairs("M16", ["F02", "M07"], "cross", "all_others", exclude=["M04"])[0]
    assert all("M04" not in pair for pair in excluded)
    with pytest.raises(FoldError, match="cross_audio"):
        store_pairs("M16", ["F02", "M07"], "cross", "everyone")
    with pytest.raises(FoldError, match="no teacher model reads any training audio"):
        store_pairs("M16", ["F02"], "cross", "teachers")
    assert store_pairs("M16", ["F02"], "cross", "all_others")[0] == [
        ("F02", s) for s in SPEAKERS if s not in ("M16", "F02")
    ]


def test_check_honesty_refuses_the_held_out_audio_in_cross_training(demo_tree_cross):
    """A training store that read the held-out speaker's audio (a teacher model on M16) gives items
    on it: refused, naming the held-out speaker."""
    tokens = TokenTable(load_tokenizer(demo_tree_cross / "tokenizer.model"))
    root = demo_tree_cross / "logit_extraction"
    train_pairs, test_pairs = store_pairs("M16", ["F02", "M07"], "cross")
    leaky = LogitStore(root, tokens, train_pairs + [("F02", "M16"), ("M07", "M16")])
    test = LogitStore(root, tokens, test_pairs)
    splits = build_items(leaky, test, "M16", ["F02", "M07"], "cross", validation_groups(leaky, 0.2, 7))
    assert any(u.startswith("M16_") for name in ("train", "valid") for u in splits[name])
    with pytest.raises(FoldError, match="held-out speaker M16"):
        check_honesty(splits, leaky, test, "M16")


def test_the_held_out_speakers_data_cannot_change_a_choice(demo_tree_cross, tmp_path):
    """Everything chosen before the test (training and validation items, the validation split, the
    teacher ranking that picks the best single teacher and breaks the vote's ties) is the same when
    every file of the held-out speaker's audio holds other logits."""
    import shutil

    import torch

    from local.kd import teacher_ranking

    tree = tmp_path / "tree"
    shutil.copytree(demo_tree_cross, tree)
    for model in ("F02", "M07", "M16"):
        path = tree / "logit_extraction" / model / "M16" / "M16_decoder_logits.pt"
        logits = torch.load(path, weights_only=True)
        torch.save([z.flip(-1) for z in logits], path)  # other decodes, the same shapes

    def choices(root):
        train, test, groups, splits, _ = _fold(root, "M16", "cross")
        streams = [j for name in ("train", "valid") for item in splits[name].values() for j in item["streams"]]
        tests = {u: [test.logits(j).argmax(-1).tolist() for j in item["streams"]] for u, item in splits["test"].items()}
        return groups, {n: splits[n] for n in ("train", "valid")}, teacher_ranking(train, streams), tests

    original, altered = choices(demo_tree_cross), choices(tree)
    assert original[:3] == altered[:3]
    assert original[3] != altered[3]  # the test input did change
