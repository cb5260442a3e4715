"""Reliability: torchrun never hangs and trains as one process does; no wrong number with exit code
0; nothing overwritten or lost; one clear line for every bad input or option."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from test_scale import torchrun

from conftest import RECIPE, TEST_CACHE
from test_recipe import FAST, read_train_log, run_recipe

HELPER = RECIPE.parents[2] / "tests" / "helpers" / "ddp_checkpoint_stress.py"


def last_line(proc):
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def files_of(folder):
    """{path: (bytes, mtime)} of every file under a folder (the lock file aside: it only names the
    run that holds the folder)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- torchrun


def test_checkpoint_stress_under_torchrun_never_hangs(tmp_path):
    """2 gloo processes, 40 epochs of checkpoints kept and deleted, a slow rename on the main
    process (the window in which the other process used to list the folder); three times, each
    under a timeout that turns a hang into a failure."""
    for attempt in range(3):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(HELPER),
            str(tmp_path / f"save{attempt}"),
            str(RECIPE),
            "40",
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"attempt {attempt}: the processes hung (timeout) while keeping and deleting checkpoints")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "done 40" in proc.stdout


def test_two_processes_train_the_model_one_process_trains_up_to_float_order(demo_tree, tmp_path):
    """batch_size is the global batch: 2 processes take the steps of 1 process, on the same global
    batches, with the same schedule and randomness (dropout on). What is equal: the optimiser
    steps. What only agrees: the losses, within 1 % (the gradients of the two halves are summed by
    the all-reduce, in another order than one backward pass sums them; the halves' matrix products
    may also round differently; Adam amplifies the differences). The test figures are not
    asserted: they can differ (docs/scale.md)."""
    args = ["--number_of_epochs=3", "--batch_size=8", *FAST, f"--demo_folder={demo_tree}"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe("M16", f"--output_folder={one}", *args)
    torchrun("M16", f"--output_folder={two}", *args)
    a, b = read_train_log(one / "train_log.txt"), read_train_log(two / "train_log.txt")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "CE", "KD"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-2), (ra, rb)
    # the same number of optimiser steps (a doubled global batch would halve them)
    steps = [next((d / "save").glob("CKPT+*")).joinpath("brain.ckpt").read_text() for d in (one, two)]
    steps = [int(text.split("optimizer_step:")[1].split()[0]) for text in steps]
    assert steps[0] == steps[1] > 0
    ra, rb = (json.loads((d / "test_results.json").read_text()) for d in (one, two))
    assert rb["processes"] == 2 and ra["processes"] == 1 and ra["n_utterances"] == rb["n_utterances"]


def test_global_batch_must_split_over_the_processes(demo_tree, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(RECIPE / "train.py"),
        str(RECIPE / "hparams" / "fold_M16.yaml"),
        "--distributed_backend=gloo",
        "--device=cpu",
        "--batch_size=7",
        f"--output_folder={tmp_path / 'out'}",
        f"--demo_folder={demo_tree}",
        f"--cache_folder={TEST_CACHE}",
        *FAST,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    expected = "ERROR: --batch_size=7 is the global batch: it must be a multiple of the 2 processes"
    assert proc.stderr.count(expected) >= 3  # each process, then once more after torchrun's report
    assert last_line(proc) == expected
    assert not (tmp_path / "out").exists()


def test_bad_input_under_torchrun_ends_with_the_same_line_on_every_process(copy_tree, tmp_path):
    tree = copy_tree()
    shutil.rmtree(tree / "logit_extraction" / "M07")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(RECIPE / "train.py"),
        str(RECIPE / "hparams" / "fold_M16.yaml"),
        "--distributed_backend=gloo",
        "--device=cpu",
        f"--logit_root={tree / 'logit_extraction'}",
        f"--tokenizer_file={tree / 'tokenizer.model'}",
        f"--output_folder={tmp_path / 'out'}",
        f"--cache_folder={tmp_path / 'cache'}",
        *FAST,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    line = last_line(proc)
    assert line.startswith("ERROR: missing folder") and "M07" in line
    assert proc.stderr.count(line) >= 3  # rank 0, rank 1 (which never read the files), and last
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- no wrong number


def test_a_changed_option_does_not_test_an_old_model_under_a_new_label(demo_tree, tmp_path):
    base = tmp_path / "base"
    run_recipe("M16", f"--output_folder={base}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    copy = tmp_path / "x"
    shutil.copytree(base, copy, symlinks=True)
    before = files_of(copy)
    for extra in (["--temperature=1.0"], ["--temperature=1.0", "--test_only"], ["--alpha=0.5", "--lr=0.001"]):
        proc = run_recipe(
            "M16", f"--output_folder={copy}", "--number_of_epochs=1", *FAST, *extra, demo_tree=demo_tree, check=False
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert last_line(proc).startswith(f"ERROR: {copy} holds checkpoints of another configuration"), proc.stderr
        # (M16's same_level teachers: alpha 0.9 is the option chosen for them)
        assert "temperature 3.0 -> 1.0" in last_line(proc) or "alpha 0.9 -> 0.5" in last_line(proc)
        assert files_of(copy) == before  # nothing rewritten: hyperparams.yaml, log.txt, results
    # the same options (or more epochs, or another output of the test) resume and test it
    run_recipe("M16", f"--output_folder={copy}", "--number_of_epochs=1", "--test_only", *FAST, demo_tree=demo_tree)
    run_recipe("M16", f"--output_folder={copy}", "--number_of_epochs=2", *FAST, demo_tree=demo_tree)
    assert [r["epoch"] for r in read_train_log(copy / "train_log.txt")] == [1, 2]


def test_another_data_tree_does_not_resume_either(copy_tree, demo_tree, tmp_path):
    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    tree = copy_tree()
    proc = run_recipe(
        "M16",
        f"--output_folder={out}",
        "--number_of_epochs=1",
        *FAST,
        f"--logit_root={tree / 'logit_extraction'}",
        f"--tokenizer_file={tree / 'tokenizer.model'}",
        check=False,
    )
    assert proc.returncode == 1 and "logit_root" in last_line(proc)


def _cached_store(tree, cache):
    from local.store import LogitStore, TokenTable, load_tokenizer

    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    return LogitStore(tree / "logit_extraction", tokens, [("F02", "F02"), ("M07", "M07")], torch.float32, cache)


def test_corruption_anywhere_in_the_cache_is_seen(copy_tree, tmp_path):
    tree = copy_tree(speakers=["F02", "M07"])
    cache = tmp_path / "cache"
    expected = _cached_store(tree, cache).data.clone()
    (folder,) = cache.glob("store-*")
    size = (folder / "data.bin").stat().st_size
    for offset in (4, size // 3 + 12, size - 8):  # rows a sampled checksum would skip
        with open(folder / "data.bin", "r+b") as handle:
            handle.seek(offset)
            old = handle.read(4)
            handle.seek(offset)
            handle.write(bytes(b ^ 0x5A for b in old))
        again = _cached_store(tree, cache)
        assert not again.from_cache and torch.equal(again.data, expected)
        assert _cached_store(tree, cache).from_cache


def test_a_rewritten_source_with_its_size_and_mtime_restored_is_not_stale(copy_tree, tmp_path):
    tree = copy_tree(speakers=["F02", "M07"])
    cache = tmp_path / "cache"
    first = _cached_store(tree, cache)
    path = tree / "logit_extraction" / "M07" / "M07" / "M07_decoder_logits.pt"
    stat = path.stat()
    logits = torch.load(path, weights_only=True)
    logits[0] = logits[0] + 1.0
    torch.save(logits, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = _cached_store(tree, cache)
    assert not second.from_cache
    j = second.utt_ids.index(second.utt_ids[second.stream_model.index("M07")])
    assert torch.allclose(second.logits(j), first.logits(j) + 1.0)


def test_a_killed_cache_build_leaves_nothing_behind(copy_tree, tmp_path):
    """A build killed midway leaves its temporary folder; the next build removes it (and never the
    folder of a build that is still running)."""
    from local.packed import _lock

    tree = copy_tree(speakers=["F02", "M07"])
    cache = tmp_path / "cache"
    dead = cache / ".store-0123456789abcdef0123.tmp-999999"
    dead.mkdir(parents=True)
    (dead / "data.bin").write_bytes(b"\0" * 1024)
    (dead / ".building").write_text("")
    alive = cache / ".targets-0123456789abcdef0123.tmp-1"
    alive.mkdir()
    held = _lock(alive / ".building")  # this process is "building" it
    _cached_store(tree, cache)
    assert not dead.exists() and alive.exists()
    held.close()
    shutil.rmtree(alive)
    assert not list(cache.glob(".*tmp*"))


# ----------------------------------------------------------------------------- invalid options


BAD_OPTIONS = [
    (
        ["--store_dtype=int8"],
        "--store_dtype=int8 is not allowed: store_dtype must be one of float32, float16, bfloat16",
    ),
    (["--temperature=-1"], "--temperature=-1 is not allowed: temperature must be a finite number 0 < x"),
    (["--temperature=0"], "--temperature=0 is not allowed"),
    (["--alpha=2"], "--alpha=2 is not allowed: alpha must be a finite number 0 <= x <= 1"),
    (["--number_of_epochs=0"], "--number_of_epochs=0 is not allowed: number_of_epochs must be an integer >= 1"),
    (["--stream_dropout=5"], "--stream_dropout=5 is not allowed"),
    (["--teachers=[F02,F02]"], "teachers must be a list without repeats; ['F02'] is repeated"),
    (["--teachers=[F02,X99]"], "a list of UASpeech speakers"),
    (["--fusion=foo"], "--fusion=foo is not allowed: fusion must be one of mean, weights, attention, transformer"),
    (["--batch_size=0"], "--batch_size=0 is not allowed: batch_size must be an integer >= 1"),
    (["--lr=-1"], "--lr=-1 is not allowed"),
    (["--n_heads=3"], "--n_heads=3 is not allowed: n_heads must divide d_model (16)"),
    (["--valid_fraction=0"], "--valid_fraction=0 is not allowed"),
    (["--valid_fraction=1.0"], "--valid_fraction=1.0 is not allowed"),
    (["--seed=abc"], "--seed=abc is not allowed: seed must be an integer"),
    (["--seed=1", "--seed=2"], "the command line gives --seed more than once"),
    (["--teachers=[F02,M07"], "the command line is not valid yaml"),
    (["--temprature=2.0"], "unknown option --temprature (did you mean --temperature?)"),
    (["--threads=0"], "--threads=0 is not allowed"),
    (["--max_grad_norm=-1"], "--max_grad_norm=-1.0 is not allowed"),  # a SpeechBrain run option
    (["--precision=fp16", "--device=cpu"], "--precision=fp16 is not allowed on a CPU"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_and_writes_nothing(args, message, demo_tree, tmp_path, capsys, monkeypatch):
    """In process (train.main), so that the many cases stay fast; the command line itself is
    checked by the subprocess cases below."""
    import train

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [
        str(RECIPE / "hparams" / "fold_M16.yaml"),
        f"--output_folder={out}",
        f"--demo_folder={demo_tree}",
        "--d_model=16",
        *args,
    ]
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ERROR: ") and message in err[-1], err[-1]
    assert not out.exists() and not (tmp_path / "results").exists()


def test_bad_command_lines_end_with_one_line(demo_tree, tmp_path):
    cases = [
        ([str(RECIPE / "hparams" / "fold_M99.yaml")], "ERROR: hparams file"),
        ([str(RECIPE / "hparams" / "fold_M16.yaml"), "--fusion=foo"], "ERROR: --fusion=foo is not allowed"),
        ([str(RECIPE / "hparams" / "fold_M16.yaml"), "--seed=1", "--seed=2"], "ERROR: the command line gives --seed"),
    ]
    for argv, start in cases:
        proc = subprocess.run(
            [
                sys.executable,
                str(RECIPE / "train.py"),
                *argv,
                f"--output_folder={tmp_path / 'o'}",
                f"--demo_folder={demo_tree}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert last_line(proc).startswith(start), proc.stderr
        assert not (tmp_path / "o").exists()


def test_a_teacher_with_no_utterance(copy_tree, tmp_path):
    tree = copy_tree()
    meta_path = tree / "logit_extraction" / "M07" / "M07" / "M07_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.update(num_utterances=0, utterance_ids=[], target_words=[], ctc_frame_lens=[], token_lens=[])
    meta_path.write_text(json.dumps(meta))
    torch.save([], meta_path.parent / "M07_decoder_logits.pt")
    proc = run_recipe(
        "M16",
        f"--logit_root={tree / 'logit_extraction'}",
        f"--tokenizer_file={tree / 'tokenizer.model'}",
        f"--output_folder={tmp_path / 'out'}",
        *FAST,
        check=False,
    )
    assert proc.returncode == 1 and "lists no utterance" in last_line(proc) and "M07" in last_line(proc)


def test_unusable_output_folders(demo_tree, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    argv = [str(RECIPE / "hparams" / "fold_M16.yaml"), f"--demo_folder={demo_tree}", *FAST]
    with pytest.raises(SystemExit):
        train.main([*argv, f"--output_folder={a_file}"])
    assert "is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(read_only) else real_access(p, mode))
    with pytest.raises(SystemExit):
        train.main([*argv, f"--output_folder={read_only / 'out'}"])
    assert "is not writable" in capsys.readouterr().err


def test_an_unreadable_speaker_folder_is_one_line(copy_tree, monkeypatch):
    from pathlib import Path

    from local.store import LogitStoreError, TokenTable, load_tokenizer, read_metadata

    tree = copy_tree()
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if "M07_metadata" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(LogitStoreError, match="cannot read metadata file .*M07_metadata.json .*Permission denied"):
        read_metadata(tree / "logit_extraction", "M07", "M07", tokens)


# ----------------------------------------------------------------------------- nothing overwritten


def test_a_failing_run_does_not_touch_a_finished_run(demo_tree, tmp_path):
    out = tmp_path / "out"
    run_recipe("M16", f"--output_folder={out}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    before = files_of(out)
    proc = run_recipe("M16", f"--output_folder={out}", "--fusion=foo", *FAST, demo_tree=demo_tree, check=False)
    assert proc.returncode == 1 and "--fusion=foo" in last_line(proc)
    assert files_of(out) == before  # hyperparams.yaml and log.txt included


def test_a_second_run_into_the_same_folder_refuses(demo_tree, tmp_path):
    out = tmp_path / "out"
    args = ["--number_of_epochs=500", "--early_stop_patience=500", *FAST]  # runs until it is killed
    cmd = [
        sys.executable,
        str(RECIPE / "train.py"),
        str(RECIPE / "hparams" / "fold_M16.yaml"),
        f"--output_folder={out}",
        f"--demo_folder={demo_tree}",
        f"--cache_folder={TEST_CACHE}",
        *args,
    ]
    first = subprocess.Popen(cmd, cwd=RECIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "train_log.txt").exists() and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        second = run_recipe("M16", f"--output_folder={out}", *args, demo_tree=demo_tree, check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert last_line(second).startswith(f"ERROR: output folder {out} is in use by another run (pid {first.pid} ")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    epochs = [r["epoch"] for r in read_train_log(out / "train_log.txt")]
    assert epochs == list(range(1, len(epochs) + 1))  # no epoch line written twice
    # the folder is not left locked by the killed run: the same run resumes there
    run_recipe("M16", f"--output_folder={out}", *args, "--test_only", demo_tree=demo_tree)
    assert (out / "test_results.json").is_file()


def test_a_full_disk_is_named_and_stops_cleanly(copy_tree, tmp_path, monkeypatch):
    """The packed cache reserves its blocks before it is mapped (a full disk is an error, not a
    SIGBUS), and a checkpoint or result file that cannot be written names the device."""
    import local.packed
    from local.checkpoints import CompleteCheckpointer
    from local.files import DiskFullError, write_json

    tree = copy_tree(speakers=["F02", "M07"])

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.packed.os, "posix_fallocate", no_space)
    with pytest.raises(DiskFullError, match=r"no space left on device: .*data\.bin \(the packed cache needs"):
        _cached_store(tree, tmp_path / "cache")
    monkeypatch.undo()
    assert not list((tmp_path / "cache").glob(".*tmp*"))

    checkpointer = CompleteCheckpointer(tmp_path / "save", recoverables={"model": torch.nn.Linear(2, 2)})
    checkpointer.save_checkpoint(meta={"loss": 1.0})

    def failing_save(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DiskFullError, match="no space left on device: .*save"):
        checkpointer.save_checkpoint(meta={"loss": 0.5})
    monkeypatch.undo()
    assert len(checkpointer.list_checkpoints()) == 1  # the earlier checkpoint is intact, no half-made one
    results = tmp_path / "test_results.json"
    write_json(results, {"kept": True})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(DiskFullError, match="no space left on device: .*test_results.json"):
        write_json(results, {"kept": False})
    monkeypatch.undo()
    assert json.loads(results.read_text()) == {"kept": True}


def test_a_real_full_disk(copy_tree, tmp_path):
    """On a real (small tmpfs) file system: a fresh run whose cache does not fit stops with one
    line, rc 1, no Bus error. Needs the right to mount a tmpfs (root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip(
            "cannot mount a tmpfs here (needs root); test_a_full_disk_is_named_and_stops_cleanly covers the code"
        )
    try:
        tree = copy_tree()
        proc = run_recipe(
            "M16",
            f"--logit_root={tree / 'logit_extraction'}",
            f"--tokenizer_file={tree / 'tokenizer.model'}",
            f"--output_folder={tmp_path / 'out'}",
            f"--cache_folder={mount / 'cache'}",
            *FAST,
            check=False,
        )
        assert proc.returncode == 1 and "Bus error" not in proc.stderr and "Traceback" not in proc.stderr
        assert last_line(proc).startswith(f"ERROR: no space left on device: {mount / 'cache'}"), proc.stderr
        assert not (tmp_path / "out").exists()
        assert not list((mount / "cache").glob(".*tmp*"))
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
