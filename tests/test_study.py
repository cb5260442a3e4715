"""The study driver (run_study.py) and its report (study_report.py, local/report.py) on the demo tree:
a tiny study of 2 folds x 1 teacher set x 2 fusions, its files, skipping and resuming, failures."""

import csv
import json
import struct
import subprocess
import sys
import zlib

import pytest

from conftest import RECIPE

DRIVER = RECIPE / "run_study.py"
REPORT = RECIPE / "study_report.py"
FAST = ["--number_of_epochs=1", "--d_model=16", "--d_ffn=32", "--n_layers=1"]
FOLDS = ["M05", "M16"]
FUSIONS = ["mean", "transformer"]
SEEDS = [1986, 1987]
CELLS = [f"{fold}_same_level_matched_{fusion}" for fold in FOLDS for fusion in FUSIONS]
RUNS = [f"{cell}/{seed}" for cell in CELLS for seed in SEEDS]
STATS = ["--n_boot=300", "--n_perm=500"]  # enough to test; keeps the report fast


def run_driver(study, *args, cwd, extra=FAST):
    cmd = [sys.executable, str(DRIVER), f"--study_folder={study}", *args, *STATS, "--", *extra]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def tiny_study_args(demo_tree):
    return [
        f"--demo_folder={demo_tree}",
        "--folds",
        *FOLDS,
        "--teacher_sets",
        "same_level",
        "--fusions",
        *FUSIONS,
        "--seeds",
        str(len(SEEDS)),
    ]


@pytest.fixture(scope="module")
def study(demo_tree, tmp_path_factory):
    """The tiny study, run once from an unrelated directory (the driver must not need the recipe cwd)."""
    elsewhere = tmp_path_factory.mktemp("cwd")
    folder = tmp_path_factory.mktemp("study") / "study"
    proc = run_driver(folder, *tiny_study_args(demo_tree), cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return folder, proc


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def results_of(folder, run):
    return json.loads((folder / run / "test_results.json").read_text())


def test_every_run_and_the_report_exist(study):
    folder, proc = study
    for run in RUNS:
        for name in ("test_results.json", "wer_test.txt", "wer_test_sa_self.txt", "wer_test_mean.txt"):
            assert (folder / run / name).is_file(), f"{run}/{name}"
        assert f"{run}: finished" in proc.stdout
    for name in ("study.md", "study.csv", "study.png", "study_runs.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".*.tmp")), "a temporary file of an atomic write was left behind"
    manifest = json.loads((folder / "study_runs.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == RUNS
    assert {r["status"] for r in manifest["runs"]} == {"finished"}
    text = (folder / "study.md").read_text()
    assert "SYNTHETIC" in text  # demo-tree numbers are labelled as such
    assert "## teacher_set=same_level, input_streams=matched, fusion=transformer" in text
    # the options the choice per teacher set gave every run, whatever its fusion
    assert all(results_of(folder, run)["matched_choice"] == {"alpha": 0.9} for run in RUNS)
    assert "Options chosen per teacher set (`matched_choices`), every run: `alpha: 0.9`." in text
    assert "| mid (58–62 %) | M05 | **KD student (transformer)**" in text
    assert "seeds 1986 1987" in text and "Holm-corrected over every test of the table" in text
    # the driver prints the report it wrote
    assert "| group | fold | system | D | L | C | CW | UW | all |" in proc.stdout


def test_csv_numbers_are_those_of_the_runs(study):
    """Every figure of study.csv is the mean over the seeds of the runs' own figures."""
    folder, _ = study
    rows = read_csv(folder / "study.csv")
    per_fold = [r for r in rows if r["scope"] == "fold" and not r["system"].startswith("best_")]
    checked = 0
    for row in per_fold:
        cell = f"{row['fold']}_{row['teacher_set']}_{row['input_streams']}_{row['fusion']}"
        runs = [results_of(folder, f"{cell}/{seed}") for seed in SEEDS]
        assert row["seed_list"] == " ".join(str(seed) for seed in SEEDS) and int(row["seeds"]) == len(SEEDS)
        systems = [r["student"] if row["system"] == "student" else r["baselines"][row["system"]] for r in runs]
        assert row["fold"] == runs[0]["held_out"] and row["group"] == runs[0]["group"]
        assert row["synthetic_data"] == "true"
        assert int(row["n"]) == systems[0]["n"] == runs[0]["n_utterances"]
        for key in ("WER", "WRA", "CER"):
            mean = sum(s[key] for s in systems) / len(systems)
            assert float(row[key]) == pytest.approx(mean, abs=1e-9), (cell, row["system"], key)
        assert [float(v) for v in row["WRA_by_seed"].split()] == pytest.approx([s["WRA"] for s in systems], abs=0.01)
        for category in systems[0]["by_category"]:
            mean = sum(s["by_category"][category]["WRA"] for s in systems) / len(systems)
            assert float(row[f"WRA_{category}"]) == pytest.approx(mean, abs=1e-9)
        for key in ("WER", "WRA"):
            low, point, high = (float(row[f"{key}_ci_low"]), float(row[key]), float(row[f"{key}_ci_high"]))
            assert low <= point <= high, (cell, row["system"], key, low, point, high)
        # clusters: the microphones of one (speaker, word) are one group
        assert int(row["n_groups"]) < int(row["n"])
        checked += 1
    assert checked >= len(CELLS) * 3  # the student and every baseline (sa_self, mean, ...) of every cell
    # the pooled rows pool the two folds of each configuration
    pooled = [r for r in rows if r["scope"] == "pooled" and r["system"] == "student"]
    assert len(pooled) == len(FUSIONS)
    for row in pooled:
        runs = [
            [results_of(folder, f"{fold}_same_level_matched_{row['fusion']}/{seed}") for fold in FOLDS]
            for seed in SEEDS
        ]
        n = sum(r["n_utterances"] for r in runs[0])
        assert int(row["n"]) == n
        wra = sum(sum(r["student"]["WRA"] * r["n_utterances"] for r in seed) / n for seed in runs) / len(SEEDS)
        assert float(row["WRA"]) == pytest.approx(wra, abs=1e-9)
    # Holm: the adjusted p-values are never below the raw ones
    for row in rows:
        if row["p_WRA"]:
            assert float(row["p_WRA_holm"]) >= float(row["p_WRA"])


def test_paired_test_of_a_system_against_itself_gives_p_1(study):
    from local.report import cell_systems, load_run, paired_stats

    folder, _ = study
    runs = [load_run(folder / f"M05_same_level_matched_transformer/{seed}", folder) for seed in SEEDS]
    systems = cell_systems(runs)
    assert systems["student"].edits.shape == (len(SEEDS), runs[0].ref.size)  # one row per seed
    same = paired_stats(systems["student"], systems["student"], n_boot=200, n_perm=500)
    assert same["p_WER"] == 1.0 and same["p_WRA"] == 1.0
    assert same["dWER"] == same["dWRA"] == 0.0
    # In the report: the `mean` fusion student *is* the untrained mean baseline.
    rows = read_csv(folder / "study.csv")
    for row in rows:
        if row["fusion"] == "mean" and row["system"] == "mean":
            assert float(row["p_WER"]) == 1.0 and float(row["p_WRA"]) == 1.0 and float(row["dWRA"]) == 0.0
    # ... while a system that differs from the student everywhere is tested for real.
    from local.report import System

    student = systems["student"]
    worse = System(**{**student.__dict__, "name": "worse", "edits": student.edits + 1})
    assert paired_stats(student, worse, n_boot=200, n_perm=500)["p_WER"] < 0.01


def test_the_figure_is_a_png(study):
    folder, _ = study
    data = (folder / "study.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])  # IHDR checksum
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"


def test_the_report_runs_alone_and_is_deterministic(study, tmp_path):
    folder, _ = study
    before = (folder / "study.csv").read_bytes()
    proc = subprocess.run(
        [sys.executable, str(REPORT), str(folder), *STATS, "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (folder / "study.csv").read_bytes() == before


def test_rerun_skips_finished_runs_and_redoes_only_a_missing_one(study, demo_tree, tmp_path):
    folder, _ = study
    results = {run: folder / run / "test_results.json" for run in RUNS}
    logs = {run: folder / "logs" / f"{run.replace('/', '_')}.err" for run in RUNS}
    mtimes = {run: path.stat().st_mtime_ns for run, path in results.items()}
    log_sizes = {run: path.stat().st_size for run, path in logs.items()}

    proc = run_driver(folder, *tiny_study_args(demo_tree), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in RUNS:
        assert f"{run}: skipped" in proc.stdout
        assert results[run].stat().st_mtime_ns == mtimes[run]
        assert logs[run].stat().st_size == log_sizes[run]  # train.py was not even started
    assert f"{len(RUNS)} skipped" in proc.stdout

    redo = "M16_same_level_matched_transformer/1987"
    results[redo].unlink()
    proc = run_driver(folder, *tiny_study_args(demo_tree), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{redo}: resumed and finished" in proc.stdout  # train.py resumed from its checkpoint
    assert results[redo].is_file()
    for run in RUNS:
        if run != redo:
            assert f"{run}: skipped" in proc.stdout
            assert results[run].stat().st_mtime_ns == mtimes[run]
            assert logs[run].stat().st_size == log_sizes[run]
    assert logs[redo].stat().st_size > log_sizes[redo]
    assert f"1 run, {len(RUNS) - 1} skipped" in proc.stdout


def test_a_failing_run_is_reported_and_the_others_go_on(copy_tree, tmp_path):
    from local.corpus import SPEAKERS

    tree = copy_tree(speakers=[s for s in SPEAKERS if s != "M16"])  # M16's logits are missing
    folder = tmp_path / "study"
    proc = run_driver(
        folder,
        f"--logit_root={tree / 'logit_extraction'}",
        f"--tokenizer_file={tree / 'tokenizer.model'}",
        "--folds",
        "M16",
        "M05",
        "--teacher_sets",
        "same_level",
        "--fusions",
        "mean",
        "--seeds",
        "1",
        "--no_progress",
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    failed = "M16_same_level_matched_mean/1986"
    assert f"{failed}: FAILED" in proc.stdout
    assert "command: " in proc.stdout and f"--output_folder={folder / failed}" in proc.stdout
    assert "ERROR:" in proc.stdout and "M16" in proc.stdout  # train.py's own message, from its stderr
    assert "M05_same_level_matched_mean/1986: finished" in proc.stdout  # the next run still ran
    assert (folder / "M05_same_level_matched_mean" / "1986" / "test_results.json").is_file()
    assert "FAILED runs (1)" in proc.stderr
    text = (folder / "study.md").read_text()  # the report covers what finished and names what did not
    assert "not finished: M16_same_level_matched_mean/1986 (failed)" in text
    manifest = json.loads((folder / "study_runs.json").read_text())
    assert [(r["name"], r["status"]) for r in manifest["runs"]] == [
        (failed, "failed"),
        ("M05_same_level_matched_mean/1986", "finished"),
    ]


def _fake_cross_run(study, tmp_path, accuracy=None, best=None):
    """A copy of a finished run with the baselines a `cross` run adds: two single teachers (copies of
    sa_self's and of the student's per-utterance results), a majority vote (a copy of the mean's) and
    the teachers' accuracy on the teacher speakers."""
    import shutil

    folder, _ = study
    run = tmp_path / "cross" / "M05_run"
    shutil.copytree(folder / "M05_same_level_matched_transformer" / "1986", run, ignore=shutil.ignore_patterns("save"))
    results = json.loads((run / "test_results.json").read_text())
    utterances = json.loads((run / "test_utterances.json").read_text())
    for name, source, summary in (
        ("teacher_F04", "sa_self", results["baselines"]["sa_self"]),
        ("teacher_M11", "student", results["student"]),
        ("majority_vote", "mean", results["baselines"]["mean"]),
    ):
        utterances["systems"][name] = utterances["systems"][source]
        results["baselines"][name] = summary
    results["teacher_accuracy"] = accuracy or {"F04": 0.3, "M11": 0.6}
    if best is not None:  # what train.py records: its choice on the training audio
        results["best_single_teacher"] = {"name": best, "accuracy": results["teacher_accuracy"][best]}
    (run / "test_results.json").write_text(json.dumps(results))
    (run / "test_utterances.json").write_text(json.dumps(utterances))
    return run.parent, results


def test_best_single_teacher_is_chosen_on_the_teachers(study, tmp_path):
    from local.report import write_report

    for accuracy in ({"F04": 0.3, "M11": 0.6}, {"F04": 0.6, "M11": 0.3}):
        folder, results = _fake_cross_run(study, tmp_path / str(accuracy["F04"]), accuracy)
        write_report(folder, n_boot=200, n_perm=200)
        rows = {r["system"]: r for r in read_csv(folder / "study.csv")}
        assert set(rows) == {
            "student",
            "sa_self",
            "mean",
            "teacher_F04",
            "teacher_M11",
            "majority_vote",
            "best_single_teacher",
            "best_teacher_on_test",
            "oracle",
        }
        # the oracle: an utterance is right when any teacher is (the fewest edits of any teacher)
        utts = json.loads((folder / "M05_run" / "test_utterances.json").read_text())["systems"]
        right = [min(a, b) == 0 for a, b in zip(utts["teacher_F04"]["edits"], utts["teacher_M11"]["edits"])]
        assert float(rows["oracle"]["WRA"]) == pytest.approx(100.0 * sum(right) / len(right), abs=1e-9)
        assert float(rows["oracle"]["WRA"]) >= max(float(rows[t]["WRA"]) for t in ("teacher_F04", "teacher_M11"))
        assert rows["oracle"]["p_WRA"] == "" and rows["oracle"]["p_WRA_holm"] == ""  # a ceiling: not tested
        chosen = max(accuracy, key=accuracy.get)  # on the teacher speakers, never the test
        row = rows["best_single_teacher"]
        assert row["chosen"] == chosen
        assert float(row["WRA"]) == pytest.approx(results["baselines"][f"teacher_{chosen}"]["WRA"], abs=1e-9)
        teachers = {n: results["baselines"][n] for n in ("teacher_F04", "teacher_M11")}
        on_test = max(teachers, key=lambda n: (teachers[n]["WRA"], n == "teacher_F04"))
        assert rows["best_teacher_on_test"]["chosen"] == on_test[len("teacher_") :]
        # teacher_M11 is a copy of the student: tested against the student it gives p = 1
        assert float(rows["teacher_M11"]["p_WER"]) == 1.0 and float(rows["teacher_M11"]["p_WRA"]) == 1.0
        assert float(rows["majority_vote"]["WRA"]) == pytest.approx(results["baselines"]["mean"]["WRA"], abs=1e-9)
        text = (folder / "study.md").read_text()
        assert row["chosen_accuracy"] == f"{100 * accuracy[chosen]:.1f}"
        assert (
            f"best teacher (chosen on the teachers) ({chosen}, {100 * accuracy[chosen]:.1f} % on the training" in text
        )
        assert "best teacher (chosen on the test)†" in text and "oracle-like" in text
        assert "| teacher_F04 |" not in text  # single teachers: CSV only


def test_the_report_takes_the_runs_own_choice_of_best_teacher(study, tmp_path):
    """Equal accuracies on the training audio: train.py broke the tie (mean log-probability of the
    reference pieces) and recorded its choice; the report shows that teacher, not the first name."""
    from local.report import write_report

    folder, results = _fake_cross_run(study, tmp_path, {"F04": 0.45, "M11": 0.45}, best="M11")
    write_report(folder, n_boot=50, n_perm=50)
    row = {r["system"]: r for r in read_csv(folder / "study.csv")}["best_single_teacher"]
    assert row["chosen"] == "M11" and row["chosen_accuracy"] == "45.0"
    assert float(row["WRA"]) == pytest.approx(results["baselines"]["teacher_M11"]["WRA"], abs=1e-9)
    assert (
        "best teacher (chosen on the teachers) (M11, 45.0 % on the training audio)" in (folder / "study.md").read_text()
    )


def test_per_utterance_results_that_disagree_with_test_results_are_an_error(study, tmp_path):
    from local.report import write_report

    folder, results = _fake_cross_run(study, tmp_path)
    run = folder / "M05_run"
    results["baselines"]["sa_self"]["WRA"] += 1.0
    (run / "test_results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="test_utterances.json: system sa_self: WRA"):
        write_report(folder, n_boot=50, n_perm=50)
    assert not (folder / "study.csv").exists()  # nothing half-written


def test_command_line_is_checked_before_anything_runs(tmp_path):
    from run_study import parse_args, plan

    with pytest.raises(SystemExit):
        parse_args(["--folds", "M99"])
    with pytest.raises(SystemExit):
        parse_args(["--", "--output_folder=x"])  # set by the driver per run
    with pytest.raises(SystemExit):
        parse_args(["--logit_root=somewhere"])  # a real tree needs its tokenizer
    with pytest.raises(SystemExit):
        parse_args(["--", "--seed=3"])  # seeds are the driver's: --seeds / --first_seed
    args = parse_args(
        [
            f"--study_folder={tmp_path / 's'}",
            "--folds",
            "M08",
            "M01",
            "--fusions",
            "mean",
            "attention",
            "--seeds",
            "2",
            "--first_seed",
            "7",
            "--threads",
            "2",
            "--",
            "--lr=0.001",
        ]
    )
    study, runs = plan(args)
    assert [r["name"] for r in runs] == [
        f"{f}_{t}_matched_{u}/{seed}"
        for f in ("M08", "M01")
        for t in ("same_level", "all_others")
        for u in ("mean", "attention")
        for seed in (7, 8)
    ]
    command = runs[1]["command"]
    assert command[0] == sys.executable and command[1] == str(RECIPE / "train.py")
    assert "--seed=8" in command and "--threads=2" in command and "--lr=0.001" in command
    assert "--noprogressbar" in command and f"--cache_folder={study / 'cache'}" in command
    assert f"--output_folder={study / runs[1]['name']}" in command
    assert not (tmp_path / "s").exists()  # planning writes nothing
    from run_study import child_environment

    assert child_environment(3)["OMP_NUM_THREADS"] == "3" == child_environment(3)["MKL_NUM_THREADS"]
    _, runs = plan(parse_args(["--folds", "M08", "--nproc_per_node=2"]))
    assert runs[0]["command"][:5] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
    ]
