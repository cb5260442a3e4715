"""The word list and layout of the rehearsal corpus: UASpeech's words, blocks and utterance ids.

UASpeech records each speaker on three blocks, B1, B2 and B3. Every block holds the same 155
words (digits D0-D9, radio-alphabet letters LA-LZ, computer commands C1-C19, common words
CW1-CW100) and 100 uncommon words UW1-UW100 of its own (300 in all). Utterance ids are
``<SPK>_B<n>_<WORD-KEY>_M<k>``; the microphones of one production share its id but for ``M<k>``.

The B3 words are read from the real metadata files of the SA extraction (``<SPK>_metadata.json``,
``target_words`` by utterance id): every one of the 255 word keys and its word, as the recipe
reads them. The real B1 and B2 uncommon words are not in those files: they are drawn,
deterministically from the seed, from the word list of Debian's ``wamerican`` package
(``/usr/share/dict/american-english``): upper case, 4 to 12 letters, distinct from each other
and from the 255 B3 words. Each uncommon key gets its B1 and B2 word whatever subset of keys a
corpus uses (the tiny preset's ``B1_UW3`` is the full preset's). The dictionary's SHA-256 goes into
the corpus manifest: another version of the package gives other words.

Without real metadata (``metadata_dir`` None: a clone without the SA artefacts) the B3 list is
the demo tree's (``synthetic.word_list``: the UASpeech digits and letters, commands, common words
and pseudo-words as uncommon words of its own), limited to the 255 UASpeech keys, and the source
says so.
"""

import hashlib
import json
import re
from pathlib import Path

from local.corpus import parse_utterance_id

BLOCKS = ("B1", "B2", "B3")
DICTIONARY = Path("/usr/share/dict/american-english")
DICTIONARY_PACKAGE = "wamerican"
_DICTIONARY_WORD = re.compile(r"^[A-Za-z]{4,12}$")

# The 255 word keys of a UASpeech block, in the corpus's order.
WORD_KEYS = (
    tuple(f"D{i}" for i in range(10))
    + tuple(f"L{chr(ord('A') + i)}" for i in range(26))
    + tuple(f"C{i}" for i in range(1, 20))
    + tuple(f"CW{i}" for i in range(1, 101))
    + tuple(f"UW{i}" for i in range(1, 101))
)
UNCOMMON_KEYS = tuple(k for k in WORD_KEYS if k.startswith("UW"))


class WordListError(ValueError):
    """A word list that cannot be built: the message names the file or the package."""


def b3_words(metadata_dir=None, seed=2026):
    """({word key: word} of block B3 in ``WORD_KEYS`` order, a sentence naming the source)."""
    if metadata_dir is None:
        from local.synthetic import word_list

        demo = word_list("full", seed)
        return {k: demo[k] for k in WORD_KEYS}, "the demo tree's word list (no real metadata given)"
    folder = Path(metadata_dir)
    if not folder.is_dir():
        raise WordListError(f"metadata folder {folder} does not exist")
    files = sorted(folder.glob("*_metadata.json"))
    if not files:
        raise WordListError(f"metadata folder {folder} holds no <SPK>_metadata.json file")
    table = {}
    for path in files:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            ids, words = list(meta["utterance_ids"]), list(meta["target_words"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WordListError(f"metadata file {path} is unreadable: {err!r}") from None
        if len(ids) != len(words):
            raise WordListError(f"metadata file {path}: {len(ids)} utterance_ids but {len(words)} target_words")
        for utt_id, word in zip(ids, words):
            try:
                parts = parse_utterance_id(str(utt_id))
            except ValueError as err:
                raise WordListError(f"metadata file {path}: {err}") from None
            key = parts["word"]
            if parts["block"] != "B3" or key not in WORD_KEYS:
                raise WordListError(f"metadata file {path}, utterance {utt_id}: not a B3 word key of UASpeech")
            if not isinstance(word, str) or not word.strip() or word != word.upper():
                raise WordListError(f"metadata file {path}, utterance {utt_id}: target word {word!r} is not upper case")
            if table.setdefault(key, word) != word:
                where = f"metadata file {path}, utterance {utt_id}"
                raise WordListError(f"{where}: word key {key} is {word!r} here, {table[key]!r} elsewhere")
    missing = [k for k in WORD_KEYS if k not in table]
    if missing:
        first = ", ".join(missing[:5])
        raise WordListError(f"metadata folder {folder}: {len(missing)} word keys have no utterance ({first} ...)")
    return {k: table[k] for k in WORD_KEYS}, f"the real metadata files ({len(files)} speakers)"


def dictionary_words(path=DICTIONARY):
    """(words, sha256) of the system word list; WordListError naming the Debian package if absent."""
    path = Path(path)
    if not path.is_file():
        raise WordListError(
            f"the word list {path} is missing: apt-get install {DICTIONARY_PACKAGE} "
            f"(it gives the uncommon words of blocks B1 and B2)"
        )
    data = path.read_bytes()
    words = sorted({w.upper() for w in data.decode("utf-8", "replace").split() if _DICTIONARY_WORD.match(w)})
    return words, hashlib.sha256(data).hexdigest()


def block_words(b3, seed, dictionary=DICTIONARY):
    """({block: {word key: word}} for the 255 keys, dictionary sha256). B1 and B2 share B3's
    digits, letters, commands and common words; their uncommon words are drawn from the
    dictionary (see the module docstring)."""
    words, digest = dictionary_words(dictionary)
    taken = set(b3.values())

    def rank(word):  # a seeded order of the dictionary that does not depend on the keys used
        return hashlib.sha256(f"{seed}/uncommon/{word}".encode()).hexdigest()

    drawn = [w for w in sorted(words, key=rank) if w not in taken][: 2 * len(UNCOMMON_KEYS)]
    if len(drawn) < 2 * len(UNCOMMON_KEYS):
        raise WordListError(f"the word list {dictionary} has too few words for {2 * len(UNCOMMON_KEYS)} uncommon words")
    blocks = {}
    for b, block in enumerate(("B1", "B2")):
        uncommon = dict(zip(UNCOMMON_KEYS, drawn[b * len(UNCOMMON_KEYS) : (b + 1) * len(UNCOMMON_KEYS)]))
        blocks[block] = {k: uncommon.get(k, b3[k]) for k in WORD_KEYS}
    blocks["B3"] = {k: b3[k] for k in WORD_KEYS}
    return blocks, digest


def utterance_id(speaker, block, key, mic):
    """``M05``, ``B3``, ``CW42``, ``M6`` -> ``M05_B3_CW42_M6`` (checked)."""
    utt_id = f"{speaker}_{block}_{key}_{mic}"
    parse_utterance_id(utt_id)
    return utt_id
