"""UASpeech facts the recipe relies on: speakers, intelligibility groups, microphones, word keys.

Utterance ids look like ``M05_B3_CW42_M6``: speaker, block, word key, microphone. The *core id*
(``B3_CW42_M6``) names the same word and microphone for every speaker, which is how streams of
different speakers are joined (never by position: each speaker's files are in duration order).
The *production* (``M05_B3_CW42``) is one spoken word of one speaker: the microphones of the array
recorded it at once, so its utterances are one sample, not seven. It is the unit of the validation
split and the cluster of every interval and test.
"""

import re

# Intelligibility (%) as commonly cited for the dysarthric speakers of UASpeech.
INTELLIGIBILITY = {
    "M04": 2.0,
    "F03": 6.0,
    "M12": 7.4,
    "M01": 15.0,
    "M07": 28.0,
    "F02": 29.0,
    "M16": 43.0,
    "M05": 58.0,
    "M11": 62.0,
    "F04": 62.0,
    "M09": 86.0,
    "M14": 90.4,
    "M10": 93.0,
    "M08": 93.0,
    "F05": 95.0,
}

# The intelligibility groups of the corpus. The seed project's table was wrong: it put F03, M04 and M12 in
# "high" and called M01 the only very-low speaker.
GROUPS = {
    "very_low": ("M04", "F03", "M12", "M01"),
    "low": ("M07", "F02", "M16"),
    "mid": ("M05", "M11", "F04"),
    "high": ("M09", "M14", "M10", "M08", "F05"),
}

# One held-out speaker per group.
HELD_OUT = {"high": "M08", "mid": "M05", "low": "M16", "very_low": "M01"}

SPEAKERS = tuple(sorted(INTELLIGIBILITY))

# Microphones (array channels) recorded per speaker in block B3 of the released corpus.
_ALL_MICS = ("M2", "M3", "M4", "M5", "M6", "M7", "M8")
MICS = {spk: _ALL_MICS for spk in SPEAKERS}
MICS.update(
    {
        "M11": _ALL_MICS[1:],
        "M12": _ALL_MICS[1:],
        "M16": _ALL_MICS[1:],
        "M04": ("M3", "M5", "M6", "M7", "M8"),
        "M01": ("M5", "M6", "M7"),
    }
)

WORD_CATEGORIES = ("D", "L", "C", "CW", "UW")

_UTT_RE = re.compile(r"^(?P<speaker>[FM]\d\d)_(?P<block>B\d)_(?P<word>[A-Z]+\d*)_(?P<mic>M\d)$")
_CATEGORY_RES = (
    ("CW", re.compile(r"^CW\d+$")),
    ("UW", re.compile(r"^UW\d+$")),
    ("D", re.compile(r"^D\d$")),
    ("L", re.compile(r"^L[A-Z]$")),
    ("C", re.compile(r"^C\d+$")),
)


def intelligibility_group(speaker):
    """Intelligibility group of a speaker (``very_low``, ``low``, ``mid``, ``high``)."""
    for group, members in GROUPS.items():
        if speaker in members:
            return group
    raise KeyError(f"{speaker} is not a UASpeech dysarthric speaker ({', '.join(SPEAKERS)})")


def parse_utterance_id(utt_id):
    """Splits ``SPK_B3_<WORD>_<MIC>`` into a dict; raises ValueError on anything else."""
    match = _UTT_RE.match(utt_id)
    if match is None:
        raise ValueError(f"utterance id {utt_id!r} is not of the form SPK_B3_<WORD>_<MIC>")
    return match.groupdict()


_MIC_SUFFIX = re.compile(r"_M\d+$")


def production_of(utt_id):
    """``M08_B3_CW95_M2`` -> ``M08_B3_CW95``: the spoken production an utterance records (its id
    without the microphone). An id without a ``_M<digits>`` suffix is its own production."""
    return _MIC_SUFFIX.sub("", str(utt_id))


def core_id(utt_id):
    """``M05_B3_CW42_M6`` -> ``B3_CW42_M6``: the same word and microphone for every speaker."""
    parts = parse_utterance_id(utt_id)
    return f"{parts['block']}_{parts['word']}_{parts['mic']}"


def word_key(utt_id):
    """``M05_B3_CW42_M6`` -> ``CW42``."""
    return parse_utterance_id(utt_id)["word"]


def word_category(key):
    """Word category of a word key: D (digits), L (letters), C (commands), CW, UW."""
    for category, pattern in _CATEGORY_RES:
        if pattern.match(key):
            return category
    raise ValueError(f"word key {key!r} is none of D0-D9, LA-LZ, C1-C19, CW1-CW100, UW1-UW100")
