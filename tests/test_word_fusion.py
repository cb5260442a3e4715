"""word_fusion.py: word-level combinations of the SA models' decodes, fitted on teacher speakers only;
on crafted files (exact expectations) and on the real cross-testing files."""

import random
import subprocess
import sys

import pytest
from test_compare import write_sb_file
from word_fusion import combine_fold, read_cross_testing, run, statistics, tables

from local.combine import vote, vote_weight

from compare import compare
from conftest import RECIPE, check_table

TEACHERS = ("F05", "M09", "M10", "M14")  # the same_level teachers of M08
WORDS = {"CW1": "COME", "CW2": "WE", "LA": "ALPHA", "LZ": "ZULU", "D1": "ONE"}


def hypothesis(model, speaker, key, mic):
    """Crafted decodes: on the teacher speakers' audio M14 is the best model, on M08 it is M09;
    M10 is always wrong in its own way; the other models agree on a shared wrong word half the time."""
    word = WORDS[key]
    if model == "M10":
        return ["WRONG" + key]
    if speaker == "M08":
        if model == "M09":
            return [word]
        return [word] if (key, mic) in {("CW1", "M2"), ("LA", "M2")} else ["SHARED"]
    if model == "M14":
        return [word]
    return [word] if mic == "M2" else ["OTHER" + model]


def write_cross_testing(folder, order=None):
    pairs = [(m, s) for m in TEACHERS for s in (*TEACHERS, "M08") if m != s]
    if order is not None:
        random.Random(order).shuffle(pairs)
    for model, speaker in pairs:
        rows = [
            (f"{speaker}_B3_{key}_{mic}", [word], hypothesis(model, speaker, key, mic))
            for key, word in WORDS.items()
            for mic in ("M2", "M3")
        ]
        (folder / model).mkdir(parents=True, exist_ok=True)
        write_sb_file(folder / model / f"wer_{speaker}.txt", rows)
    return folder


def test_the_best_single_model_is_chosen_on_the_teachers_not_the_test(tmp_path):
    files, notes = read_cross_testing(write_cross_testing(tmp_path / "ct"))
    assert not notes
    fold = combine_fold(files, "M08", "same_level")
    assert fold["models"] == list(TEACHERS)
    assert fold["best_single"] == "M14" and fold["best_single_test"] == "M09"
    right = fold["per_utterance"]
    n = len(fold["ids"])
    assert sum(right["best_single"]["right"]) == 2  # M14 on M08: only the two (word, M2) the others share
    assert sum(right["best_single_test"]["right"]) == n  # M09: every word
    assert sum(right["oracle"]["right"]) == n
    # majority vote: F05 and M14 agree on SHARED (or on the word) against M09 and M10: never a tie
    assert fold["ties"] == 0 and right["majority_vote"]["right"] == right["best_single"]["right"]
    # mean of models: per utterance the share of the 4 models right
    assert right["mean_of_models"]["right"][0] in (0.25, 0.75)


def test_the_combinations_do_not_depend_on_the_order_of_the_files(tmp_path):
    a = combine_fold(read_cross_testing(write_cross_testing(tmp_path / "a", order=1))[0], "M08", "same_level")
    b = combine_fold(read_cross_testing(write_cross_testing(tmp_path / "b", order=2))[0], "M08", "same_level")
    assert a["per_utterance"] == b["per_utterance"] and a["ties"] == b["ties"]


def test_vote_is_order_free_and_counts_ties():
    hyps = [["A"], ["B"], ["B"], ["A"], ["C"]]
    top = vote(hyps)
    assert set(top) == {("A",), ("B",)}  # a tie
    for perm in ([4, 3, 2, 1, 0], [1, 0, 3, 2, 4]):
        assert set(vote([hyps[k] for k in perm])) == set(top)
    assert set(vote(hyps, weights=[1, 1, 1, 1.5, 0])) == {("A",)}
    # a system better than chance never votes against a word, however bad
    assert vote_weight(0.01, 1000, 255) > 0 and vote_weight(0.9, 1000, 255) > vote_weight(0.5, 1000, 255)


def test_a_file_stored_under_another_speakers_name_is_read_by_its_ids(tmp_path):
    folder = write_cross_testing(tmp_path / "ct")
    (folder / "F05" / "wer_M08.txt").rename(folder / "F05" / "wer_X99.txt")
    files, notes = read_cross_testing(folder)
    assert ("F05", "M08") in files and notes == ["F05/wer_X99.txt holds speaker M08's utterances"]


def test_statistics_and_tables_of_crafted_files(tmp_path):
    files, _ = read_cross_testing(write_cross_testing(tmp_path / "ct"))
    folds = statistics([combine_fold(files, "M08", "same_level")], n_boot=200, n_perm=200)
    systems = folds[0]["systems"]
    assert systems["best_single_test"]["WRA"] == pytest.approx(100.0)
    assert systems["best_single"]["WRA"] == pytest.approx(20.0) and "p_holm" in systems["majority_vote"]
    assert systems["best_single"]["WRA_ci"][0] <= 20.0 <= systems["best_single"]["WRA_ci"][1]
    text = tables(folds, 200, 200, [])
    assert "| M08 (high) | 4 | 20.0 [" in text and "(M14)" in text and "(M09)" in text


@pytest.fixture(scope="module")
def real(shared_uaspeech):
    return run(shared_uaspeech / "cross_testing", n_boot=200, n_perm=500)


def test_real_files_facts(real):
    results, notes = real
    assert notes == []  # the shared copy stores each file under the speaker its utterances belong to
    by = {(f["held_out"], f["teacher_set"]): f for f in results}
    m08 = by[("M08", "all_others")]
    assert len(m08["models"]) == 14 and len(m08["ids"]) == 1785
    assert m08["best_single_test"] == "F02"
    assert m08["systems"]["best_single_test"]["WRA"] == pytest.approx(87.84, abs=0.01)  # F02's own file
    assert m08["ties"] == 48 and by[("M01", "all_others")]["ties"] == 203  # counted, order-free
    for fold in results:
        s = fold["systems"]
        assert s["oracle"]["WRA"] >= max(v["WRA"] for k, v in s.items() if k != "oracle")
        assert 0.0 <= s["mean_of_models"]["WRA"] <= s["oracle"]["WRA"]


def test_readme_table_is_the_commands_output(shared_uaspeech, tmp_path):
    """The README's real-data table is what `make_tables.py` renders from `word_fusion.py`'s output."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(RECIPE / "word_fusion.py"),
            str(shared_uaspeech / "cross_testing"),
            "--out",
            str(results / "word_fusion"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    check_table("word_fusion", results)


def write_tied_cross_testing(folder):
    """M08's same_level teachers on M08's audio split 2 against 2 on every utterance: F05 and M09
    wrong, M10 and M14 right. On the teacher speakers' audio M14 is the best model. The tie goes to
    M14's right word under the accuracy ranking; by name (F05) it would be wrong; an equal share per
    tied hypothesis would give half."""
    for model in TEACHERS:
        for speaker in (*TEACHERS, "M08"):
            if model == speaker:
                continue
            rows = []
            for k, (key, word) in enumerate(WORDS.items()):
                utt = f"{speaker}_B3_{key}_M2"
                if speaker == "M08":
                    hyp = [word] if model in ("M10", "M14") else ["WRONG"]
                else:  # M14 always right, the others on the first two words only
                    hyp = [word] if model == "M14" or k < 2 else ["OTHER"]
                rows.append((utt, [word], hyp))
            (folder / model).mkdir(parents=True, exist_ok=True)
            write_sb_file(folder / model / f"wer_{speaker}.txt", rows)
    return folder


def test_compare_and_word_fusion_give_one_vote_figure(tmp_path):
    """The one tie rule of the project (combine.VOTE_RULE): compare.py on the held-out speaker's
    files (ranked by each model's other speakers' files) and word_fusion.py (ranked on the teacher
    speakers) give the same vote, utterance by utterance, on crafted files where every utterance is
    a tie and the rule decides the figure."""
    folder = write_tied_cross_testing(tmp_path / "ct")
    files, _ = read_cross_testing(folder)
    fold = combine_fold(files, "M08", "same_level")
    assert fold["ties"] == len(WORDS) and fold["best_single"] == "M14"
    fused = fold["per_utterance"]["majority_vote"]
    assert fused["right"] == [1.0] * len(WORDS)  # M14's word, not F05's (by name) nor half of each
    result = compare(sorted(folder.glob("*/wer_M08.txt")), n_perm=50, n_boot=20)
    assert result["majority_vote"]["ties"] == fold["ties"]
    assert result["majority_vote"]["WRA"] == pytest.approx(100.0 * sum(fused["right"]) / len(fused["right"]))
    assert result["majority_vote"]["edits"] == sum(fused["edits"])
    ranking = result["majority_vote"]["ranking"]
    for model in TEACHERS:
        assert ranking[f"{model}/wer_M08"]["accuracy"] == pytest.approx(fold["teacher_accuracy"][model]["accuracy"])


def test_compare_and_word_fusion_give_one_vote_figure_on_the_real_m08_files(real, shared_uaspeech):
    """The same on the 14 real M08 files: compare.py's vote and word_fusion.py's all_others vote."""
    results, _ = real
    fold = next(f for f in results if f["held_out"] == "M08" and f["teacher_set"] == "all_others")
    result = compare(sorted((shared_uaspeech / "cross_testing").glob("*/wer_M08.txt")), n_perm=50, n_boot=20)
    assert result["majority_vote"]["ties"] == fold["ties"] == 48
    assert result["majority_vote"]["WRA"] == pytest.approx(fold["systems"]["majority_vote"]["WRA"], abs=1e-9)
    assert result["majority_vote"]["edits"] == sum(fold["per_utterance"]["majority_vote"]["edits"])
    assert result["majority_vote"]["WRA"] == pytest.approx(87.45, abs=0.005)
