#!/usr/bin/env python3
"""A small corpus in the rehearsal corpus's layout, to develop and test the model stage without
the audio stage:

    <corpus>/audio/<SPK>/<UTT_ID>.wav     16 kHz mono PCM_16, UTT_ID = <SPK>_B<n>_<WORD-KEY>_M<k>
    <corpus>/csv/<SPK>_B1.csv, <SPK>_B2.csv, <SPK>_B3.csv, <SPK>.csv (= B3)
                                          SpeechBrain CSVs: ID,duration,wav,spk_id,wrd with
                                          wav = $data_root/audio/<SPK>/<ID>.wav
    <corpus>/corpus.json                  what made it

Two sources of speech:

- ``fixture`` (the tests): the four words that tests/fixtures/audio holds (espeak-ng, committed),
  so no synthesiser is needed; each speaker is a fixed speed/pitch shift of them (resampling),
  each production a small jitter of that;
- ``espeak`` (development): ``espeak-ng`` itself, one voice variant per speaker, the words of the
  real B3 metadata (``--metadata``), with a speaking rate and pitch jittered per production.

Blocks B1, B2, B3 hold the same digits, letters, commands and common words; the uncommon words
(UW) of B1 and B2 are others than B3's (as in UASpeech): here B3's uncommon words reversed
letter by letter (a word no model saw, still pronounceable by espeak-ng). Each production is
recorded on two "microphones": M5 (a little noise) and M6 (more noise, a short reverberation and
another gain), from the same production, so that they are correlated.

    python tests/helpers/mini_corpus.py OUT --source espeak --metadata DIR --speakers F02 M05 --words 40
"""

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

FIXTURE_AUDIO = Path(__file__).resolve().parents[1] / "fixtures" / "audio"
FIXTURE_WORDS = {"D3": "THREE", "LA": "ALPHA", "C1": "COMMAND", "CW7": "YOU"}
RATE = 16000
MICS = ("M5", "M6")
ALL_SPEAKERS = ("F02", "F03", "F04", "F05", "M01", "M04", "M05", "M07", "M08", "M09", "M10", "M11", "M12", "M14", "M16")
# espeak-ng voice variants, one per speaker (in ALL_SPEAKERS order).
VARIANTS = (
    "f1", "f2", "f3", "f4", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "klatt", "klatt2", "klatt3", "croak",
)  # fmt: skip


def _resample(wav, factor):
    """``wav`` played ``factor`` times faster (speed and pitch together), by linear interpolation."""
    n = max(int(round(len(wav) / factor)), 16)
    return np.interp(np.arange(n) * factor, np.arange(len(wav)), wav).astype(np.float32)


def _espeak(word, voice, rate, pitch):
    import soundfile

    try:
        out = subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", word.lower()],
            capture_output=True,
            check=True,
        ).stdout
    except FileNotFoundError:
        sys.exit("ERROR: espeak-ng is not installed (Debian package espeak-ng)")
    wav, sr = soundfile.read(io.BytesIO(out), dtype="float32")
    return _resample(wav, sr / RATE)


def _fixture(word):
    import soundfile

    wav, sr = soundfile.read(FIXTURE_AUDIO / f"{word}.wav", dtype="float32")
    assert sr == RATE
    return wav


def _mics(wav, gen):
    """The two microphones of one production: the same samples, other noise and channel."""
    peak = max(float(np.abs(wav).max()), 1e-4)
    clean = 0.5 * wav / peak
    m5 = clean + 0.003 * gen.standard_normal(len(clean))
    decay = np.exp(-np.arange(int(0.03 * RATE)) / (0.006 * RATE))
    m6 = 0.6 * np.convolve(clean, decay / decay.sum())[: len(clean)] + 0.02 * gen.standard_normal(len(clean))
    return {"M5": m5.astype(np.float32), "M6": m6.astype(np.float32)}


def block_words(b3_words):
    """{block: {key: word}}: B1 and B2 with their own uncommon words (B3's reversed)."""
    out = {"B3": dict(b3_words)}
    for block in ("B1", "B2"):
        words = {}
        for key, word in b3_words.items():
            if key.startswith("UW"):
                word = word[::-1] if block == "B1" else word[1:] + word[:1]
            words[key] = word
        out[block] = words
    return out


def read_metadata_words(folder, n_words, seed):
    """``n_words`` (key, word) of the real B3 metadata, every category represented, by seed."""
    table = {}
    for path in sorted(Path(folder).glob("*_metadata.json")):
        meta = json.loads(path.read_text(encoding="utf-8"))
        for utt_id, word in zip(meta["utterance_ids"], meta["target_words"]):
            table[utt_id.split("_")[2]] = word
    keys = sorted(table)
    gen = np.random.default_rng(seed)
    chosen = sorted(gen.choice(len(keys), size=min(n_words, len(keys)), replace=False))
    return {keys[i]: table[keys[i]] for i in chosen}


def make_corpus(out, speakers, words=None, source="fixture", seed=0):
    """Writes the corpus; ``words`` {key: word} of B3 (default: the fixture's four)."""
    import soundfile

    out = Path(out)
    words = dict(words or FIXTURE_WORDS)
    blocks = block_words(words)
    (out / "csv").mkdir(parents=True, exist_ok=True)
    for spk in speakers:
        index = ALL_SPEAKERS.index(spk)
        speed = 0.85 + 0.3 * index / (len(ALL_SPEAKERS) - 1)  # the speaker's voice
        (out / "audio" / spk).mkdir(parents=True, exist_ok=True)
        for block, table in blocks.items():
            rows = []
            for k, (key, word) in enumerate(sorted(table.items())):
                gen = np.random.default_rng([seed, index, int(block[1]), k])
                if source == "espeak":
                    voice = f"en-us+{VARIANTS[index]}"
                    wav = _espeak(word, voice, int(gen.integers(120, 190)), int(gen.integers(30, 70)))
                else:
                    base = word if word in FIXTURE_WORDS.values() else FIXTURE_WORDS[key]
                    wav = _resample(_fixture(base), speed * float(gen.uniform(0.93, 1.07)))
                for mic, signal in _mics(wav, gen).items():
                    utt = f"{spk}_{block}_{key}_{mic}"
                    soundfile.write(out / "audio" / spk / f"{utt}.wav", signal, RATE, subtype="PCM_16")
                    rows.append(f"{utt},{len(signal) / RATE:.4f},$data_root/audio/{spk}/{utt}.wav,{spk},{word}")
            text = "ID,duration,wav,spk_id,wrd\n" + "\n".join(rows) + "\n"
            (out / "csv" / f"{spk}_{block}.csv").write_text(text, encoding="utf-8")
            if block == "B3":
                (out / "csv" / f"{spk}.csv").write_text(text, encoding="utf-8")
    manifest = {"made_by": "tests/helpers/mini_corpus.py", "source": source, "seed": seed}
    manifest |= {"speakers": list(speakers), "blocks": blocks, "mics": list(MICS)}
    (out / "corpus.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--source", choices=("fixture", "espeak"), default="fixture")
    parser.add_argument("--metadata", help="folder of the real <SPK>_metadata.json files (espeak words)")
    parser.add_argument("--speakers", nargs="+", default=list(ALL_SPEAKERS))
    parser.add_argument("--words", type=int, default=40, help="how many B3 words (espeak)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    words = None
    if args.source == "espeak":
        if not args.metadata:
            parser.error("--source espeak needs --metadata")
        words = read_metadata_words(args.metadata, args.words, args.seed)
    make_corpus(args.out, args.speakers, words, args.source, args.seed)
    print(f"{args.out}: {len(args.speakers)} speakers, {len(words or FIXTURE_WORDS)} words per block")


if __name__ == "__main__":
    main()
