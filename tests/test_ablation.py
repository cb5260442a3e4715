"""The ablation (ablate.py, local/ablation.py): the choice reads the teacher speakers' validation
figures only, a bad grid stops before anything is written, and the whole chain on one fold."""

import json
import subprocess
import sys

import pytest
import yaml

from local.ablation import UNTRAINED, AblationError, choices, load_grid, render, run_folder

from conftest import RECIPE, TEST_CACHE

ABLATE = RECIPE / "ablate.py"
FOLDS = ["M08", "M16"]
SEEDS = [1986]


def grid(tmp_path, settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"settings": settings}))
    return path


MATCHED = {"matched": {"base": {}, "candidates": {"default": {}, "small": {"d_model": 32}}}}


def write_run(folder, valid, valid_mean, test, test_mean, sa_self, overrides=None):
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "input_streams": "matched",
        "fusion": "transformer",
        "overrides": {"held_out": "M16", "seed": 1986, **(overrides or {})},
        "partial": None,
        "data_kind": "demo",
        "synthetic_data": True,
        "teachers": ["F02", "M07"],
        "validation": {"loss": 1.0, "WRA": valid, "WRA_mean": valid_mean},
        "student": {"WRA": test},
        "baselines": {"mean": {"WRA": test_mean}, "sa_self": {"WRA": sa_self}},
    }
    (folder / "test_results.json").write_text(json.dumps(info))


def fake_ablation(tmp_path, figures):
    """figures: {candidate: {fold: (valid, test)}}; the untrained fusion: valid 50, test 60."""
    spec = load_grid(grid(tmp_path, MATCHED))
    folder = tmp_path / "ablation"
    for name, per_fold in figures.items():
        for fold, (valid, test) in per_fold.items():
            path = run_folder(folder, "matched", name, fold, "same_level", spec["matched"], SEEDS[0])
            write_run(path, valid, 50.0, test, 60.0, 60.0, MATCHED["matched"]["candidates"][name])
    return folder, spec


def chosen(folder, spec):
    return choices(folder, spec, FOLDS, ["same_level"], SEEDS)["matched/same_level"]


def test_the_choice_reads_the_teacher_speakers_validation_only(tmp_path):
    """The held-out speakers' figures can be anything: the choice follows the validation figures
    (and does change when those change, so the test can fail)."""
    folder, spec = fake_ablation(tmp_path, {"default": {"M08": (55, 90), "M16": (52, 80)},
                                            "small": {"M08": (57, 10), "M16": (53, 10)}})  # fmt: skip
    assert chosen(folder, spec) == "small"
    # the held-out speakers' figures of every run changed: the same choice
    for path in folder.rglob("test_results.json"):
        info = json.loads(path.read_text())
        info["student"]["WRA"] = 100.0 - info["student"]["WRA"]
        info["baselines"] = {k: {"WRA": 0.0} for k in info["baselines"]}
        path.write_text(json.dumps(info))
    assert chosen(folder, spec) == "small"
    # the validation figures changed: another choice
    path = (
        run_folder(folder, "matched", "default", "M08", "same_level", spec["matched"], SEEDS[0]) / "test_results.json"
    )
    info = json.loads(path.read_text())
    info["validation"]["WRA"] = 70.0
    path.write_text(json.dumps(info))
    assert chosen(folder, spec) == "default"


def test_a_tie_goes_to_the_row_listed_first_and_untrained_can_win(tmp_path):
    folder, spec = fake_ablation(tmp_path, {"default": {"M08": (55, 70), "M16": (50, 70)},
                                            "small": {"M08": (50, 70), "M16": (55, 70)}})  # fmt: skip
    assert chosen(folder, spec) == "default"  # 52.5 each: the defaults come first
    folder, spec = fake_ablation(tmp_path / "b", {"default": {"M08": (45, 90), "M16": (49, 90)},
                                                  "small": {"M08": (44, 90), "M16": (40, 90)}})  # fmt: skip
    assert chosen(folder, spec) == UNTRAINED  # the mean of the streams (valid 50) beats both
    folder, spec = fake_ablation(tmp_path / "c", {"default": {"M08": (50, 90), "M16": (50, 90)},
                                                  "small": {"M08": (40, 90), "M16": (40, 90)}})  # fmt: skip
    assert chosen(folder, spec) == UNTRAINED  # a tie with the untrained fusion: training must earn its place
    text = render(folder, spec, FOLDS, ["same_level"], SEEDS)
    assert "| untrained ✓ |" in text and "| `sa_self` |" in text


def test_a_candidate_not_eligible_is_shown_and_never_chosen(tmp_path):
    folder, spec = fake_ablation(tmp_path, {"default": {"M08": (55, 70), "M16": (52, 70)},
                                            "small": {"M08": (60, 90), "M16": (60, 90)}})  # fmt: skip
    assert chosen(folder, spec) == "small"
    spec["matched"]["not_eligible"] = {"small": "too slow"}
    assert chosen(folder, spec) == "default"
    text = render(folder, spec, FOLDS, ["same_level"], SEEDS)
    assert "| small | `d_model: 32` (not eligible: too slow) |" in text and "| default ✓ |" in text


def test_a_candidate_without_every_fold_is_not_chosen_and_the_table_says_so(tmp_path):
    folder, spec = fake_ablation(tmp_path, {"default": {"M08": (55, 70), "M16": (50, 70)},
                                            "small": {"M08": (99, 70)}})  # fmt: skip
    assert chosen(folder, spec) == "default"
    text = render(folder, spec, FOLDS, ["same_level"], SEEDS)
    assert "Unfinished: 3 of 4 runs" in text and "| small | unfinished |" in text


def test_runs_without_validation_figures_or_partial_are_refused(tmp_path):
    folder, spec = fake_ablation(tmp_path, {"default": {"M08": (55, 70), "M16": (50, 70)}})
    path = (
        run_folder(folder, "matched", "default", "M16", "same_level", spec["matched"], SEEDS[0]) / "test_results.json"
    )
    info = json.loads(path.read_text())
    info["partial"] = "--debug"
    path.write_text(json.dumps(info))
    with pytest.raises(AblationError, match="partial run"):
        chosen(folder, spec)
    del info["validation"]
    info["partial"] = None
    path.write_text(json.dumps(info))
    with pytest.raises(AblationError, match="no validation figures"):
        chosen(folder, spec)


def test_runs_of_an_edited_grid_are_refused(tmp_path):
    """A candidate's runs made with other options than the grid gives it now are not shown under
    its new description."""
    folder, spec = fake_ablation(tmp_path, {"default": {"M08": (55, 70), "M16": (50, 70)},
                                            "small": {"M08": (56, 70), "M16": (51, 70)}})  # fmt: skip
    spec["matched"]["candidates"]["small"] = {"d_model": 16}
    with pytest.raises(AblationError, match="the grid changed since"):
        chosen(folder, spec)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"matched": {"candidates": {"a": {"input_streams": "both"}}}}, "--input_streams=both is not allowed"),
        ({"matched": {"candidates": {"a": {"fusion": "mean"}}}}, "the mean fusion is the `untrained` row"),
        ({"matched": {"candidates": {"a": {"held_out": "M08"}}}}, "--held_out is set by ablate.py"),
        ({"x": {"candidates": {"a": {}, "b": {"input_streams": "cross"}}}}, "tested on different inputs"),
        ({"matched": {"candidates": {}}}, "no candidates"),
        ({"matched": {"candidates": {"untrained": {}}}}, "the untrained fusion's row"),
        ({"matched": {"candidates": {"a": {"alhpa": 0.3}}}}, "unknown option alhpa (did you mean alpha?)"),
        ({"matched": {"candidates": {"a": {"alpha": 7}}}}, "--alpha=7 is not allowed"),
        ({"matched": {"candidates": {"a": {"valid_fraction": 0.2}}}}, "decides the validation items"),
        ({"matched": {"candidates": {"../a": {}}}}, "a candidate's name is letters"),
        ({"matched": {"candidates": {"a": {"debug": True}}}}, "--debug is set by ablate.py"),
        ({"matched": {"candidates": {"a": {"matched_choice": True}}}}, "--matched_choice is set by ablate.py"),
        ({"matched": {"candidates": {"a": {}}, "not_eligible": {"b": "slow"}}}, "not_eligible: b is not a candidate"),
        ({"matched": {"candidates": {"a": {}}, "not_eligible": {"a": ""}}}, "why it cannot be chosen"),
    ],
)
def test_a_bad_grid_stops_with_one_line_before_anything_is_written(tmp_path, settings, message):
    out = tmp_path / "ablation"
    proc = subprocess.run(
        [sys.executable, str(ABLATE), f"--grid={grid(tmp_path, settings)}", f"--ablation_folder={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_value_given_twice_stops_before_anything_is_written(tmp_path):
    out = tmp_path / "ablation"
    proc = subprocess.run(
        [sys.executable, str(ABLATE), f"--ablation_folder={out}", "--folds", "M08", "M08"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--folds M08 M08: a value is given twice" in proc.stderr
    assert not out.exists()


def test_the_ablation_on_one_fold_end_to_end(tmp_path, demo_tree):
    """Two candidates on demo M16: trained through run_study.py, the table and the choice written,
    the choice that of the best validation WRA; a second call runs nothing new."""
    settings = {
        "matched": {
            "base": {"number_of_epochs": 2, "d_ffn": 32, "n_layers": 1},
            "candidates": {"default": {"d_model": 16}, "self_items": {"d_model": 16, "input_streams": "self"}},
        }
    }
    out = tmp_path / "ablation"
    command = [
        sys.executable,
        str(ABLATE),
        f"--grid={grid(tmp_path, settings)}",
        f"--ablation_folder={out}",
        f"--demo_folder={demo_tree}",
        f"--cache_folder={TEST_CACHE}",
        "--folds",
        "M16",
        "--teacher_sets",
        "same_level",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen_row = json.loads((out / "ablation.json").read_text())["chosen"]["matched/same_level"]
    valid = {}
    for name, streams in (("default", "matched"), ("self_items", "self")):
        info = json.loads(
            (out / "matched" / name / f"M16_same_level_{streams}_transformer/1986/test_results.json").read_text()
        )
        assert info["input_streams"] == streams and info["overrides"]["d_model"] == 16
        assert info["matched_choice"] == {} and info["alpha"] == 0.7  # the options as written
        valid[name] = info["validation"]["WRA"]
        valid[UNTRAINED] = info["validation"]["WRA_mean"]
    best = max(valid.values())
    assert chosen_row == next(n for n in (UNTRAINED, "default", "self_items") if valid[n] >= best - 1e-9)
    table = (out / "ablation.md").read_text()
    assert f"| {chosen_row} ✓ |" in table and "valid M16" in table and "| `sa_self` |" in table
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0 and (out / "ablation.md").read_text() == table
    assert "skipped (finished" in (out / "logs" / "matched_default.log").read_text()
