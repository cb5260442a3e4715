"""Scale and safety: the packed cache, bf16, torchrun DDP, and exact resume after SIGKILL."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from local.kd import EnsembleTargets
from local.store import LogitStore, TokenTable, load_tokenizer

from conftest import RECIPE, TEST_CACHE
from test_recipe import FAST, read_train_log, run_recipe

PAIRS = [("F02", "F02"), ("M07", "M07")]


def without_output_folder(results):
    """test_results.json minus what two runs being compared differ in by design: the output folder
    and the number of processes."""
    overrides = {k: v for k, v in results["overrides"].items() if k != "output_folder"}
    return {**{k: v for k, v in results.items() if k != "processes"}, "overrides": overrides}


def _store(tree, cache):
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    return LogitStore(tree / "logit_extraction", tokens, PAIRS, torch.float16, cache)


def test_cache_is_reused_and_never_trusted_when_stale_or_corrupt(copy_tree, tmp_path):
    tree = copy_tree(speakers=["F02", "M07"])
    cache = tmp_path / "cache"
    cold = _store(tree, cache)
    assert not cold.from_cache
    expected = cold.data.clone()  # cold.data maps the cache file, which this test damages below
    (folder,) = cache.glob("store-*")
    warm = _store(tree, cache)
    assert warm.from_cache and torch.equal(warm.data, expected)
    assert warm.data.dtype == torch.float16
    # corrupt content (same size): refused by the checksum, rebuilt, right again
    with open(folder / "data.bin", "r+b") as f:
        f.write(b"\x7f" * 4096)
    again = _store(tree, cache)
    assert not again.from_cache and torch.equal(again.data, expected)
    # truncated file and broken header: rebuilt
    with open(folder / "data.bin", "r+b") as f:
        f.truncate(1000)
    assert not _store(tree, cache).from_cache
    (folder / "header.json").write_text("{not json")
    assert not _store(tree, cache).from_cache
    assert _store(tree, cache).from_cache
    # a changed source file (new mtime) gets a new key: the stale cache is not used
    path = tree / "logit_extraction" / "M07" / "M07" / "M07_decoder_logits.pt"
    logits = torch.load(path, weights_only=True)
    logits[0] = logits[0] + 1.0
    torch.save(logits, path)
    changed = _store(tree, cache)
    assert not changed.from_cache
    j = changed.stream("M07", changed.utt_ids[changed.stream_model.index("M07")])
    assert torch.allclose(
        changed.logits(j), expected[changed.rows([j], int(changed.lengths[j]))[0]].float() + 1.0, atol=1e-2
    )
    assert len(list(cache.glob("store-*"))) == 2
    assert not list(cache.glob(".*tmp*"))  # no half-made cache left behind


def test_targets_cache(copy_tree, tmp_path):
    tree = copy_tree(speakers=["F02", "M07"])
    store = _store(tree, None)
    sets = [[store.stream("F02", "F02_B3_D3_M4"), store.stream("M07", "M07_B3_D3_M4")]]
    cold = EnsembleTargets(store, sets, 3.0, "prob_mean", cache_dir=tmp_path)
    warm = EnsembleTargets(store, sets, 3.0, "prob_mean", cache_dir=tmp_path)
    assert not cold.from_cache and warm.from_cache and torch.equal(cold.data, warm.data)
    other_t = EnsembleTargets(store, sets, 2.0, "prob_mean", cache_dir=tmp_path)
    assert not other_t.from_cache and not torch.equal(other_t.data, cold.data)


def test_second_run_maps_the_cache_and_gives_the_same_results(demo_tree, tmp_path):
    args = ["--number_of_epochs=1", *FAST]
    first = run_recipe(
        "M16", f"--output_folder={tmp_path / 'a'}", f"--cache_folder={tmp_path / 'cache'}", *args, demo_tree=demo_tree
    )
    assert (first.stdout + first.stderr).count("built from the source files") == 3
    second = run_recipe(
        "M16", f"--output_folder={tmp_path / 'b'}", f"--cache_folder={tmp_path / 'cache'}", *args, demo_tree=demo_tree
    )
    assert "built from the source files" not in second.stdout + second.stderr
    assert (second.stdout + second.stderr).count("mapped from the cache") == 3
    a = json.loads((tmp_path / "a" / "test_results.json").read_text())
    b = json.loads((tmp_path / "b" / "test_results.json").read_text())
    assert a["student"] == b["student"] and a["baselines"] == b["baselines"]


def test_precomputed_features_train_the_fold_as_the_raw_logits_do(demo_tree, tmp_path):
    """The features packed once per fold (tempered logits, evidence) train the student the raw
    logits train it at every step: the same losses up to float rounding, the same figures."""
    runs = {}
    for precompute in ("true", "false"):
        out = tmp_path / precompute
        run_recipe(
            "M16",
            f"--output_folder={out}",
            "--number_of_epochs=2",
            f"--precompute_features={precompute}",
            *FAST,
            demo_tree=demo_tree,
        )
        runs[precompute] = (read_train_log(out / "train_log.txt"), json.loads((out / "test_results.json").read_text()))
    (log_a, res_a), (log_b, res_b) = runs["true"], runs["false"]
    assert len(log_a) == len(log_b) == 2
    for a, b in zip(log_a, log_b):  # the validation figures of each epoch
        assert a.keys() == b.keys() and "loss" in a
        assert all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])) for k in a), (a, b)
    assert res_a["student"] == res_b["student"] and res_a["baselines"] == res_b["baselines"]
    assert res_a["overrides"]["precompute_features"] is True and res_b["overrides"]["precompute_features"] is False


def test_packed_fold_does_not_depend_on_the_threads(copy_tree):
    """The cache is shared by runs with any ``threads``: what it holds is the same bit for bit."""
    tree = copy_tree(speakers=["F02", "M07"])
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    built = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            store = LogitStore(
                tree / "logit_extraction", tokens, PAIRS, torch.float32, None, mix_temperature=3.0, evidence_k=8
            )
            sets = [[store.stream("F02", u), store.stream("M07", u.replace("F02", "M07"))] for u in store.utt_ids[:40]]
            targets = EnsembleTargets(store, [s for s in sets if s[1] >= 0], 3.0, "prob_mean")
            built.append((store.data, store.evidence, targets.data))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*built):
        assert torch.equal(one, two)


def test_bf16_on_cpu(demo_tree, tmp_path):
    run_recipe(
        "M05",
        f"--output_folder={tmp_path}",
        "--number_of_epochs=2",
        "--precision=bf16",
        "--eval_precision=bf16",
        *FAST,
        demo_tree=demo_tree,
    )
    rows = read_train_log(tmp_path / "train_log.txt")
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and r["loss"] < 1e3 for r in rows)
    results = json.loads((tmp_path / "test_results.json").read_text())
    assert 0.0 <= results["student"]["WRA"] <= 100.0
    assert "Using training precision: `--precision=bf16`" in (tmp_path / "log.txt").read_text()


def torchrun(fold, *args, nproc=2):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(RECIPE / "train.py"),
        str(RECIPE / "hparams" / f"fold_{fold}.yaml"),
        "--distributed_backend=gloo",
        "--device=cpu",
        *args,
    ]
    if not any(a.startswith("--cache_folder=") for a in args):
        cmd.append(f"--cache_folder={TEST_CACHE}")
    proc = subprocess.run(
        cmd, cwd=RECIPE, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_ddp_scores_every_test_utterance_once(demo_tree, tmp_path):
    """Two gloo processes on the same checkpoint give the single-process test_results.json."""
    single = tmp_path / "single"
    run_recipe("M16", f"--output_folder={single}", "--number_of_epochs=1", *FAST, demo_tree=demo_tree)
    ddp = tmp_path / "ddp"
    shutil.copytree(single, ddp)
    (ddp / "test_results.json").unlink()
    torchrun(
        "M16", f"--output_folder={ddp}", "--number_of_epochs=1", "--test_only", *FAST, f"--demo_folder={demo_tree}"
    )
    a = json.loads((single / "test_results.json").read_text())
    b = json.loads((ddp / "test_results.json").read_text())
    assert b["n_utterances"] == a["n_utterances"] == b["student"]["n"]
    assert without_output_folder(a) == without_output_folder(b)
    assert (ddp / "wer_test.txt").read_text() == (single / "wer_test.txt").read_text()


def test_processes_leave_together_with_their_output_flushed(tmp_path):
    """local.distributed.leave under torchrun: a process that is done waits for the others, then
    ends there, without the interpreter's teardown (where a finished run was once killed by
    SIGABRT): nothing after it runs, what was printed and logged before it comes out, exit status 0."""
    script = tmp_path / "job.py"
    script.write_text(
        "import atexit, logging, sys, time\n"
        f"sys.path.insert(0, {str(RECIPE)!r})\n"
        "import torch\n"
        "from local.distributed import leave\n"
        "torch.distributed.init_process_group('gloo')\n"
        "rank = torch.distributed.get_rank()\n"
        "logging.basicConfig(filename=f'{sys.argv[1]}/log{rank}.txt', level=logging.INFO)\n"
        "time.sleep(2 * rank)  # rank 1 finishes last: rank 0 must wait for it\n"
        "print(f'done {rank}', end='')\n"
        "logging.getLogger('job').info('record %d', rank)\n"
        "atexit.register(print, 'teardown ran')\n"
        "leave(0)\n"
        "print('never reached')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done 0" in proc.stdout and "done 1" in proc.stdout and "never reached" not in proc.stdout
    assert "teardown ran" not in proc.stdout
    for rank in (0, 1):
        assert f"record {rank}" in (tmp_path / f"log{rank}.txt").read_text()


def test_ddp_training_writes_once(demo_tree, tmp_path):
    proc = torchrun("M05", f"--output_folder={tmp_path}", "--number_of_epochs=2", *FAST, f"--demo_folder={demo_tree}")
    rows = read_train_log(tmp_path / "train_log.txt")
    assert [r["epoch"] for r in rows] == [1, 2]  # one line per epoch: only rank 0 writes
    assert len(list((tmp_path / "save").glob("CKPT+*"))) >= 1
    results = json.loads((tmp_path / "test_results.json").read_text())
    assert results["n_utterances"] == results["baselines"]["sa_self"]["n"]
    assert "Traceback" not in proc.stderr


def test_global_batches_follow_the_seed_and_are_shared_out_exactly():
    """The recipe's batch sampler gives every process the same global batches, in an order drawn
    from --seed (and the epoch); the processes' shares of a global batch partition it."""
    from local.batch import GlobalBatchSampler, share

    def batches(seed, epoch=1, n=41, size=8):
        sampler = GlobalBatchSampler(n, size, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(1) == batches(1) and batches(1) != batches(2) and batches(1) != batches(1, epoch=2)
    assert sorted(i for b in batches(1) for i in b) == list(range(41)) and len(batches(1)) == 6
    for size in (8, 3, 1):  # a full global batch, and a last one with fewer items than processes
        for world in (1, 2, 3):
            slices = [share(size, rank, world) for rank in range(world)]
            assert slices[0][0] == 0 and slices[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))


def test_sigkill_mid_epoch_then_resume_gives_the_same_results(demo_tree, tmp_path):
    args = ["--number_of_epochs=3", "--ckpt_interval_minutes=0", "--ckpt_interval_steps=5", *FAST]
    reference = tmp_path / "reference"
    run_recipe("M08", f"--output_folder={reference}", *args, demo_tree=demo_tree)
    crashed = tmp_path / "crashed"
    cmd = [
        sys.executable,
        str(RECIPE / "train.py"),
        str(RECIPE / "hparams" / "fold_M08.yaml"),
        f"--output_folder={crashed}",
        f"--demo_folder={demo_tree}",
        *args,
    ]
    proc = subprocess.Popen(cmd, cwd=RECIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    killed_in = None
    while time.time() < deadline and proc.poll() is None:
        for meta in (crashed / "save").glob("CKPT+*/CKPT.yaml"):
            try:
                text = meta.read_text()
            except FileNotFoundError:  # the run deleted that old checkpoint between glob and read
                continue
            if "end-of-epoch: false" in text and (crashed / "train_log.txt").exists():
                killed_in = meta.parent.name
                proc.send_signal(signal.SIGKILL)  # mid-epoch, after at least one full epoch
                break
        if killed_in:
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_in is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (crashed / "test_results.json").exists()
    run_recipe("M08", f"--output_folder={crashed}", *args, demo_tree=demo_tree)
    a = json.loads((reference / "test_results.json").read_text())
    b = json.loads((crashed / "test_results.json").read_text())
    assert without_output_folder(a) == without_output_folder(b)
    assert (reference / "train_log.txt").read_text() == (crashed / "train_log.txt").read_text()


def test_a_run_killed_while_deleting_an_old_checkpoint_resumes(tmp_path, monkeypatch):
    """SpeechBrain deletes an old checkpoint file by file; a run killed meanwhile (the kill test
    above, once in a while) must not leave a folder that still looks like a checkpoint but lacks
    files: the next run would refuse it (no fingerprint) or fail to load it."""
    import shutil

    from speechbrain.utils.checkpoints import Checkpointer

    from local.checkpoints import FINGERPRINT, CompleteCheckpointer, RunFingerprint
    from local.fingerprint import FingerprintError, check_fingerprint

    fingerprint = {"version": 2, "options": {"alpha": 0.7}}
    save = tmp_path / "save"
    recoverables = {"model": torch.nn.Linear(2, 2), FINGERPRINT: RunFingerprint(fingerprint)}
    ckpt = CompleteCheckpointer(save, recoverables=recoverables)
    ckpt.save_and_keep_only(meta={"loss": 1.0}, num_to_keep=1)
    (old,) = ckpt.list_checkpoints()
    original_delete, rmtree = Checkpointer.__dict__["_delete_checkpoint"], shutil.rmtree

    class Killed(BaseException):
        pass

    def killed_midway(path, *args, **kwargs):  # the fingerprint goes first, then the process dies
        (path / f"{FINGERPRINT}.ckpt").unlink()
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        ckpt.save_and_keep_only(meta={"loss": 0.5}, num_to_keep=1)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert Checkpointer.__dict__["_delete_checkpoint"] is original_delete  # SpeechBrain's, once more
    assert old.path.is_dir() and not (old.path / "CKPT.yaml").exists()  # an interrupted save now
    check_fingerprint(save, fingerprint)  # resumes: the half-deleted folder is no checkpoint
    resumed = CompleteCheckpointer(save, recoverables=recoverables)
    assert [c.meta["loss"] for c in resumed.list_checkpoints()] == [0.5]
    resumed.save_and_keep_only(meta={"loss": 0.25}, num_to_keep=1)
    # the interrupted folder is gone (its name may be taken again by a save in the same second)
    assert [(c.path.name, c.meta["loss"]) for c in resumed.list_checkpoints()] == [
        (p.name, 0.25) for p in save.glob("CKPT+*")
    ]
    # such a folder left by an earlier version of this class cannot be told from a checkpoint of an
    # older recipe: the run stops with one line that names both, and the folder
    (kept,) = save.glob("CKPT+*")
    (kept / f"{FINGERPRINT}.ckpt").unlink()
    with pytest.raises(FingerprintError, match=re.escape(f"{kept} has no readable fingerprint: ") + ".*killed while"):
        check_fingerprint(save, fingerprint)


def test_train_log_follows_the_checkpoint_it_resumes_from(tmp_path):
    from local.checkpoints import CompleteCheckpointer, LogFileState

    log = tmp_path / "train_log.txt"
    state = LogFileState(log)
    ckpt = CompleteCheckpointer(tmp_path / "save", recoverables={"log": state})
    log.write_text("epoch 1\n")
    ckpt.save_checkpoint(meta={"loss": 1.0})
    log.write_text("epoch 1\nepoch 2\n")  # written, then the run was killed before its checkpoint
    ckpt.recover_if_possible()
    assert log.read_text() == "epoch 1\n"
    log.write_text("epoch 1\nepoch 2\nepoch 3\n")
    with state.kept():  # the test loads the best checkpoint: the log stays complete
        ckpt.recover_if_possible(min_key="loss")
    assert log.read_text() == "epoch 1\nepoch 2\nepoch 3\n"
    # an interrupted save (no CKPT.yaml yet) is never loaded, and is cleaned up at the next save
    broken = tmp_path / "save" / "CKPT+broken"
    broken.mkdir()
    (broken / "CKPT.yaml.partial").write_text("end-of-epoch: true\n")
    assert ckpt.find_checkpoint().path.name != "CKPT+broken"
    ckpt.save_checkpoint(meta={"loss": 0.5})
    assert not broken.exists()
