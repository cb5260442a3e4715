"""The audio of the rehearsal corpus: word list and layout, determinism, resume, severities,
microphones, missing synthesizers, and CSVs the SA pipeline's reader takes.

The tests that synthesize speech need Debian's espeak-ng and festival with the voices of
hparams/rehearsal.yaml; they skip, saying so, where those are absent, and fail instead when
REQUIRE_SYNTHESIZERS=1 (set by .ci/run, which installs them).
"""

import json
import os
import shutil

import numpy as np
import pytest

from local import dysarthria, synthesizers
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


def need_debian_packages(*programs):
    """Skips (or, with REQUIRE_SYNTHESIZERS=1, fails) a test when a program or the word list is absent."""
    missing = [p for p in programs if shutil.which(p) is None]
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
