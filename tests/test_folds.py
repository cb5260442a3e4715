"""Intelligibility groups, teacher sets, the validation split and the honesty rules."""

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


def _fold(tree, held_out, input_streams, teacher_set="same_level", valid_fraction=0.2, seed=7):
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    teachers = teacher_speakers(held_out, teacher_set)
    train_pairs, test_pairs = store_pairs(held_out, teachers, input_streams)
    train = LogitStore(tree / "logit_extraction", tokens, train_pairs)
    test = LogitStore(tree / "logit_extraction", tokens, test_pairs)
    groups = validation_groups(train, teachers, valid_fraction, seed)
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
    tree = demo_tree_cross
    train, test, groups, splits, teachers = _fold(tree, "M16", "cross")
    check_honesty(splits, train, test, "M16")
    assert teachers == ["F02", "M07"]
    for name in ("train", "valid"):
        for utt_id, item in splits[name].items():
            spk = utt_id[:3]
            # the other teachers' models on this teacher's audio; never its own model
            assert sorted(train.stream_model[j] for j in item["streams"]) == [t for t in teachers if t != spk]
            assert {train.stream_speaker[j] for j in item["streams"]} == {spk}
    for item in splits["test"].values():
        assert [test.stream_model[j] for j in item["streams"]] == teachers
        assert {test.stream_speaker[j] for j in item["streams"]} == {"M16"}
        assert test.stream_model[item["self_stream"]] == "M16" and item["self_stream"] not in item["streams"]
