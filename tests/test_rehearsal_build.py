"""make_rehearsal.py as one command (audio -> models -> logits -> cross, audio_check): bad options
and bad input stop before anything is written, with one line ``ERROR: ...`` naming the file,
speaker or option and a non-zero exit; nothing already written is overwritten; nothing wrong or
partial is reported with exit code 0.

One tiny corpus is built once for the module (about 45 s; espeak-ng needed, skipped without it, a
failure with REQUIRE_SYNTHESIZERS=1); each test damages its own copy.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from test_rehearsal_chain import _run, _tokenizer

from conftest import RECIPE

COMMON = ("--jobs", "1", "--threads", "1", "--noprogressbar")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        if os.environ.get("REQUIRE_SYNTHESIZERS") == "1":
            pytest.fail("espeak-ng is missing (Debian package espeak-ng) but REQUIRE_SYNTHESIZERS=1")
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng)")
    tmp = tmp_path_factory.mktemp("rehearsal_build")
    corpus = tmp / "corpus"
    _run("make_rehearsal.py", "--corpus", corpus, "--preset", "tiny", *COMMON, "--stage", "audio")
    tokenizer = _tokenizer(tmp, corpus)
    _run("make_rehearsal.py", "--corpus", corpus, "--preset", "tiny", *COMMON, "--tokenizer_file", tokenizer)
    # another SentencePiece model of the special ids the SA models use: 40 pieces on the same words
    import csv

    from local.synthetic import train_tokenizer

    words = sorted({row["wrd"] for path in (corpus / "csv").glob("*_B?.csv") for row in csv.DictReader(path.open())})
    other = tmp / "other_tokenizer.model"
    train_tokenizer(other, words, 40, seed=5)
    return {"corpus": corpus, "tokenizer": tokenizer, "other": other, "tmp": tmp}


@pytest.fixture
def corpus(built, tmp_path):
    """A copy of the module's corpus, this test's to damage."""
    copy = tmp_path / "corpus"
    shutil.copytree(built["corpus"], copy, symlinks=True)
    return copy


def _tree(folder):
    """{relative path: (size, mtime_ns)} of every file under ``folder`` but the lock file (a command
    that holds the lock writes its pid there)."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if (p.is_file() or p.is_symlink()) and p.name != ".lock"
    }


def _refused(*argv, mentions=()):
    """make_rehearsal.py ``argv``: non-zero exit, one line ``ERROR: ...`` on stderr naming each of
    ``mentions``, no traceback. Returns that line."""
    proc = _run("make_rehearsal.py", *map(str, argv), *COMMON, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), proc.stderr[-3000:]
    for word in mentions:
        assert str(word) in lines[0], (word, lines[0])
    return lines[0]


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- options (cases 1, 2)


def test_a_tokenizer_that_is_not_sentencepiece_is_refused_before_the_audio_stage(tmp_path):
    fake = tmp_path / "fake.model"
    fake.write_text("not a SentencePiece model\n")
    out = tmp_path / "new"
    _refused("--corpus", out, "--preset", "tiny", "--tokenizer_file", fake, mentions=("--tokenizer_file", fake))
    assert not out.exists()


def test_a_device_the_models_stage_refuses_is_refused_before_the_audio_stage(tmp_path, built):
    out = tmp_path / "new"
    _refused(
        "--corpus", out, "--preset", "tiny", "--tokenizer_file", built["tokenizer"], "--device", "cpu:0",
        mentions=("--device=cpu:0",),
    )  # fmt: skip
    assert not out.exists()


# ------------------------------------------------------------------------ damaged records (case 7)


@pytest.mark.parametrize("stage", ["logits", "models", "cross", "all"])
def test_a_damaged_corpus_json_is_named_in_one_line(corpus, built, stage):
    manifest = corpus / "corpus.json"
    manifest.write_bytes(manifest.read_bytes()[:300])
    before = _tree(corpus)
    _refused(
        "--corpus", corpus, "--preset", "tiny", "--stage", stage, "--tokenizer_file", built["tokenizer"],
        mentions=(manifest,),
    )  # fmt: skip
    assert _tree(corpus) == before


def test_a_damaged_decoding_json_is_named_in_one_line(corpus, built):
    decoding = corpus / "cross_testing" / "decoding.json"
    decoding.write_bytes(decoding.read_bytes()[:100])
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", "cross", "--tokenizer_file", built["tokenizer"], mentions=(decoding,))
    assert _tree(corpus) == before


# ------------------------------------------------------------------- models of the corpus (case 11)


@pytest.mark.parametrize("stage", ["logits", "cross"])
def test_an_unfinished_model_is_refused(corpus, built, stage):
    (corpus / "models" / "M16" / "rehearsal_model.json").unlink()  # killed after its checkpoint
    shutil.rmtree(corpus / "logit_extraction" / "M16")
    (corpus / "cross_testing" / "M16" / "wer_F02.txt").unlink()
    (corpus / "REHEARSAL.json").unlink()
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", stage, "--tokenizer_file", built["tokenizer"], mentions=("M16",))
    assert _tree(corpus) == before


@pytest.mark.parametrize("stage", ["logits", "cross"])
def test_a_model_whose_checkpoint_is_gone_is_refused_before_writing(corpus, built, stage):
    """A finished model's checkpoint files are checked against what it recorded (a lost checkpoint
    was found only pair by pair, after the stage had started writing)."""
    for ckpt in (corpus / "models" / "M16" / "save").glob("CKPT+*"):
        shutil.rmtree(ckpt)
    shutil.rmtree(corpus / "logit_extraction" / "M16")
    (corpus / "cross_testing" / "M16" / "wer_F02.txt").unlink()
    (corpus / "REHEARSAL.json").unlink()
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", stage, "--tokenizer_file", built["tokenizer"], mentions=("M16", "missing"))
    assert _tree(corpus) == before


@pytest.mark.parametrize("stage", ["logits", "cross"])
def test_models_of_another_corpus_are_refused(corpus, built, stage):
    # the same models beside a corpus whose CSVs differ: they were not trained on it
    csv = corpus / "csv" / "M07_B1.csv"
    lines = csv.read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = f"{float(cells[1]) + 0.5:.3f}"
    csv.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    (corpus / "REHEARSAL.json").unlink()
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", stage, "--tokenizer_file", built["tokenizer"], mentions=(csv,))
    assert _tree(corpus) == before


# ---------------------------------------------------------------------------- tokenizer (case 12)


@pytest.mark.parametrize("stage", ["logits", "cross"])
def test_another_tokenizer_than_the_models_is_refused_before_writing(corpus, built, stage):
    (corpus / "cross_testing" / "F02" / "wer_M16.txt").unlink()
    shutil.rmtree(corpus / "logit_extraction" / "M16")
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", stage, "--tokenizer_file", built["other"], mentions=(built["other"],))
    assert _tree(corpus) == before


def test_decoding_json_records_the_tokenizer_and_refuses_another(corpus, built):
    decoding = corpus / "cross_testing" / "decoding.json"
    record = json.loads(decoding.read_text())
    assert record["tokenizer_sha256"] == _sha256(built["tokenizer"])
    record["tokenizer_sha256"] = "0" * 64  # decodes of another tokenizer
    decoding.write_text(json.dumps(record))
    (corpus / "cross_testing" / "F02" / "wer_M16.txt").unlink()
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", "cross", "--tokenizer_file", built["tokenizer"], mentions=("tokenizer",))
    assert _tree(corpus) == before


def test_a_finished_corpus_reruns_its_later_stages_with_exit_0(corpus, built):
    """Nothing to do, nothing refused; a decoding.json of before the tokenizer was recorded is taken
    (its tokenizer is the models', checked) and gets the checksum."""
    decoding = corpus / "cross_testing" / "decoding.json"
    record = json.loads(decoding.read_text())
    del record["tokenizer_sha256"]
    decoding.write_text(json.dumps(record))
    for stage in ("logits", "cross"):
        proc = _run("make_rehearsal.py", "--corpus", corpus, "--stage", stage, "--tokenizer_file", built["tokenizer"])
        assert "Traceback" not in proc.stderr
    assert "cross: 0 of 6 model/speaker decodes to make" in proc.stdout
    assert json.loads(decoding.read_text())["tokenizer_sha256"] == _sha256(built["tokenizer"])


# ------------------------------------------------------------------- damaged wer files (case 13)


@pytest.mark.parametrize("damage", ["head", "other_speaker"])
def test_a_damaged_wer_file_is_refused_not_kept(corpus, built, damage):
    wer = corpus / "cross_testing" / "F02" / "wer_M16.txt"
    text = wer.read_text()
    if damage == "head":  # cut inside an utterance
        wer.write_text("".join(text.splitlines(keepends=True)[:30]))
    else:  # a whole file of another (smaller) test set
        from local.wer_files import read_wer_file

        assert len(read_wer_file(wer).utterances) > 1
        other = corpus / "cross_testing" / "M07" / "wer_F02.txt"
        wer.write_text(other.read_text())  # parses, but holds F02's utterances, not M16's
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", "cross", "--tokenizer_file", built["tokenizer"], mentions=(wer,))
    assert _tree(corpus) == before


def test_a_bad_test_recording_is_refused_before_the_cross_stage_writes(corpus, built):
    """The cross stage checks the test CSVs and recordings of every decode it will make before it
    writes anything (its workers read them one speaker at a time)."""
    import shutil

    shutil.rmtree(corpus / "cross_testing")
    wav = sorted((corpus / "audio" / "M16").glob("M16_B3_*.wav"))[0]
    wav.write_bytes(wav.read_bytes()[:2000])
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", "cross", "--tokenizer_file", built["tokenizer"], mentions=(wav.stem,))
    assert _tree(corpus) == before and not (corpus / "cross_testing").exists()


def test_a_bad_test_recording_is_one_line_before_the_logits_stage_writes(corpus, built):
    """The logits stage checks every speaker's test CSV and recordings before extract_logits.py
    writes anything; its error was two lines (extract_logits.py's, then the stage's)."""
    import shutil

    shutil.rmtree(corpus / "logit_extraction" / "F02" / "M16")  # a pair to extract again
    wav = sorted((corpus / "audio" / "M16").glob("M16_B3_*.wav"))[0]
    wav.write_bytes(wav.read_bytes()[:2000])
    before = _tree(corpus)
    _refused("--corpus", corpus, "--stage", "logits", "--tokenizer_file", built["tokenizer"], mentions=(wav.stem,))
    assert _tree(corpus) == before


# ------------------------------------------------------------------------------- lock (case 14)


def test_a_second_command_is_refused_while_one_holds_the_corpus(corpus, built):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"h = open({str(corpus / '.lock')!r}, 'a+'); fcntl.flock(h, fcntl.LOCK_EX)\n"
            "h.seek(0); h.truncate(); h.write('pid 1234\\n'); h.flush(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for stage in ("models", "logits", "cross"):
            line = _refused(
                "--corpus", corpus, "--preset", "tiny", "--stage", stage, "--tokenizer_file", built["tokenizer"],
                mentions=("in use by another build", "pid 1234"),
            )  # fmt: skip
            assert str(corpus) in line
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_held_through_every_stage(corpus, built):
    """While a command runs its later stages, the lock file is held (a flock from here fails)."""
    shutil.rmtree(corpus / "cross_testing")  # all six decodes to make: the stage runs for seconds
    proc = subprocess.Popen(
        [sys.executable, "make_rehearsal.py", "--corpus", str(corpus), "--stage", "cross", "--cross_beam", "2",
         "--tokenizer_file", str(built["tokenizer"]), *COMMON],
        cwd=RECIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    held = False
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not held:
            if (corpus / "cross_testing").is_dir():
                with open(corpus / ".lock", "a+") as handle:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(handle, fcntl.LOCK_UN)
                    except OSError:
                        held = True
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert held


# ----------------------------------------------------------------- not a rehearsal corpus (case 17)


def test_later_stages_need_a_finished_audio_stage(built, tmp_path):
    folder = tmp_path / "not_a_corpus"
    folder.mkdir()
    shutil.copytree(built["corpus"] / "csv", folder / "csv")
    shutil.copytree(built["corpus"] / "audio", folder / "audio")
    (folder / "notes.txt").write_text("my notes\n")
    before = _tree(folder)
    for stage in ("models", "logits", "cross"):
        _refused(
            "--corpus", folder, "--preset", "tiny", "--stage", stage, "--tokenizer_file", built["tokenizer"],
            mentions=(folder, "audio stage"),
        )  # fmt: skip
    assert _tree(folder) == before


# ------------------------------------------------------------------------------------ audio_check


def test_audio_check_refuses_missing_and_truncated_recordings(corpus):
    from local.rehearsal_audio import read_wav, write_wav

    missing = corpus / "audio" / "F02" / "F02_B3_C1_M5.wav"
    missing.unlink()
    _refused("--corpus", corpus, "--stage", "audio_check", mentions=(missing,))
    shutil.copy(corpus / "audio" / "F02" / "F02_B3_C1_M6.wav", missing)  # back, whole
    short = corpus / "audio" / "M07" / "M07_B3_C1_M5.wav"
    signal, rate = read_wav(short)
    write_wav(short, (signal[: len(signal) // 2] * 32767).round().astype("int16"), rate)
    _refused("--corpus", corpus, "--stage", "audio_check", mentions=(short, "shorter"))
