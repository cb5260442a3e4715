"""The configuration chosen per teacher set for ``input_streams: matched`` (``matched_choice`` and
``matched_choices`` in hparams/logit_kd.yaml): when it applies, that what a run sets wins over it,
that the fingerprint holds the options it resolves to, that ``matched_items: own`` gives the items
of ``input_streams: self``, and that a study or an ablation folder made without it is not taken for
one made with it."""

import json
import shlex

import pytest

from local.fingerprint import option_fingerprint
from local.folds import build_items, store_pairs, teacher_speakers, validation_groups
from local.options import CHECKS, HparamsError, check_value, load_fold_hparams
from local.store import LogitStore, TokenTable, load_tokenizer

from conftest import RECIPE

HPARAMS = RECIPE / "hparams"
WRITTEN = {"alpha": 0.7, "matched_items": "all", "max_train_items": None}  # logit_kd.yaml as written


def load(fold, tmp_path, *cli):
    """(hparams, the options the choice gave) of a fold file with command-line options."""
    cli = [f"--output_folder={tmp_path / 'out'}", *cli]
    text = "\n".join(f"{k[2:]}: {v}" for k, v in (item.split("=", 1) for item in cli))
    _, _, hparams = load_fold_hparams(str(HPARAMS / f"fold_{fold}.yaml"), text)
    return hparams, hparams["matched_choice_applied"]


def resolved(hparams):
    return {k: hparams[k] for k in WRITTEN}


def test_the_yaml_holds_one_choice_per_teacher_set_and_it_is_checked(tmp_path):
    hparams, _ = load("M08", tmp_path)
    assert set(hparams["matched_choices"]) == {"same_level", "all_others"}
    assert check_value("matched_choices", hparams["matched_choices"]) is None
    assert hparams["matched_choice"] is True


@pytest.mark.parametrize(
    "fold,cli,teacher_set,chosen",
    [
        ("M08", [], "same_level", {"alpha": 0.9}),
        ("M05", [], "same_level", {"alpha": 0.9}),
        ("M16", [], "same_level", {"alpha": 0.9}),
        ("M01", [], "all_others", {"matched_items": "own", "max_train_items": 3000}),
        ("M08", ["--teacher_set=all_others"], "all_others", {"matched_items": "own", "max_train_items": 3000}),
        ("M01", ["--teacher_set=same_level"], "same_level", {"alpha": 0.9}),
    ],
)
def test_a_matched_run_gets_its_teacher_sets_choice(tmp_path, fold, cli, teacher_set, chosen):
    hparams, applied = load(fold, tmp_path, *cli)
    assert hparams["teacher_set"] == teacher_set
    assert applied == chosen
    assert resolved(hparams) == {**WRITTEN, **chosen}


@pytest.mark.parametrize(
    "fold,cli,expected",
    [
        # what the run sets wins, and the choice then applies not at all (never half of it)
        ("M08", ["--alpha=0.5"], {**WRITTEN, "alpha": 0.5}),
        ("M01", ["--max_train_items=2000"], {**WRITTEN, "max_train_items": 2000}),
        ("M01", ["--matched_items=all"], WRITTEN),
        ("M01", ["--matched_choice=false"], WRITTEN),
        ("M08", ["--matched_choice=false"], WRITTEN),
        ("M01", ["--input_streams=self"], WRITTEN),
        ("M08", ["--input_streams=cross"], WRITTEN),
        ("M08", ["--teachers=[F02,M07]"], WRITTEN),  # teachers by list: no teacher set to choose for
    ],
)
def test_what_the_run_sets_wins_over_the_choice(tmp_path, fold, cli, expected):
    hparams, applied = load(fold, tmp_path, *cli)
    assert applied == {}
    assert resolved(hparams) == expected


def test_an_option_outside_the_choice_leaves_it_whole(tmp_path):
    hparams, applied = load("M01", tmp_path, "--alpha=0.5")
    assert applied == {"matched_items": "own", "max_train_items": 3000}
    assert resolved(hparams) == {"alpha": 0.5, "matched_items": "own", "max_train_items": 3000}


def test_a_changed_choice_on_the_command_line_is_merged_and_checked(tmp_path):
    hparams, applied = load("M08", tmp_path, "--matched_choices={same_level: {alpha: 0.8}}")
    assert applied == {"alpha": 0.8} and hparams["alpha"] == 0.8
    hparams, applied = load("M01", tmp_path, "--matched_choices={same_level: {alpha: 0.8}}")
    assert applied == {"matched_items": "own", "max_train_items": 3000}  # the other teacher set's is kept
    assert hparams["matched_choices"]["same_level"] == {"alpha": 0.8}
    # a teacher set given is replaced whole: {} is the options as written for it
    hparams, applied = load("M08", tmp_path, "--matched_choices={same_level: {}}")
    assert applied == {} and resolved(hparams) == WRITTEN and hparams["matched_choices"]["same_level"] == {}
    for bad, says in [
        ("{same_level: {teacher_set: all_others}}", "same_level: teacher_set is not one"),
        ("{same_level: {alpha: 2}}", "same_level: alpha must be"),
        ("{same_level: {alhpa: 0.8}}", "same_level: alhpa is not one"),
        ("{everyone: {alpha: 0.8}}", "a mapping {same_level"),
    ]:
        with pytest.raises(HparamsError) as err:
            load("M08", tmp_path, f"--matched_choices={bad}")
        assert str(err.value).startswith("--matched_choices=") and says in str(err.value), str(err.value)
        assert "\n" not in str(err.value)


def test_own_items_are_refused_where_they_mean_nothing(tmp_path):
    with pytest.raises(HparamsError, match=r"--matched_items=own is not allowed with input_streams cross"):
        load("M08", tmp_path, "--input_streams=cross", "--matched_items=own")
    assert "matched_items" in CHECKS and check_value("matched_items", "some") is not None


def test_the_fingerprint_holds_the_resolved_options(tmp_path):
    teachers = ["F03", "M04", "M12"]
    chosen, _ = load("M01", tmp_path)
    written, _ = load("M01", tmp_path, "--matched_choice=false")
    spelled, _ = load("M01", tmp_path, "--matched_items=own", "--max_train_items=3000")
    a, b, c = (option_fingerprint(h, teachers)["options"] for h in (chosen, written, spelled))
    assert a["matched_items"] == "own" and a["max_train_items"] == 3000
    assert a == c  # the choice is the options it sets, nothing else: the same model as spelled out
    assert a != b
    # runs made before matched_items existed (the options as written) keep their fingerprint
    assert "matched_items" not in b and "max_train_items" not in b
    assert "matched_choice" not in a and "matched_choices" not in a
    same_level, _ = load("M08", tmp_path)
    assert option_fingerprint(same_level, teachers)["options"]["alpha"] == 0.9


def test_own_items_are_the_items_of_self(demo_tree):
    tokens = TokenTable(load_tokenizer(demo_tree / "tokenizer.model"))
    teachers = teacher_speakers("M05", "same_level")
    train_pairs, test_pairs = store_pairs("M05", teachers, "matched")
    train = LogitStore(demo_tree / "logit_extraction", tokens, train_pairs)
    test = LogitStore(demo_tree / "logit_extraction", tokens, test_pairs)
    groups = validation_groups(train, 0.2, 7)
    own = build_items(train, test, "M05", teachers, "matched", groups, matched_items="own")
    self_ = build_items(train, test, "M05", teachers, "self", groups)
    every = build_items(train, test, "M05", teachers, "matched", groups)
    assert own == self_
    assert own["valid"] == every["valid"] and own["test"] == every["test"]  # only training items differ
    assert len(own["train"]) > len(every["train"])
    assert all(len(item["streams"]) == 1 for item in own["train"].values())


def _planned_run(study, fold, *extra):
    import run_study

    args = run_study.parse_args(
        [f"--study_folder={study}", "--folds", fold, "--teacher_sets", "same_level", "--seeds", "1", "--", *extra]
    )
    return run_study.plan(args)[1][0]


def _finish(study, run, choice):
    """A finished run's results file, as train.py writes it (the fields run_study.py reads)."""
    folder = study / run["name"]
    folder.mkdir(parents=True)
    info = {
        "held_out": run["fold"],
        "teacher_set": run["teacher_set"],
        "input_streams": run["input_streams"],
        "fusion": run["fusion"],
        "seed": run["seed"],
        "overrides": {},
    }
    if choice is not None:
        info["matched_choice"] = choice
    (folder / "test_results.json").write_text(json.dumps(info))


def test_a_study_run_made_without_the_choice_is_not_taken_for_one_with_it(tmp_path):
    import run_study

    run = _planned_run(tmp_path / "a", "M08")
    assert run_study.planned_choice(run) == {"alpha": 0.9}
    _finish(tmp_path / "a", run, None)  # made before the choice existed
    assert run_study.changed_options(tmp_path / "a", run, None) == ("options chosen per teacher set none -> alpha=0.9")
    # the same folder is the run of --matched_choice=false, with or without the manifest's command
    off = _planned_run(tmp_path / "a", "M08", "--matched_choice=false")
    assert run_study.planned_choice(off) == {}
    assert run_study.changed_options(tmp_path / "a", off, None) == ""
    assert run_study.changed_options(tmp_path / "a", off, {"command": run["command"]}) == ""
    # and a run made with the choice is not the run of the options as written
    run = _planned_run(tmp_path / "b", "M05")
    _finish(tmp_path / "b", run, {"alpha": 0.9})
    assert run_study.changed_options(tmp_path / "b", run, {"command": run["command"]}) == ""
    off = _planned_run(tmp_path / "b", "M05", "--matched_choice=false")
    assert "alpha=0.9 -> none" in run_study.changed_options(tmp_path / "b", off, {"command": run["command"]})


def test_the_ablation_runs_every_candidate_against_the_options_as_written():
    import ablate

    commands = [command for _setting, _name, command in ablate.jobs(ablate.parse_args([]))]
    assert len(commands) > 2
    for command in commands:
        assert "--matched_choice=false" in command[command.index("--") + 1 :], shlex.join(command)


def test_each_choice_is_a_candidate_of_the_ablation_grid():
    """The options chosen per teacher set are a candidate of hparams/ablation.yaml's matched setting
    that the grid may choose (``input_streams: self`` is ``matched_items: own``), so that the table
    that chose them is the table of those options."""
    import yaml

    from local.options import base_doc

    grid = yaml.safe_load((HPARAMS / "ablation.yaml").read_text())["settings"]["matched"]
    candidates = {}
    for name, config in grid["candidates"].items():
        config = {**grid["base"], **config}
        if config.pop("input_streams", "matched") == "self":
            config["matched_items"] = "own"
        candidates[name] = config
    choices = base_doc(HPARAMS / "logit_kd.yaml")["matched_choices"]
    for teacher_set, chosen in choices.items():
        names = [n for n, c in candidates.items() if c == dict(chosen) and n not in grid.get("not_eligible", {})]
        assert names, f"{teacher_set}: {dict(chosen)} is no eligible candidate of the grid"


def test_a_runs_hyperparams_yaml_gives_its_options_again(tmp_path):
    """hyperparams.yaml holds the resolved options with the choice off: loaded as a plain hparams
    file it gives the run's options, whether the choice applied or the run set one of its options."""
    from local.run_folder import write_hyperparams

    for fold, cli in (("M08", []), ("M08", ["--alpha=0.5"]), ("M01", [])):
        out = tmp_path / f"{fold}_{len(cli)}"
        cli = [f"--output_folder={out}", *cli]
        text = "\n".join(f"{k[2:]}: {v}" for k, v in (item.split("=", 1) for item in cli))
        base, overrides, hparams = load_fold_hparams(str(HPARAMS / f"fold_{fold}.yaml"), text)
        out.mkdir(exist_ok=True)  # loading built the Checkpointer, which made its save folder
        write_hyperparams(out, base, {**overrides, "matched_choice": False})
        _, _, again = load_fold_hparams(str(out / "hyperparams.yaml"), f"output_folder: {out}")
        assert resolved(again) == resolved(hparams) and again["matched_choice_applied"] == {}


def test_a_folder_of_the_options_as_written_names_the_way_out(tmp_path):
    from local.fingerprint import FingerprintError, check_fingerprint

    written, _ = load("M08", tmp_path, "--matched_choice=false")
    chosen, applied = load("M08", tmp_path)
    ckpt = tmp_path / "save" / "CKPT+x"
    ckpt.mkdir(parents=True)
    (ckpt / "CKPT.yaml").write_text("end-of-epoch: true\n")
    (ckpt / "fingerprint.ckpt").write_text(json.dumps(option_fingerprint(written, ["F05"])))
    check_fingerprint(tmp_path / "save", option_fingerprint(written, ["F05"]), {})
    with pytest.raises(FingerprintError) as err:
        check_fingerprint(tmp_path / "save", option_fingerprint(chosen, ["F05"]), applied)
    message = str(err.value)
    assert "alpha 0.7 -> 0.9" in message and "--matched_choice=false gives the options as written" in message
    assert "\n" not in message


def test_help_shows_what_a_fold_gets():
    from local.options import describe_options

    text = describe_options(HPARAMS / "fold_M01.yaml")
    assert "--max_train_items         3000 (chosen for all_others; null as written)" in text
    assert "--matched_items           own (chosen for all_others; all as written)" in text
    text = describe_options(HPARAMS / "fold_M16.yaml")
    assert "--alpha                   0.9 (chosen for same_level; 0.7 as written)" in text
    assert "--max_train_items         null\n" in text


def test_a_choice_may_not_change_what_names_a_run():
    for key, value in (("fusion", "mean"), ("seed", 3), ("threads", 2), ("input_streams", "self")):
        problem = check_value("matched_choices", {"same_level": {key: value}})
        assert problem and f"same_level: {key} is not one" in problem


def test_a_study_plan_with_a_tagged_pass_through_option_is_read(tmp_path):
    import run_study

    run = _planned_run(tmp_path, "M08", "--save_folder=!ref <output_folder>/save")
    assert run_study.planned_choice(run) == {"alpha": 0.9}


def test_the_ablations_matched_choices_are_printed_as_the_option(tmp_path):
    """ablate.py says its matched choices as train.py's matched_choices option; given back, that
    option makes a run get what the ablation chose."""
    import yaml

    from local.ablation import UNTRAINED, as_matched_choices

    grid = yaml.safe_load((HPARAMS / "ablation.yaml").read_text())["settings"]
    grid["matched"].setdefault("base", {})
    chosen = {"matched/same_level": "as_written", "matched/all_others": "self_items_2000", "cross/same_level": "T_1"}
    choices, unsaid = as_matched_choices(chosen, grid)
    assert choices == {"same_level": {}, "all_others": {"matched_items": "own", "max_train_items": 2000}}
    assert unsaid == {}
    _, unsaid = as_matched_choices({"matched/all_others": UNTRAINED}, grid)
    assert "sa_self" in unsaid["all_others"]
    option = "{same_level: {}, all_others: {matched_items: own, max_train_items: 2000}}"
    hparams, applied = load("M01", tmp_path, f"--matched_choices={option}")
    assert applied == {"matched_items": "own", "max_train_items": 2000}
    hparams, applied = load("M08", tmp_path, f"--matched_choices={option}")
    assert applied == {} and resolved(hparams) == WRITTEN
