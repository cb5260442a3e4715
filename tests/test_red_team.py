"""The cases a red-team pass broke (docs/reliability.md, "Found by the red-team pass"): each fails
on the recipe before its fix. Never a wrong number with exit status 0, never a lost file, one line
for every bad input or option."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from test_reliability import files_of, last_line
from test_scale import without_output_folder

from conftest import RECIPE
from test_recipe import FAST, read_train_log, run_recipe


def _results(folder):
    return json.loads((folder / "test_results.json").read_text())


# ----------------------------------------------------------------------------- wrong number, exit 0


def test_fewer_epochs_on_a_finished_folder_is_refused(demo_tree, tmp_path):
    """A finished 3-epoch folder rerun with --number_of_epochs=2 used to test the 3-epoch model
    and label it as the 2-epoch run; more epochs go on training, as a longer run would."""
    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=3", *FAST, demo_tree=demo_tree)
    before = files_of(out)
    for extra in ([], ["--test_only"]):
        proc = run_recipe(
            "M16", f"--output_folder={out}", "--number_of_epochs=2", *FAST, *extra, demo_tree=demo_tree, check=False
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert last_line(proc) == (
            f"ERROR: {out} holds checkpoints up to epoch 3, more than --number_of_epochs=2: its model is not "
            f"the one of a 2-epoch run; give another --output_folder"
        )
        assert files_of(out) == before


def test_early_stopping_state_survives_a_resume(demo_tree, tmp_path):
    """SpeechBrain 1.1.2 saves only the epoch number of EpochCounterWithStopper: a resumed run
    restarted early stopping and trained on. Here a run stopped (as if killed) after epoch 4's
    checkpoint and resumed must stop where the uninterrupted run stops, with the same results.
    With patience 1 this fold's validation loss first rises at epoch 5."""
    args = ["--early_stop_patience=1", *FAST]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_recipe("M16", f"--output_folder={whole}", "--number_of_epochs=12", *args, demo_tree=demo_tree)
    epochs = [r["epoch"] for r in read_train_log(whole / "train_log.txt")]
    assert 4 < len(epochs) < 12, epochs  # it stopped early, after epoch 4
    run_recipe("M16", f"--output_folder={resumed}", "--number_of_epochs=4", *args, demo_tree=demo_tree)
    run_recipe("M16", f"--output_folder={resumed}", "--number_of_epochs=12", *args, demo_tree=demo_tree)
    assert (resumed / "train_log.txt").read_text() == (whole / "train_log.txt").read_text()
    assert without_output_folder(_results(resumed)) == without_output_folder(_results(whole))


def test_the_epoch_counter_of_the_hparams_keeps_its_state_in_a_checkpoint(tmp_path):
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.utils.checkpoints import Checkpointer

    def counter():
        text = (RECIPE / "hparams" / "logit_kd.yaml").read_text()
        overrides = {"held_out": "M16", "output_folder": str(tmp_path / "o")}
        return load_hyperpyyaml(text, overrides)["epoch_counter"]

    first = counter()
    for loss in (3.0, 2.0, 2.5):
        next(first)
        first.update_metric(loss)
    Checkpointer(tmp_path / "save", {"counter": first}).save_checkpoint()
    second = counter()
    Checkpointer(tmp_path / "save", {"counter": second}).recover_if_possible()
    assert (second.current, second.best_limit, second.best_score, second.should_stop) == (3, 2, 2.0, False)


def test_a_checkpoint_without_the_early_stopping_state_does_not_resume(tmp_path):
    """Checkpoints made before the fix hold the bare epoch number: testing them is fine, resuming
    training from them would not be the uninterrupted run."""
    from local.checkpoints import CheckpointError, check_checkpoints

    ckpt = tmp_path / "save" / "CKPT+old"
    ckpt.mkdir(parents=True)
    (ckpt / "CKPT.yaml").write_text("end-of-epoch: true\nloss: 1.0\n")
    (ckpt / "counter.ckpt").write_text("7")
    assert check_checkpoints(tmp_path / "save", {}, resume=False) == {"CKPT+old": 7}
    with pytest.raises(CheckpointError, match="without the early-stopping state"):
        check_checkpoints(tmp_path / "save", {}, resume=True)


def test_a_rewritten_input_with_size_and_mtime_restored_is_new_data(copy_tree, tmp_path):
    """The fingerprint used to key the data by size and mtime only: a logit file rewritten with
    both restored was tested with the old model. It now uses the cache's key (with the inode
    change time, which cannot be set back)."""
    tree = copy_tree(speakers=["F02", "M07", "M16"])
    data = [f"--logit_root={tree / 'logit_extraction'}", f"--tokenizer_file={tree / 'tokenizer.model'}"]
    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, *data)
    path = tree / "logit_extraction" / "M07" / "M07" / "M07_decoder_logits.pt"
    stat = path.stat()
    logits = torch.load(path, weights_only=True)
    logits[0] = logits[0] + 1.0
    torch.save(logits, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    before = files_of(out)
    proc = run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", "--test_only", *FAST, *data, check=False)
    assert proc.returncode == 1 and "logit files changed since: M07/M07/M07_decoder_logits.pt" in last_line(proc)
    assert files_of(out) == before


def test_a_debug_run_is_marked_partial(demo_tree, tmp_path):
    """--debug scores a few batches: its figures used to be written as the fold's."""
    import make_tables

    out = tmp_path / "out"
    proc = run_recipe("M16", f"--output_folder={out}", "--debug", *FAST, demo_tree=demo_tree)
    info = _results(out)
    assert (
        info["partial"].startswith("--debug")
        and f"of the fold's {info['n_test_items']} test utterances" in (info["partial"])
    )
    assert info["student"]["n"] < info["n_test_items"]
    assert "PARTIAL RUN: --debug" in proc.stdout
    with pytest.raises(make_tables.TableError, match="is a partial run"):
        make_tables._run(out)
    # SpeechBrain keeps a debug run's checkpoints out of the folder: a full run there trains afresh
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    assert _results(out)["partial"] is None
    # and --debug never replaces a finished run's figures with a few batches'
    before = files_of(out)
    proc = run_recipe("M16", f"--output_folder={out}", "--debug", *FAST, demo_tree=demo_tree, check=False)
    assert proc.returncode == 1 and last_line(proc).startswith(f"ERROR: --debug into {out}, which holds a finished")
    assert files_of(out) == before


def test_partial_runs_are_marked_by_compare(demo_tree, tmp_path):
    import compare

    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--debug", *FAST, demo_tree=demo_tree)
    result = compare.compare([out / "wer_test.txt", out / "wer_test_mean.txt"], n_perm=10, n_boot=10)
    assert any("PARTIAL run" in w for w in result["warnings"])


def test_a_study_rerun_with_other_options_does_not_relabel_finished_runs(demo_tree, tmp_path):
    """run_study.py used to skip finished runs and record the new options in their manifest entry."""
    from test_study import run_driver

    study = tmp_path / "study"
    args = [f"--demo_folder={demo_tree}", "--folds", "M16", "--teacher_sets", "same_level", "--seeds", "1"]
    fast = ["--number_of_epochs=1", "--d_model=16", "--d_ffn=32", "--n_layers=1"]
    assert run_driver(study, *args, cwd=tmp_path, extra=fast).returncode == 0
    manifest = (study / "study_runs.json").read_text()
    results = (study / "M16_same_level_matched_transformer" / "1986" / "test_results.json").read_text()
    proc = run_driver(study, *args, cwd=tmp_path, extra=[*fast, "--lr=0.001"])
    assert proc.returncode == 1
    line = last_line(proc)
    assert line.startswith(f"ERROR: {study / 'M16_same_level_matched_transformer' / '1986'} finished with other")
    assert "--lr (unset) -> 0.001" in line
    assert (study / "study_runs.json").read_text() == manifest
    assert (study / "M16_same_level_matched_transformer" / "1986" / "test_results.json").read_text() == results
    # without the manifest, the run's own record of its options says the same
    (study / "study_runs.json").unlink()
    proc = run_driver(study, *args, cwd=tmp_path, extra=[*fast, "--number_of_epochs=2"])
    assert proc.returncode == 1 and "--number_of_epochs 1 -> 2" in last_line(proc)
    # the same command still skips it
    proc = run_driver(study, *args, cwd=tmp_path, extra=fast)
    assert proc.returncode == 0 and "skipped" in proc.stdout


# ----------------------------------------------------------------------------- data lost


def test_the_demo_folder_never_replaces_a_folder_the_recipe_did_not_make(tmp_path):
    precious = tmp_path / "my_logits"
    precious.mkdir()
    (precious / "F02").mkdir()
    (precious / "F02" / "keep.txt").write_text("real data")
    proc = run_recipe("M16", f"--output_folder={tmp_path / 'out'}", f"--demo_folder={precious}", *FAST, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith(f"ERROR: {precious} is a folder that this recipe did not make")
    assert (precious / "F02" / "keep.txt").read_text() == "real data"
    assert not (tmp_path / "out").exists()
    proc = subprocess.run(
        [sys.executable, str(RECIPE / "make_demo_tree.py"), "--out", str(precious)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and last_line(proc).startswith(f"ERROR: {precious} is a folder that this recipe")
    assert (precious / "F02" / "keep.txt").read_text() == "real data"


def test_a_killed_demo_generation_leaves_nothing_for_good(tmp_path):
    from local.synthetic import generate_tree

    dead = tmp_path / ".demo.tmp-999999999"  # no such process
    (dead / "logit_extraction").mkdir(parents=True)
    alive = tmp_path / f".demo.tmp-{os.getpid()}-other"  # not a pid suffix: not ours to judge
    alive.mkdir()
    generate_tree(tmp_path / "demo", speakers=("F02", "M07"))
    assert not dead.exists() and alive.exists()
    assert (tmp_path / "demo" / "SYNTHETIC.json").is_file()


def test_failing_reruns_write_nothing_into_a_finished_folder(demo_tree, tmp_path, monkeypatch, capsys):
    """These failed after SpeechBrain's create_experiment_directory had rewritten hyperparams.yaml
    and appended to log.txt (a corrupt checkpoint also cost train_log.txt its test line)."""
    import train

    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    argv = [
        str(RECIPE / "hparams" / "fold_M16.yaml"),
        f"--output_folder={out}",
        f"--demo_folder={demo_tree}",
        "--number_of_epochs=1",
        *FAST,
    ]
    monkeypatch.chdir(tmp_path)
    before = files_of(out)
    cases = [(["--optimizer_step_limit=3"], "--optimizer_step_limit=3 is not supported")]
    if not torch.cuda.is_available():
        cases.append((["--device=cuda:0"], "--device=cuda:0 is not allowed: no CUDA GPU"))
    for extra, message in cases:
        with pytest.raises(SystemExit):
            train.main([*argv, *extra])
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"ERROR: {message}")
        assert files_of(out) == before
    # a corrupt checkpoint file: one line naming it, nothing written (the command line, end to end)
    (ckpt,) = (out / "save").glob("CKPT+*")
    (ckpt / "student.ckpt").write_bytes(b"\x00garbage")
    before = files_of(out)
    proc = run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_line(proc) == f"ERROR: checkpoint file {ckpt / 'student.ckpt'} is unreadable (UnpicklingError)"
    assert files_of(out) == before
    assert "Epoch loaded" in (out / "train_log.txt").read_text()


def test_every_file_of_a_checkpoint_is_read_before_the_run_starts(demo_tree, tmp_path):
    from local.checkpoints import CheckpointError, check_checkpoints
    from local.corpus import SPEAKERS
    from local.fusion import FusionStudent
    from local.store import load_tokenizer

    vocab = load_tokenizer(demo_tree / "tokenizer.model").vocab_size()
    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    (ckpt,) = (out / "save").glob("CKPT+*")
    student = FusionStudent("transformer", vocab, len(SPEAKERS), d_model=16, n_heads=4, n_layers=1, d_ffn=32)
    files = ("counter", "scheduler", "train_log", "fingerprint", "brain", "optimizer")
    assert check_checkpoints(out / "save", {"student": student}, files) == {ckpt.name: 1}
    cases = {
        "student.ckpt": b"\x00garbage",
        "counter.ckpt": b"not a counter",
        "brain.ckpt": b":",
        "optimizer.ckpt": b"PK",
        "fingerprint.ckpt": b"{",
        "dataloader-TRAIN.ckpt": b"x",
        "CKPT.yaml": b"[",
    }
    for name, garbage in cases.items():
        original = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(garbage)
        with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {ckpt / name}")):
            check_checkpoints(out / "save", {"student": student}, files, resume=False)
        (ckpt / name).write_bytes(original)
    other = FusionStudent("transformer", vocab, len(SPEAKERS), d_model=32, n_heads=4, n_layers=1, d_ffn=32)
    with pytest.raises(CheckpointError, match="does not fit the student"):
        check_checkpoints(out / "save", {"student": other}, files)
    (ckpt / "scheduler.ckpt").unlink()
    with pytest.raises(CheckpointError, match="lacks scheduler.ckpt"):
        check_checkpoints(out / "save", {"student": student}, files)


def test_test_only_into_a_new_folder_leaves_nothing(demo_tree, tmp_path):
    proc = run_recipe(
        "M16", f"--output_folder={tmp_path / 'new' / 'out'}", "--test_only", *FAST, demo_tree=demo_tree, check=False
    )
    assert proc.returncode == 1 and "--test_only but no checkpoint" in last_line(proc)
    assert not (tmp_path / "new").exists()


def test_a_refused_run_builds_no_cache(demo_tree, tmp_path):
    """A run refused for its options (checkpoints of another configuration) stops before it reads
    and packs its inputs: no cache entry is built for it."""
    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    cache = tmp_path / "fresh_cache"
    proc = run_recipe(
        "M16",
        f"--output_folder={out}",
        "--number_of_epochs=1",
        "--temperature=1.0",
        f"--cache_folder={cache}",
        *FAST,
        demo_tree=demo_tree,
        check=False,
    )
    assert proc.returncode == 1 and "temperature 3.0 -> 1.0" in last_line(proc)
    assert not cache.exists() or not any(cache.iterdir())


def test_make_tables_writes_every_file_or_none(tmp_path, monkeypatch, capsys):
    """On a results tree that holds the README's tables but not docs/results.md's, make_tables.py
    used to rewrite README.md and then fail."""
    import make_tables

    root = tmp_path / "recipe"
    for file in make_tables.FILES:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RECIPE / file, root / file)
    monkeypatch.setattr(make_tables, "RECIPE", root)
    results = tmp_path / "results"
    (results / "word_fusion").mkdir(parents=True)
    (results / "word_fusion" / "word_fusion.md").write_text("a new word-fusion table\n")
    (results / "calibration").mkdir(parents=True)
    (results / "calibration" / "calibration.md").write_text("a new calibration table\n")
    before = {file: (root / file).read_text() for file in make_tables.FILES}
    assert make_tables.main(["--results", str(results)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR: README.md: table demo_folds: its result file") and "--run" in err
    assert {file: (root / file).read_text() for file in make_tables.FILES} == before
    # the tables that can be made are written, and --check reports only those that changed
    assert make_tables.main(["--results", str(results), "--only", "word_fusion", "calibration"]) == 0
    capsys.readouterr()
    assert make_tables.main(["--check", "--results", str(results), "--only", "word_fusion", "calibration"]) == 0
    (results / "word_fusion" / "word_fusion.md").write_text("another word-fusion table\n")
    assert make_tables.main(["--check", "--results", str(results), "--only", "word_fusion", "calibration"]) == 1
    out = capsys.readouterr().out
    assert "word_fusion" in out and "calibration" not in out


def test_make_tables_bad_results_are_one_line(tmp_path, monkeypatch, capsys):
    import make_tables

    root = tmp_path / "recipe"
    for file in make_tables.FILES:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RECIPE / file, root / file)
    monkeypatch.setattr(make_tables, "RECIPE", root)
    results = tmp_path / "results"
    for spk in make_tables.FOLDS:
        (results / "demo_folds" / spk).mkdir(parents=True)
        (results / "demo_folds" / spk / "test_results.json").write_text("{not json")
    assert make_tables.main(["--results", str(results), "--only", "demo_folds"]) == 1
    assert "is not a results file of train.py (bad JSON" in capsys.readouterr().err
    with pytest.raises(make_tables.TableError, match=r"runs of different data \(demo, real\) in one table"):
        make_tables._data_line([{"synthetic_data": True}, {"synthetic_data": False}])


# ----------------------------------------------------------------------------- one line, not a traceback


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr=.inf"], "--lr=inf is not allowed: lr must be a finite number 0 < x"),
        (["--temperature=.inf"], "--temperature=inf is not allowed: temperature must be a finite number 0 < x"),
        (["--temperature=.nan"], "--temperature=nan is not allowed"),
        (["--alpha=.nan"], "--alpha=nan is not allowed"),
        (["--optimizer_step_limit=3"], "--optimizer_step_limit=3 is not supported by this recipe"),
        (["--debug_batches=0"], "--debug_batches=0 is not allowed"),
        (["--device=tpu"], "--device=tpu is not allowed: device must be cpu, cuda or cuda:N"),
    ],
)
def test_more_bad_options_are_one_line(args, message, demo_tree, tmp_path, capsys, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [str(RECIPE / "hparams" / "fold_M16.yaml"), f"--output_folder={out}", f"--demo_folder={demo_tree}", *args]
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ERROR: ") and message in err[-1], err[-1]
    assert not out.exists()


def test_unusable_cache_folders_are_one_line(demo_tree, tmp_path, capsys, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(read_only) else real_access(p, mode))
    for cache, message in ((a_file, "is a file, not a folder"), (read_only / "cache", "is not writable")):
        out = tmp_path / "out"
        argv = [
            str(RECIPE / "hparams" / "fold_M16.yaml"),
            f"--output_folder={out}",
            f"--demo_folder={demo_tree}",
            f"--cache_folder={cache}",
        ]
        with pytest.raises(SystemExit):
            train.main(argv)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"ERROR: cache folder {cache}") and message in line and "--cache_folder" in line
        assert not out.exists()


def test_metadata_values_of_the_wrong_type_are_named(copy_tree):
    from local.store import LogitStoreError, TokenTable, load_tokenizer, read_metadata

    tree = copy_tree(speakers=["M07"])
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    path = tree / "logit_extraction" / "M07" / "M07" / "M07_metadata.json"
    meta = json.loads(path.read_text())
    n = meta["num_utterances"]
    path.write_text(json.dumps({**meta, "num_utterances": str(n)}))
    with pytest.raises(LogitStoreError, match=f"num_utterances is '{n}' \\(str\\): it must be an integer"):
        read_metadata(tree / "logit_extraction", "M07", "M07", tokens)
    path.write_text(json.dumps({**meta, "utterance_ids": [12345] + meta["utterance_ids"][1:]}))
    with pytest.raises(LogitStoreError, match="utterance id 12345 is a int, not a string"):
        read_metadata(tree / "logit_extraction", "M07", "M07", tokens)


def test_a_symlink_loop_is_called_so(copy_tree):
    from local.store import LogitStoreError, TokenTable, load_tokenizer, read_metadata

    tree = copy_tree(speakers=["M07"])
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    folder = tree / "logit_extraction" / "M07" / "M07"
    shutil.rmtree(folder)
    folder.symlink_to(folder)  # a link to itself
    with pytest.raises(LogitStoreError, match="symlink loop at"):
        read_metadata(tree / "logit_extraction", "M07", "M07", tokens)


def test_a_tiny_cache_that_does_not_fit_names_its_size(copy_tree, tmp_path, monkeypatch):
    import local.packed
    from local.files import DiskFullError
    from local.store import LogitStore, TokenTable, load_tokenizer

    tree = copy_tree(speakers=["F02"])
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local.packed.os, "posix_fallocate", no_space)
    with pytest.raises(DiskFullError) as err:
        LogitStore(tree / "logit_extraction", tokens, [("F02", "F02")], torch.float32, tmp_path / "cache")
    assert "needs 0.00 GiB" not in str(err.value)
    assert "MiB" in str(err.value) or "KiB" in str(err.value)


def test_compare_json_into_a_folder_is_one_line(demo_tree, tmp_path):
    out = tmp_path / "run"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    proc = subprocess.run(
        [sys.executable, str(RECIPE / "compare.py"), str(out / "wer_test.txt"), "--json", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=RECIPE,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc) == f"ERROR: --json {tmp_path} is a folder: give the path of a .json file to write"


def test_a_demo_wer_file_copied_out_of_its_folder_is_still_synthetic(demo_tree, tmp_path):
    import compare

    out = tmp_path / "run"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    loose = tmp_path / "elsewhere" / "wer_M16.txt"
    loose.parent.mkdir()
    shutil.copyfile(out / "wer_test.txt", loose)
    result = compare.compare([loose], n_perm=10, n_boot=10)
    assert result["synthetic_data"] is True
    assert "made-up words of the demo tree" in compare.provenance(loose)["source"] or result["synthetic_data"]


# ----------------------------------------------------------------------------- the log on a full disk


def test_a_full_disk_never_cuts_a_log_line(tmp_path, monkeypatch, capsys):
    import logging

    from local.run_folder import WholeLineFileHandler

    log = tmp_path / "log.txt"
    log.write_text("an earlier run's line\n")
    handler = WholeLineFileHandler(log, encoding="utf8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a line long enough to be cut in two", None, None)
    handler.emit(record)
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 10:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(SystemExit) as stopped:
        handler.emit(record)
    monkeypatch.undo()
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ERROR: no space left on device: {log} (while writing the log)"
    )
    assert log.read_text() == "an earlier run's line\na line long enough to be cut in two\n"


# ----------------------------------------------------------------------------- CPU kernels


def test_the_cpu_kernels_are_pinned_and_matter(demo_tree, tmp_path):
    """Every job pins the CPU math libraries' AVX2 paths: without it a CPU with AVX-512 trains
    another model (the student's weights differ here after one epoch)."""
    from local.checkpoints import checkpoint_epoch

    native = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY",)},
    ).stdout.strip()
    args = ["--number_of_epochs=1", *FAST]
    runs = {"pinned": {}}
    if native.startswith("AVX512"):
        runs["native"] = {"ATEN_CPU_CAPABILITY": native.lower(), "MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "ALL"}
    weights = {}
    for name, env in runs.items():
        out = tmp_path / name
        cmd = [
            sys.executable,
            str(RECIPE / "train.py"),
            str(RECIPE / "hparams" / "fold_M16.yaml"),
            f"--output_folder={out}",
            f"--demo_folder={demo_tree}",
            *args,
        ]
        clean = {
            k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
        }
        proc = subprocess.run(cmd, cwd=RECIPE, capture_output=True, text=True, env={**clean, **env}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if name == "pinned":
            assert _results(out)["cpu_kernels"]["aten"] == "AVX2" and _results(out)["cpu_kernels"]["mkl_cbwr"] == "AVX2"
        last = max((out / "save").glob("CKPT+*"), key=checkpoint_epoch)
        weights[name] = torch.load(last / "student.ckpt", weights_only=True)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    if "native" in weights:
        assert not same(weights["pinned"], weights["native"])


def test_testing_a_finished_run_again_keeps_its_free_running_decodes(demo_tree, tmp_path):
    """decode.py's decodes of the tested checkpoint survive a rerun of train.py on the finished
    folder (which tests it again and rewrites test_results.json); decodes of another epoch do not."""
    out = tmp_path / "run"
    args = ("M16", f"--output_folder={out}", "--number_of_epochs=2", *FAST)
    run_recipe(*args, demo_tree=demo_tree)
    info = _results(out)
    decoded = {"greedy": {"decoding": "free-running greedy", "systems": {"student": {"WRA": 12.5}}}}
    info["free_running"] = decoded
    info["wer_files"]["wer_test_free_greedy.txt"] = {"system": "student", "decoding": "free-running greedy"}
    (out / "test_results.json").write_text(json.dumps(info))
    run_recipe(*args, demo_tree=demo_tree)
    again = _results(out)
    assert again["free_running"] == decoded
    assert again["wer_files"]["wer_test_free_greedy.txt"]["decoding"] == "free-running greedy"
    assert again["student"] == info["student"]  # the same checkpoint, tested again
    # decodes recorded for another checkpoint are not carried over
    again["epoch_loaded"] = again["epoch_loaded"] + 7
    (out / "test_results.json").write_text(json.dumps(again))
    run_recipe(*args, demo_tree=demo_tree)
    assert "free_running" not in _results(out)
    assert "wer_test_free_greedy.txt" not in _results(out)["wer_files"]
