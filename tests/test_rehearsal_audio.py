"""The audio of the rehearsal corpus: word list and layout, determinism, resume, severities,
microphones, missing synthesizers, and CSVs the SA pipeline's reader takes.

The tests that synthesize speech need Debian's espeak-ng and festival with the voices of
hparams/rehearsal.yaml; they skip, saying so, where those are absent, and fail instead when
REQUIRE_SYNTHESIZERS=1 (set by .ci/run, which installs them).
"""

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from local import dysarthria, synthesizers
from local.corpus import GROUPS, parse_utterance_id
from local.word_list import (
    BLOCKS,
    DICTIONARY,
    UNCOMMON_KEYS,
    WORD_KEYS,
    WordListError,
    b3_words,
    block_words,
    dictionary_words,
)

from conftest import RECIPE, SHARED

# Debian packages the tests that synthesize speech need, and how to tell they are there.
DEBIAN_PACKAGES = "espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts wamerican"


@functools.lru_cache
def _festival_voices():
    try:
        return synthesizers.festival_voices()
    except synthesizers.SynthesizerError:
        return set()


def need_debian_packages(*programs):
    """Skips (or, with REQUIRE_SYNTHESIZERS=1, fails) a test when a program, a festival voice of
    the presets or the word list is absent."""
    missing = [p for p in programs if shutil.which(p) is None]
    if "festival" in programs and "festival" not in missing:
        missing += [f"festival voice {v}" for v in synthesizers.FESTIVAL_VOICE_PACKAGES if v not in _festival_voices()]
    if not DICTIONARY.is_file():
        missing.append(str(DICTIONARY))
    if missing:
        message = f"{', '.join(missing)} absent: apt-get install {DEBIAN_PACKAGES}"
        if os.environ.get("REQUIRE_SYNTHESIZERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _metadata_dir():
    folder = SHARED / "metadata"
    return folder if folder.is_dir() else None


# ----------------------------------------------------------------------------- word list


def test_real_word_list_has_uaspeech_keys_and_blocks(shared_uaspeech):
    need_debian_packages()
    b3, source = b3_words(shared_uaspeech / "metadata")
    assert "real metadata" in source
    assert list(b3) == list(WORD_KEYS) and len(b3) == 255
    counts = {c: sum(k.startswith(c) and k[len(c) :][:1].isdigit() for k in b3) for c in ("D", "C", "CW", "UW")}
    assert counts == {"D": 10, "C": 19, "CW": 100, "UW": 100}
    assert sum(len(k) == 2 and k[0] == "L" and k[1].isalpha() for k in b3) == 26
    assert (b3["D0"], b3["LA"], b3["C1"], b3["CW95"], b3["UW1"]) == ("ZERO", "ALPHA", "COMMAND", "COME", "ENTHUSE")
    blocks, digest = block_words(b3, seed=2026)
    assert len(digest) == 64
    common = [k for k in WORD_KEYS if k not in UNCOMMON_KEYS]
    for block in ("B1", "B2"):
        assert all(blocks[block][k] == b3[k] for k in common), "B1/B2 share B3's 155 common words"
    uncommon = {b: {blocks[b][k] for k in UNCOMMON_KEYS} for b in BLOCKS}
    assert all(len(words) == 100 for words in uncommon.values())
    assert not uncommon["B1"] & uncommon["B2"] and not (uncommon["B1"] | uncommon["B2"]) & set(b3.values())
    assert all(w == w.upper() and w.isalpha() for w in uncommon["B1"] | uncommon["B2"])
    again, _ = block_words(b3, seed=2026)
    other, _ = block_words(b3, seed=7)
    assert again == blocks and other["B1"]["UW1"] != blocks["B1"]["UW1"]


def test_word_list_without_metadata_is_the_demo_list_and_says_so():
    b3, source = b3_words(None)
    assert "demo" in source and list(b3) == list(WORD_KEYS)


def test_word_list_errors_name_the_file_or_the_package(tmp_path):
    meta = {"utterance_ids": ["M05_B3_D0_M2", "M05_B3_D0_M3"], "target_words": ["ZERO", "NOUGHT"]}
    (tmp_path / "M05_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(WordListError, match=r"M05_metadata.json.*D0 is 'NOUGHT' here, 'ZERO' elsewhere"):
        b3_words(tmp_path)
    meta["target_words"] = ["ZERO", "ZERO"]
    (tmp_path / "M05_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(WordListError, match=r"254 word keys have no utterance"):
        b3_words(tmp_path)
    with pytest.raises(WordListError, match=r"does not exist"):
        b3_words(tmp_path / "absent")
    with pytest.raises(WordListError, match=r"is missing: apt-get install wamerican"):
        dictionary_words(tmp_path / "american-english")


# ----------------------------------------------------------------------------- synthesizers


ESPEAK_VOICE = {"engine": "espeak-ng", "voice": "en-us+m3", "pitch": 50, "speed": 175}
KAL, KED = {"engine": "festival", "voice": "kal_diphone"}, {"engine": "festival", "voice": "ked_diphone"}
Missing = synthesizers.SynthesizerError


def _simulations():
    from hyperpyyaml import load_hyperpyyaml

    with open(RECIPE / "hparams" / "rehearsal.yaml", encoding="utf-8") as handle:
        return load_hyperpyyaml(handle)


def test_missing_program_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without any synthesizer
    with pytest.raises(
        synthesizers.SynthesizerError, match=r"^espeak-ng is missing \(not on PATH\): apt-get install espeak-ng$"
    ):
        synthesizers.check_voices({"M08": ESPEAK_VOICE})
    with pytest.raises(
        synthesizers.SynthesizerError, match=r"^festival is missing \(not on PATH\): apt-get install festival$"
    ):
        synthesizers.check_voices({"M07": {"engine": "festival", "voice": "kal_diphone"}})


def test_missing_festival_voice_names_its_package(tmp_path, monkeypatch):
    fake = tmp_path / "festival"  # a festival that has only ked_diphone
    fake.write_text('#!/bin/sh\ncat >/dev/null\necho "(ked_diphone)"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    voices = {
        "M11": {"engine": "festival", "voice": "ked_diphone"},
        "M07": {"engine": "festival", "voice": "kal_diphone"},
    }
    with pytest.raises(
        synthesizers.SynthesizerError,
        match=r"^festival voice kal_diphone is missing: apt-get install festvox-kallpc16k$",
    ):
        synthesizers.check_voices(voices)
    with pytest.raises(
        synthesizers.SynthesizerError, match=r"festival voice 'nosuch_diphone' is not one this corpus knows"
    ):
        synthesizers.check_voices({"M07": {"engine": "festival", "voice": "nosuch_diphone"}})


def test_missing_espeak_voice_names_its_package():
    need_debian_packages("espeak-ng")
    # espeak-ng itself falls back, silently, to its default voice for an unknown variant
    with pytest.raises(synthesizers.SynthesizerError, match=r"variant nosuch .* apt-get install espeak-ng-data$"):
        synthesizers.check_voices({"M08": {**ESPEAK_VOICE, "voice": "en-us+nosuch"}})
    with pytest.raises(
        synthesizers.SynthesizerError, match=r"voice xx-nosuch is missing .*apt-get install espeak-ng-data$"
    ):
        synthesizers.check_voices({"M08": {**ESPEAK_VOICE, "voice": "xx-nosuch"}})


def test_synthesizers_speak_words_at_16khz():
    need_debian_packages("espeak-ng", "festival")
    for voice in (ESPEAK_VOICE, KAL):
        one, x_ray = synthesizers.synthesize(voice, ["ONE", "X-RAY"], 16000)
        assert 0.2 < len(one) / 16000 < 2.0 and 0.2 < len(x_ray) / 16000 < 2.0
        assert np.max(np.abs(one)) > 0.05
        again = synthesizers.synthesize(voice, ["ONE"], 16000)[0]
        assert np.array_equal(one, again), "a synthesizer is deterministic"


# ----------------------------------------------------------------------------- simulations


def test_degradation_grows_with_severity():
    """One voice, one set of draws: the template distance to the clean word (a listening proxy)
    rises with the severity, and the template recognizer's accuracy does not rise."""
    need_debian_packages("espeak-ng")
    from local.listen_proxy import template_accuracy, template_distance

    hp = _simulations()
    words = ["ZERO", "SEVEN", "ALPHA", "BRAVO", "COMMAND", "DELETE", "WATER", "PEOPLE"]
    clean = dict(zip(words, synthesizers.synthesize(ESPEAK_VOICE, words, 16000)))
    distance, accuracy = [], []
    for s in (0.05, 0.4, 0.7, 0.98):
        values = dysarthria.speaker_values(hp["simulations"], {name: s for name in dysarthria.SIMULATIONS})
        recordings = {}
        for i, word in enumerate(words):

            def rngs(purpose, i=i):
                return np.random.default_rng([i, len(purpose), sum(map(ord, purpose))])

            x = dysarthria.simulate(clean[word], 16000, values, 1.0, rngs, hp["level_dbfs"], hp["padding_s"])
            recordings[word] = (word, dysarthria.microphone(x, 16000, hp["microphones"]["M5"], rngs("mic")))
        distance.append(np.mean([template_distance(recordings[w][1], clean[w], 16000) for w in words]))
        accuracy.append(template_accuracy(recordings, clean, 16000)[0])
    assert all(a < b for a, b in zip(distance, distance[1:])), distance
    assert all(a >= b for a, b in zip(accuracy, accuracy[1:])) and accuracy[0] > accuracy[-1], accuracy


def test_wsola_keeps_pitch_and_stretches_time():
    rate = 16000
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 200 * t)
    slow = dysarthria.wsola(tone, 1.5)
    assert abs(len(slow) - 1.5 * rate) <= 1
    spectrum = np.abs(np.fft.rfft(slow[2000:-2000] * np.hanning(len(slow) - 4000)))
    peak = np.argmax(spectrum) * rate / (len(slow) - 4000)
    assert abs(peak - 200) < 3, peak
    shifted = dysarthria.vocal_tract_and_tempo(tone, rate, 1.1, 1.0)  # all frequencies x 1.1
    spectrum = np.abs(np.fft.rfft(shifted[2000:-2000] * np.hanning(len(shifted) - 4000)))
    assert abs(np.argmax(spectrum) * rate / (len(shifted) - 4000) - 220) < 4
    assert abs(len(shifted) - rate) <= 2


# ----------------------------------------------------------------------------- the audio stage

TINY_SPEAKERS = ("F02", "M07", "M16")


def _quiet(*_):
    pass


def _build(corpus, **kwargs):
    from local.rehearsal_audio import build_audio

    options = {"preset": "tiny", "metadata_dir": _metadata_dir(), "jobs": 2, "progress": False, "log": _quiet}
    return build_audio(corpus, **{**options, **kwargs})


def _files(corpus):
    """{relative path: bytes} of the recordings and CSVs of a corpus."""
    corpus = Path(corpus)
    paths = [p for sub in ("audio", "csv") for p in sorted((corpus / sub).rglob("*")) if p.is_file()]
    return {str(p.relative_to(corpus)): p.read_bytes() for p in paths}


def _manifest_without_timing(corpus):
    manifest = json.loads((Path(corpus) / "corpus.json").read_text())
    manifest.pop("stages")
    return manifest


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """The tiny preset built once (2 processes)."""
    need_debian_packages("espeak-ng", "festival")
    corpus = tmp_path_factory.mktemp("rehearsal") / "tiny"
    _build(corpus)
    return corpus


def test_layout_ids_and_manifest(tiny_corpus):
    import wave

    from local.rehearsal_audio import LABEL

    manifest = json.loads((tiny_corpus / "corpus.json").read_text())
    keys = manifest["words"]["blocks"]["B3"]
    assert len(keys) == 20 and manifest["preset"] == "tiny"
    expected = {
        f"audio/{spk}/{spk}_{block}_{key}_{mic}.wav"
        for spk in TINY_SPEAKERS
        for block in BLOCKS
        for key in keys
        for mic in ("M5", "M6")
    }
    expected |= {f"csv/{spk}{suffix}.csv" for spk in TINY_SPEAKERS for suffix in ("", "_B1", "_B2", "_B3")}
    files = _files(tiny_corpus)
    assert set(files) == expected
    for path in expected:
        if path.endswith(".wav"):
            assert parse_utterance_id(Path(path).stem)["speaker"] == Path(path).parent.name
            with wave.open(str(tiny_corpus / path)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
                assert 0.5 < w.getnframes() / 16000 < 6.0
    for spk in TINY_SPEAKERS:
        assert files[f"csv/{spk}.csv"] == files[f"csv/{spk}_B3.csv"]
        for block in BLOCKS:
            lines = files[f"csv/{spk}_{block}.csv"].decode().splitlines()
            assert lines[0] == "ID,duration,wav,spk_id,wrd" and len(lines) == 1 + 40
            for line in lines[1:]:
                utt_id, duration, wav, speaker, word = line.split(",")
                assert wav == f"$data_root/audio/{spk}/{utt_id}.wav" and speaker == spk and word == word.upper()
                assert utt_id.split("_")[1] == block
                assert word == manifest["words"]["blocks"][block][utt_id.split("_")[2]]
                with wave.open(str(tiny_corpus / "audio" / spk / f"{utt_id}.wav")) as w:
                    assert abs(float(duration) - w.getnframes() / 16000) < 1e-4
    assert manifest["label"] == LABEL and "SYNTHETIC" in LABEL and "NOT UASpeech" in LABEL
    assert manifest["counts"] == {
        "speakers": 3,
        "word_keys": 20,
        "blocks": 3,
        "microphones": 2,
        "productions": 180,
        "recordings": 360,
    }
    assert set(manifest["speakers"]) == set(TINY_SPEAKERS)
    assert manifest["speakers"]["M07"]["voice"]["engine"] == "festival"
    assert manifest["speakers"]["M16"]["severity"] == 0.57 and manifest["speakers"]["M16"]["group"] == "low"
    assert manifest["words"]["dictionary_sha256"] == hashlib.sha256(DICTIONARY.read_bytes()).hexdigest()
    assert ("real metadata" if _metadata_dir() else "demo") in manifest["words"]["b3_source"]
    stage = manifest["stages"]["audio"]
    assert stage["productions_made"] == 180 and stage["seconds"] > 0
    assert stage["bytes"] == sum(map(len, files.values())) and stage["files"] == len(files)
    assert not list(tiny_corpus.rglob("*.tmp"))


def test_csvs_are_read_by_the_sa_pipeline_reader(tiny_corpus):
    from local.sa_models import read_speaker_csv

    for name in ("M16", "M16_B1"):
        utts = read_speaker_csv(tiny_corpus / "csv" / f"{name}.csv", "M16", data_root=tiny_corpus)
        assert len(utts) == 40
        assert all(Path(u.wav).is_file() and u.word == u.word.upper() for u in utts)
        assert [u.duration for u in utts] == sorted(u.duration for u in utts)


def test_microphones_of_one_production_are_correlated(tiny_corpus):
    """The two microphones of a production are far more alike than two productions of one word
    (B1, B3 on one microphone). Not on every word: two productions of a word can come out nearly
    alike (tiny corpus with the demo word list, M16 C6: 0.64 against 0.63 for its microphones), so
    the test asks it of the medians and of 95 % of the (speaker, word) pairs."""
    from scipy import signal as sp

    from local.rehearsal_audio import read_wav

    def likeness(a, b, max_lag=800):  # peak normalised cross-correlation within +-50 ms
        n = max(len(a), len(b))
        a, b = np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))
        c = sp.correlate(a, b, mode="full", method="fft")[n - 1 - max_lag : n + max_lag]
        return float(np.max(np.abs(c)) / (np.linalg.norm(a) * np.linalg.norm(b)))

    manifest = json.loads((tiny_corpus / "corpus.json").read_text())
    common = [k for k in manifest["words"]["blocks"]["B3"] if not k.startswith("UW")]
    same, other = [], []
    for spk in TINY_SPEAKERS:
        for key in common:
            m5, m6, b1 = (
                read_wav(tiny_corpus / "audio" / spk / f"{spk}_{b}_{key}_{m}.wav")[0]
                for b, m in (("B3", "M5"), ("B3", "M6"), ("B1", "M5"))
            )
            assert not np.array_equal(m5, m6), "each microphone is its own channel"
            same.append(likeness(m5, m6))
            other.append(likeness(m5, b1))
    same, other = np.array(same), np.array(other)
    assert np.median(same) > 0.6 and np.median(other) < 0.2, (np.median(same), np.median(other))
    assert (same > other).mean() >= 0.95, list(zip(same.round(2), other.round(2)))


def test_build_is_deterministic(tiny_corpus, tmp_path):
    again = tmp_path / "again"
    _build(again, jobs=1)  # one process this time: the same bytes
    assert _files(again) == _files(tiny_corpus)
    assert _manifest_without_timing(again) == _manifest_without_timing(tiny_corpus)


def test_killed_build_resumes_to_the_same_bytes(tiny_corpus, tmp_path):
    corpus = tmp_path / "killed"
    command = [sys.executable, "make_rehearsal.py", "--corpus", str(corpus), "--preset", "tiny", "--jobs", "2"]
    command += ["--stage", "audio"]
    command += ["--noprogressbar"] + (["--metadata_dir", str(_metadata_dir())] if _metadata_dir() else [])
    proc = subprocess.Popen(command, cwd=RECIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((corpus / "audio").rglob("*.wav"))) >= 40:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    time.sleep(0.5)  # its workers die with it
    found = len(list((corpus / "audio").rglob("*.wav")))
    time.sleep(0.5)
    assert len(list((corpus / "audio").rglob("*.wav"))) == found, "a worker outlived the killed build"
    assert not (corpus / "corpus.json").exists()
    manifest = _build(corpus)
    assert _files(corpus) == _files(tiny_corpus)
    stage = manifest["stages"]["audio"]
    assert stage["productions_found"] >= 20 and stage["productions_made"] + stage["productions_found"] == 180


def test_damaged_or_missing_recordings_are_remade_and_nothing_else(tiny_corpus, tmp_path):
    corpus = tmp_path / "damaged"
    shutil.copytree(tiny_corpus, corpus)
    audio = corpus / "audio" / "M16"
    (audio / "M16_B1_D1_M5.wav").unlink()
    (audio / "M16_B3_LA_M6.wav").unlink()
    with open(audio / "M16_B2_C1_M5.wav", "r+b") as handle:
        handle.truncate(1000)  # as a copy cut short would leave it
    (audio / ".M16_B3_D2_M5.wav.12345.tmp").write_bytes(b"RIFF")  # a killed build's temporary file
    untouched = {p: p.stat().st_mtime_ns for p in (corpus / "audio").rglob("*.wav")}
    manifest = _build(corpus)
    assert manifest["stages"]["audio"]["productions_made"] == 3
    assert _files(corpus) == _files(tiny_corpus)
    redone = {p for p, mtime in untouched.items() if p.stat().st_mtime_ns != mtime}
    # a production's microphones are made together: the damaged one's sibling is rewritten, same bytes
    assert redone <= {audio / "M16_B2_C1_M5.wav", audio / "M16_B2_C1_M6.wav", audio / "M16_B1_D1_M6.wav"} | {
        audio / "M16_B3_LA_M5.wav"
    }
    assert not list(corpus.rglob("*.tmp"))


def test_a_corpus_of_other_settings_is_refused_untouched(tiny_corpus, tmp_path):
    from local.rehearsal_audio import RehearsalError

    corpus = tmp_path / "other"
    shutil.copytree(tiny_corpus, corpus)
    before = _files(corpus)
    with pytest.raises(RehearsalError, match=r"holds a corpus of other settings \(settings.seed: 2026 -> 7\)"):
        _build(corpus, seed=7)
    assert _files(corpus) == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(RehearsalError, match=r"is not empty and holds no rehearsal corpus"):
        _build(stranger)


def _run_cli(args, env=None):
    return subprocess.run(
        [sys.executable, "make_rehearsal.py", *args], cwd=RECIPE, capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    corpus = tmp_path / "corpus"
    proc = _run_cli(["--corpus", str(corpus), "--stage", "audio", "--preset", "huge"])
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("ERROR: hparams file") and "no preset 'huge' (presets: full, tiny)" in proc.stderr
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    proc = _run_cli(
        ["--corpus", str(corpus), "--stage", "audio", "--preset", "tiny"], env={**os.environ, "PATH": str(empty_path)}
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ERROR: espeak-ng is missing (not on PATH): apt-get install espeak-ng"
    proc = _run_cli(["--corpus", str(corpus), "--stage", "audio", "--jobs", "0"])
    assert proc.returncode == 1 and proc.stderr.strip() == "ERROR: --jobs=0 is not allowed: it must be an integer >= 1"
    proc = _run_cli(["--corpus", str(corpus), "--preset", "tiny"])  # every stage: the later ones need the tokenizer
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ERROR: --tokenizer_file is needed for the models, logits and cross stages"
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"not read before the options are checked")
    proc = _run_cli(
        ["--corpus", str(corpus), "--preset", "tiny", "--tokenizer_file", str(tokenizer), "--cross_speakers", "M08"]
    )
    assert proc.returncode == 1  # the tiny preset has no M08: said before hours of earlier stages
    assert proc.stderr.strip() == "ERROR: --cross_speakers: M08 not among the corpus's speakers (F02, M07, M16)"
    assert not corpus.exists()


def test_speakers_degrade_group_by_group():
    """The speakers' own voices, profiles and draws: the template distance of their B3 words to
    their clean words rises from the high group to the very low one (one speaker of each)."""
    need_debian_packages("espeak-ng")
    from local.listen_proxy import template_distance
    from local.rehearsal_audio import load_settings, make_production

    settings = load_settings(preset="full")
    words = {"D0": "ZERO", "D7": "SEVEN", "LA": "ALPHA", "LB": "BRAVO", "C1": "COMMAND", "C3": "DELETE"}
    distance = {}
    for spk in ("M08", "M05", "F02", "M04"):  # high, mid, low, very low; all espeak-ng voices
        clean = synthesizers.synthesize(settings["voices"][spk], list(words.values()), 16000)
        distance[spk] = np.mean(
            [
                template_distance(make_production(settings, spk, "B3", key, x)["M5"], x, 16000)
                for key, x in zip(words, clean)
            ]
        )
    assert distance["M08"] < distance["M05"] < distance["F02"] < distance["M04"], distance
    assert [s for g in ("high", "mid", "low", "very_low") for s in GROUPS[g] if s in distance] == list(distance)


def test_a_production_does_not_depend_on_the_preset(tiny_corpus, tmp_path):
    """The tiny corpus is a part of the full one: a production's bytes depend on the seed, the
    speaker, the block, the word and the knobs, not on which other speakers and words are built."""
    text = (RECIPE / "hparams" / "rehearsal.yaml").read_text()
    hparams = tmp_path / "rehearsal.yaml"
    hparams.write_text(
        text.replace("presets:\n", "presets:\n    pair: {speakers: [M07], words: [UW3, D2], microphones: [M5, M6]}\n")
    )
    corpus = tmp_path / "pair"
    _build(corpus, hparams_file=hparams, preset="pair")
    files = {path: data for path, data in _files(corpus).items() if path.endswith(".wav")}
    assert len(files) == 12 and all(data == (tiny_corpus / path).read_bytes() for path, data in files.items())
