"""The audio of the rehearsal corpus: word list and layout, determinism, resume, severities,
microphones, missing synthesizers, and CSVs the SA pipeline's reader takes.

The tests that synthesize speech need Debian's espeak-ng and festival with the voices of
hparams/rehearsal.yaml; they skip, saying so, where those are absent, and fail instead when
REQUIRE_SYNTHESIZERS=1 (set by .ci/run, which installs them).
"""

import json
import os
import shutil

import pytest

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

from conftest import SHARED

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
