"""The recipe end to end: train.py on the synthetic demo tree, its outputs, and their parity with an
independent recomputation from the files on disk."""

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import RECIPE, TEST_CACHE
from test_scoring import edit_distance

FAST = ["--d_model=16", "--d_ffn=32", "--n_layers=1", "--noprogressbar"]


def run_recipe(fold, *args, demo_tree=None, cwd=RECIPE, check=True):
    """Runs train.py (by path) with a fold file; returns the CompletedProcess."""
    cmd = [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / f"fold_{fold}.yaml"), *args]
    if demo_tree is not None:
        cmd.append(f"--demo_folder={demo_tree}")
    if not any(a.startswith("--cache_folder=") for a in args):
        cmd.append(f"--cache_folder={TEST_CACHE}")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_train_log(path):
    """train_log.txt lines -> list of {key: value} of the epoch lines."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("epoch:"):
            row = {"epoch": int(re.match(r"epoch: (\d+)", line).group(1))}
            for key, value in re.findall(r"valid (\w+): ([-+.\de]+)", line):
                row[key] = float(value)
            rows.append(row)
    return rows


def wer_header(path):
    first = path.read_text().splitlines()[0]
    return float(re.match(r"%WER (\S+)", first).group(1))


@pytest.fixture(scope="module")
def m16_run(demo_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("m16") / "out"
    proc = run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=2", *FAST, demo_tree=demo_tree)
    return out, proc


def test_outputs_of_a_fold(m16_run):
    out, proc = m16_run
    for name in (
        "hyperparams.yaml",
        "log.txt",
        "env.log",
        "train_log.txt",
        "train.py",
        "wer_test.txt",
        "wer_test_sa_self.txt",
        "wer_test_mean.txt",
        "test_results.json",
    ):
        assert (out / name).is_file(), name
    assert list((out / "save").glob("CKPT+*"))
    results = json.loads((out / "test_results.json").read_text())
    assert results["held_out"] == "M16" and results["teachers"] == ["F02", "M07"]
    assert results["input_streams"] == "matched" and results["fusion"] == "transformer"
    assert results["synthetic_data"] is True
    assert "SYNTHETIC" in (out / "log.txt").read_text()
    for system in [results["student"], *results["baselines"].values()]:
        for key in ("WER", "CER", "WRA", "by_category", "by_mic"):
            assert key in system
        assert system["n"] == results["n_utterances"]
    assert set(results["baselines"]) == {"sa_self", "mean"}
    assert set(results["student"]["by_category"]) == {"D", "L", "C", "CW", "UW"}
    # every printed WER equals the header of the file written beside it
    assert wer_header(out / "wer_test.txt") == pytest.approx(results["student"]["WER"], abs=0.005)
    assert wer_header(out / "wer_test_sa_self.txt") == pytest.approx(results["baselines"]["sa_self"]["WER"], abs=0.005)


def test_results_hold_the_kept_checkpoints_validation_figures(m16_run):
    """test_results.json carries the validation figures of the checkpoint the test loaded (the
    teacher speakers' productions: what ablate.py chooses by), equal to that epoch's line of
    train_log.txt."""
    out, _ = m16_run
    results = json.loads((out / "test_results.json").read_text())
    rows = {row["epoch"]: row for row in read_train_log(out / "train_log.txt")}
    kept = rows[results["epoch_loaded"]]
    validation = results["validation"]
    assert validation["loss"] == pytest.approx(kept["loss"], rel=1e-3)
    assert validation["WRA"] == pytest.approx(kept["WRA"], abs=1e-3)
    assert validation["WRA_mean"] == pytest.approx(kept["WRA_mean"], abs=1e-3)
    # the kept checkpoint is the one with the lowest validation loss
    assert kept["loss"] == min(row["loss"] for row in rows.values())


def test_console_ends_with_the_answer(m16_run):
    """The last lines of a run: synthetic or real, fold, setting, decoding, the student and its
    baselines with the figures of test_results.json, and the output folder; no import noise."""
    out, proc = m16_run
    results = json.loads((out / "test_results.json").read_text())
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith("====")
    start = max(i for i, line in enumerate(lines[:-1]) if line.startswith("===="))
    block = "\n".join(lines[start:])
    assert "fold M16 (low intelligibility), SYNTHETIC" in block
    assert "OWN speaker-adaptive model" in block  # the matched setting is said to be speaker-adaptive
    assert f"decoding: {results['decoding']}" in block
    assert f"results: {out.resolve()}" in block
    for system, r in [("student", results["student"]), *results["baselines"].items()]:
        assert re.search(rf"^{system}\s+{r['WER']:.2f}\s+{r['CER']:.2f}\s+{r['WRA']:.2f}", block, re.M), system
    assert "torchvision" not in proc.stdout + proc.stderr


def test_sa_self_is_reproducible_from_the_files_on_disk(m16_run, demo_tree):
    """Parity: decode M16's own SA logits straight from the .pt file with the greedy rule and
    score with a plain edit distance: WER and WRA equal the recipe's sa_self exactly."""
    import sentencepiece as spm

    out, _ = m16_run
    results = json.loads((out / "test_results.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(demo_tree / "tokenizer.model"))
    folder = demo_tree / "logit_extraction" / "M16" / "M16"
    meta = json.loads((folder / "M16_metadata.json").read_text())
    logits = torch.load(folder / "M16_decoder_logits.pt", weights_only=True)
    edits = words = exact = 0
    hyps = []
    for word, z in zip(meta["target_words"], logits):
        ids = []
        for u in range(z.shape[0]):
            best = int(torch.argmax(z[u]))
            if best == 2:
                break
            ids.append(best)
        hyp = sp.decode_ids(ids)
        hyps.append(hyp)
        e = edit_distance(word.split(" "), hyp.split(" "))
        edits, words, exact = edits + e, words + len(word.split(" ")), exact + (e == 0)
    sa_self = results["baselines"]["sa_self"]
    assert sa_self["n"] == len(meta["utterance_ids"]) == results["n_utterances"]
    assert sa_self["WER"] == pytest.approx(100.0 * edits / words, abs=1e-9)
    assert sa_self["WRA"] == pytest.approx(100.0 * exact / len(hyps), abs=1e-9)
    assert "" in hyps  # empty hypotheses are covered (<unk> ones: test_scoring.py)


def test_training_learns(demo_tree, tmp_path):
    """On generator data the validation KD and CE losses fall. (Whether the student then beats the
    stream it reads is what the demo's figures show; the calibrated generator plants no evidence of
    the reference, so a few epochs need not.)"""
    out = tmp_path / "out"
    run_recipe(
        "M01",
        f"--output_folder={out}",
        "--number_of_epochs=3",
        "--input_streams=self",
        "--noprogressbar",
        demo_tree=demo_tree,
    )
    rows = read_train_log(out / "train_log.txt")
    assert len(rows) == 3
    assert rows[-1]["KD"] < rows[0]["KD"] and rows[-1]["CE"] < rows[0]["CE"]


@pytest.mark.parametrize("fold,n_teachers", [("M08", 4), ("M05", 2), ("M16", 2), ("M01", 14)])
def test_every_fold_yaml_runs(fold, n_teachers, demo_tree, tmp_path):
    run_recipe(fold, f"--output_folder={tmp_path}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    results = json.loads((tmp_path / "test_results.json").read_text())
    assert results["held_out"] == fold and len(results["teachers"]) == n_teachers
    assert fold not in results["teachers"]


def test_resume_and_test_only(demo_tree, tmp_path):
    out = tmp_path / "out"
    run_recipe("M05", f"--output_folder={out}", "--number_of_epochs=2", *FAST, demo_tree=demo_tree)
    first = json.loads((out / "test_results.json").read_text())
    proc = run_recipe("M05", f"--output_folder={out}", "--number_of_epochs=3", *FAST, demo_tree=demo_tree)
    assert "Going into epoch 3" in proc.stderr + proc.stdout
    assert "Going into epoch 1" not in proc.stderr + proc.stdout
    assert [r["epoch"] for r in read_train_log(out / "train_log.txt")] == [1, 2, 3]
    trained = json.loads((out / "test_results.json").read_text())
    proc = run_recipe(
        "M05", f"--output_folder={out}", "--number_of_epochs=3", "--test_only", *FAST, demo_tree=demo_tree
    )
    rescored = json.loads((out / "test_results.json").read_text())
    assert rescored == trained
    assert first["baselines"] == trained["baselines"]  # the baselines do not depend on training


def test_runs_from_any_directory_with_every_documented_override(demo_tree, tmp_path):
    out = tmp_path / "elsewhere" / "M08"
    run_recipe(
        "M08",
        f"--logit_root={demo_tree / 'logit_extraction'}",
        f"--tokenizer_file={demo_tree / 'tokenizer.model'}",
        f"--output_folder={out}",
        "--seed=5",
        "--number_of_epochs=1",
        "--teacher_set=all_others",
        "--input_streams=self",
        "--fusion=attention",
        "--temperature=2.0",
        "--alpha=0.5",
        "--batch_size=32",
        "--noprogressbar",
        cwd=tmp_path,
    )
    results = json.loads((out / "test_results.json").read_text())
    assert (results["seed"], results["teacher_set"], results["input_streams"], results["fusion"]) == (
        5,
        "all_others",
        "self",
        "attention",
    )
    assert (results["temperature"], results["alpha"]) == (2.0, 0.5) and len(results["teachers"]) == 14
    saved = (out / "hyperparams.yaml").read_text()
    assert "batch_size: 32" in saved and "number_of_epochs: 1" in saved
    # an explicitly given tree is not the demo default, but it is recognised as synthetic
    assert results["synthetic_data"] is True


def test_mean_fusion_has_nothing_to_train(demo_tree, tmp_path):
    run_recipe("M16", f"--output_folder={tmp_path}", "--fusion=mean", "--noprogressbar", demo_tree=demo_tree)
    results = json.loads((tmp_path / "test_results.json").read_text())
    assert results["student"]["WER"] == results["baselines"]["mean"]["WER"] == results["baselines"]["sa_self"]["WER"]
    assert not (tmp_path / "save").exists() or not list((tmp_path / "save").glob("CKPT+*"))


def _assert_clean_failure(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-3000:]


def test_bad_input_stops_before_anything_is_overwritten(copy_tree, tmp_path, demo_tree):
    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    # (the lock file aside: a run takes it before it reads its inputs, and it only names that run)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    tree = copy_tree()
    path = tree / "logit_extraction" / "M07" / "M07" / "M07_decoder_logits.pt"
    logits = torch.load(path, weights_only=True)
    logits[4][0, 0] = float("nan")
    torch.save(logits, path)
    meta = json.loads((path.parent / "M07_metadata.json").read_text())
    args = (
        f"--logit_root={tree / 'logit_extraction'}",
        f"--tokenizer_file={tree / 'tokenizer.model'}",
        f"--output_folder={out}",
        *FAST,
    )
    proc = run_recipe("M16", *args, check=False)
    _assert_clean_failure(proc, "ERROR:", "NaN", "M07_decoder_logits.pt", meta["utterance_ids"][4])
    proc = run_recipe("M16", *args, "--teachers=[F02,M16]", check=False)
    _assert_clean_failure(proc, "ERROR:", "held-out speaker M16 is among the teachers")
    proc = run_recipe("M16", *args, "--temprature=2.0", check=False)
    _assert_clean_failure(proc, "ERROR:", "temprature")
    proc = run_recipe(
        "M16", f"--logit_root={tmp_path / 'nowhere'}", args[1], f"--output_folder={out}", *FAST, check=False
    )
    _assert_clean_failure(proc, "ERROR:", "missing folder")
    proc = run_recipe("M16", f"--logit_root={tmp_path / 'nowhere'}", f"--output_folder={out}", *FAST, check=False)
    _assert_clean_failure(proc, "ERROR:", "--logit_root is given without --tokenizer_file")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    fresh = tmp_path / "fresh"
    proc = run_recipe("M16", *args[:2], f"--output_folder={fresh}", *FAST, check=False)
    _assert_clean_failure(proc, "ERROR:", "NaN")
    assert not fresh.exists()  # a failed run leaves no trace


def test_readme_fold_table_reproduces(demo_tree, tmp_path):
    """The README's fold table is written by make_tables.py from the runs of the command under it:
    a fresh run of that command for M16 (default options, one thread pinned) gives the README's M16
    row, digit for digit."""
    import make_tables

    out = tmp_path / "demo_folds" / "M16"
    run_recipe("M16", f"--output_folder={out}", "--noprogressbar", demo_tree=demo_tree)
    row = make_tables.fold_row(json.loads((out / "test_results.json").read_text()))
    readme = (RECIPE / "README.md").read_text()
    block = readme.split("<!-- table: demo_folds ")[1].split("<!-- end table: demo_folds -->")[0]
    assert row in block, (row, block)
    command = "python train.py hparams/fold_M16.yaml --output_folder=results/demo_folds/M16 --noprogressbar"
    assert command in block  # the command printed under the table is the one run here
