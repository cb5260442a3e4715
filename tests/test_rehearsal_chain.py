"""The rehearsal corpus's tiny preset through the user's whole chain, as a user runs it:
make_rehearsal.py (audio -> SA models -> extract_logits.py -> cross decodes) -> train.py ->
decode.py -> compare.py, asserting the files and figures each step must produce, and that every
figure says it comes from synthetic speech decoded by real models.

Needs espeak-ng (skipped without it, a failure with REQUIRE_SYNTHESIZERS=1 as in CI). Uses the SA
tokenizer when ../shared/uaspeech holds it, else a small tokenizer trained on the corpus's words.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECIPE, SHARED

SPEAKERS = ("F02", "M07", "M16")  # the tiny preset's speakers
HELD_OUT, TEACHERS = "M16", ("F02", "M07")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(*argv, check=True):
    proc = subprocess.run(
        [sys.executable, *map(str, argv)], cwd=RECIPE, env=_env(), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _tokenizer(tmp, corpus):
    """The SA tokenizer when it is at hand, else one trained on the corpus's words (its CSVs)."""
    if (SHARED / "sa_tokenizer.model").is_file():
        return SHARED / "sa_tokenizer.model"
    import csv

    from local.synthetic import train_tokenizer

    words = sorted({row["wrd"] for path in (corpus / "csv").glob("*_B?.csv") for row in csv.DictReader(path.open())})
    train_tokenizer(tmp / "tokenizer.model", words, 120, seed=3)
    return tmp / "tokenizer.model"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        if os.environ.get("REQUIRE_SYNTHESIZERS") == "1":
            pytest.fail("espeak-ng is missing (Debian package espeak-ng) but REQUIRE_SYNTHESIZERS=1")
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng)")
    tmp = tmp_path_factory.mktemp("rehearsal_chain")
    corpus = tmp / "corpus"
    common = ("--corpus", corpus, "--preset", "tiny", "--jobs", "1", "--threads", "1", "--noprogressbar")
    _run("make_rehearsal.py", *common, "--stage", "audio")
    tokenizer = _tokenizer(tmp, corpus)
    build = _run(  # every stage: the audio is found done, the rest is built
        "make_rehearsal.py", *common, "--tokenizer_file", tokenizer
    )  # fmt: skip
    run = tmp / "run"
    train = _run(
        "train.py", "hparams/fold_M16.yaml", f"--logit_root={corpus / 'logit_extraction'}",
        f"--tokenizer_file={tokenizer}", f"--teachers=[{', '.join(TEACHERS)}]", "--input_streams=cross",
        "--cross_audio=teachers",  # the tiny corpus has no audio of the 12 other speakers
        "--number_of_epochs=2", f"--output_folder={run}", f"--cache_folder={tmp / 'cache'}", "--noprogressbar",
    )  # fmt: skip
    models = [f"{s}={corpus / 'models' / s / 'hyperparams.yaml'}:{corpus / 'models' / s / 'save'}" for s in SPEAKERS]
    decode = _run(
        "decode.py", run, "--models", *models, f"--speaker_csv={corpus / 'csv' / 'M16.csv'}",
        f"--data_root={corpus}", "--search", "greedy", "beam", "--beam_size=4", "--batch_size=8",
        "--noprogressbar",
    )  # fmt: skip
    return {"corpus": corpus, "run": run, "tokenizer": tokenizer, "build": build, "train": train, "decode": decode}


def test_build_makes_every_input_of_the_recipe(chain):
    corpus = chain["corpus"]
    manifest = json.loads((corpus / "corpus.json").read_text())
    assert set(manifest["stages"]) >= {"audio", "models", "logits", "cross"}
    for stage in ("audio", "models", "logits", "cross"):
        assert manifest["stages"][stage]["seconds"] >= 0 and manifest["stages"][stage]["bytes"] > 0
    assert json.loads((corpus / "REHEARSAL.json").read_text())["kind"] == "rehearsal"
    n_test = {s: len((corpus / "csv" / f"{s}_B3.csv").read_text().strip().splitlines()) - 1 for s in SPEAKERS}
    assert all(n > 0 for n in n_test.values())
    # SA experiment folders, in the SA pipeline's layout
    for s in SPEAKERS:
        folder = corpus / "models" / s
        assert (folder / "hyperparams.yaml").is_file()
        assert list((folder / "save").glob("CKPT+*")), s
        assert (folder / "save" / "lm.ckpt").is_file() and (folder / "save" / "tokenizer.ckpt").is_file()
    # the logit tree: every model on every speaker
    summary = json.loads((corpus / "logit_extraction" / "extraction_summary.json").read_text())
    assert len(summary["extractions"]) == len(SPEAKERS) ** 2
    # the cross-testing files: every model on every other speaker's B3, SpeechBrain's format
    sys.path.insert(0, str(RECIPE))
    from local.wer_files import read_wer_file

    for m in SPEAKERS:
        for s in SPEAKERS:
            path = corpus / "cross_testing" / m / f"wer_{s}.txt"
            assert path.is_file() == (m != s), path
            if m != s:
                wf = read_wer_file(path)
                assert len(wf.utterances) == n_test[s]
                assert {u.id.split("_")[0] for u in wf.utterances} == {s}
    # the closing table names every stage
    assert re.search(r"^cross\s+\d+", chain["build"].stdout, re.M)


def test_train_labels_the_run_rehearsal_and_scores_every_test_utterance(chain):
    run, corpus = chain["run"], chain["corpus"]
    info = json.loads((run / "test_results.json").read_text())
    assert info["data_kind"] == "rehearsal" and info["synthetic_data"] is True
    assert "rehearsal corpus: SYNTHETIC speech, real models" in chain["train"].stdout
    n_test = len((corpus / "csv" / "M16_B3.csv").read_text().strip().splitlines()) - 1
    assert info["student"]["n"] == n_test
    for name in ("mean", "majority_vote", *(f"teacher_{t}" for t in TEACHERS)):
        system = info["baselines"][name]
        assert system["n"] == n_test and 0.0 <= system["WRA"] <= 100.0


def test_decode_writes_free_running_files_for_the_student_and_its_baselines(chain):
    run = chain["run"]
    info = json.loads((run / "test_results.json").read_text())
    n_test = info["student"]["n"]
    assert set(info["free_running"]) >= {"greedy", "beam"}
    from local.wer_files import read_wer_file

    for key in ("greedy", "beam"):
        for suffix in ("", "_mean", "_majority_vote", *(f"_teacher_{t}" for t in TEACHERS)):
            path = run / f"wer_test_free_{key}{suffix}.txt"
            assert len(read_wer_file(path).utterances) == n_test, path
    assert info["data_kind"] == "rehearsal"  # decode.py kept the run's label


def test_compare_puts_the_student_beside_the_sa_decodes_and_labels_them(chain):
    run, corpus = chain["run"], chain["corpus"]
    files = [corpus / "cross_testing" / t / "wer_M16.txt" for t in TEACHERS] + [run / "wer_test_free_beam.txt"]
    out = _run("compare.py", *files, "--json", run.parent / "compare.json")
    assert "REHEARSAL corpus: SYNTHETIC speech, real models" in out.stdout
    result = json.loads((run.parent / "compare.json").read_text())
    assert result["data_kind"] == "rehearsal"
    # its figure of a SpeechBrain file is the file's own
    from local.wer_files import read_wer_file

    for t in TEACHERS:
        wf = read_wer_file(corpus / "cross_testing" / t / "wer_M16.txt")
        right = sum(u.ref == u.hyp for u in wf.utterances)
        system = result["systems"][f"{t}/wer_M16"]
        assert system["WRA"] == pytest.approx(100.0 * right / len(wf.utterances), abs=0.01)


def test_compare_refuses_rehearsal_beside_the_demo_tree(chain, demo_tree, tmp_path):
    # a wer file under a folder marked as the demo tree (its SYNTHETIC.json)
    shutil.copy(Path(demo_tree) / "SYNTHETIC.json", tmp_path / "SYNTHETIC.json")
    demo_file = tmp_path / "F02" / "wer_M16.txt"
    demo_file.parent.mkdir()
    shutil.copy(chain["corpus"] / "cross_testing" / "F02" / "wer_M16.txt", demo_file)
    out = _run("compare.py", chain["corpus"] / "cross_testing" / "M07" / "wer_M16.txt", demo_file, check=False)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to compare" in lines[0] and "rehearsal corpus" in lines[0], out.stderr
