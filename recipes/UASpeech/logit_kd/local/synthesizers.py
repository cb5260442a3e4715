"""The speech synthesizers of the rehearsal corpus: Debian's ``espeak-ng`` and ``festival``.

A voice is ``{engine: espeak-ng, voice: en-us+m3, pitch: 50, speed: 150}`` (an espeak-ng voice,
``+variant`` optional, with its pitch 0-99 and speed in words per minute) or ``{engine: festival,
voice: kal_diphone}``. ``check_voices`` runs before anything is written: a missing program or
voice stops with one line naming the Debian package that brings it. ``synthesize`` turns words
into float signals at the corpus's rate: espeak-ng once per word (a few milliseconds each),
festival once per list of words (its start-up costs more than a word).
"""

import io
import os
import re
import shutil
import subprocess
import tempfile
import wave
from math import gcd
from pathlib import Path

import numpy as np
from scipy import signal

ENGINES = ("espeak-ng", "festival")
# Debian package of each program, and of each festival voice this corpus knows.
PROGRAM_PACKAGES = {"espeak-ng": "espeak-ng", "festival": "festival"}
ESPEAK_DATA_PACKAGE = "espeak-ng-data"
FESTIVAL_VOICE_PACKAGES = {
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
}
TIMEOUT_S = 300


class SynthesizerError(RuntimeError):
    """A synthesizer or voice that is missing or fails: one line, naming the package to install."""


def _program(engine):
    found = shutil.which(engine)
    if found is None:
        package = PROGRAM_PACKAGES[engine]
        raise SynthesizerError(f"{engine} is missing (not on PATH): apt-get install {package}")
    return found


def _run(command, what, **kwargs):
    try:
        proc = subprocess.run(command, capture_output=True, timeout=TIMEOUT_S, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SynthesizerError(f"{what}: {err}") from None
    return proc


def _last_line(data):
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def espeak_data_folder():
    """espeak-ng's data folder, as the program reports it (``Data at: ...``)."""
    proc = _run([_program("espeak-ng"), "--version"], "espeak-ng --version")
    match = re.search(r"Data at:\s*(\S+)", proc.stdout.decode("utf-8", "replace"))
    if proc.returncode != 0 or match is None:
        raise SynthesizerError(f"espeak-ng --version failed ({_last_line(proc.stderr)}): apt-get install espeak-ng")
    return Path(match.group(1))


def versions(engines):
    """{engine: its version line} for the manifest (and the corpus fingerprint)."""
    found = {}
    for engine in engines:
        proc = _run([_program(engine), "--version"], f"{engine} --version")
        found[engine] = proc.stdout.decode("utf-8", "replace").strip().splitlines()[0] if proc.stdout else ""
    return found


def festival_voices():
    """The voice names festival can load (``(voice.list)``)."""
    proc = _run([_program("festival"), "--pipe"], "festival (voice.list)", input=b"(print (voice.list))\n")
    text = proc.stdout.decode("utf-8", "replace")
    match = re.search(r"\(([^()]*)\)", text)
    if proc.returncode != 0 or match is None:
        raise SynthesizerError(f"festival lists no voices ({_last_line(proc.stderr)}): apt-get install festival")
    return set(match.group(1).split())


def check_voice_spec(name, spec):
    """Checks the form of one voice entry of the preset (before any program is run)."""
    if not isinstance(spec, dict) or spec.get("engine") not in ENGINES or not isinstance(spec.get("voice"), str):
        raise SynthesizerError(f"voices: {name}: give {{engine: espeak-ng|festival, voice: NAME, ...}}, not {spec!r}")
    extra = set(spec) - {"engine", "voice", "pitch", "speed", "vtl"}
    if extra:
        raise SynthesizerError(f"voices: {name}: unknown key(s) {sorted(extra)} (engine, voice, pitch, speed, vtl)")
    vtl = spec.get("vtl", 1.0)
    if isinstance(vtl, bool) or not isinstance(vtl, (int, float)) or not 0.8 <= vtl <= 1.25:
        raise SynthesizerError(f"voices: {name}: vtl (the vocal tract factor) must be a number 0.8-1.25, not {vtl!r}")
    if spec["engine"] == "festival":
        if spec["voice"] not in FESTIVAL_VOICE_PACKAGES:
            raise SynthesizerError(
                f"voices: {name}: festival voice {spec['voice']!r} is not one this corpus knows "
                f"({', '.join(FESTIVAL_VOICE_PACKAGES)})"
            )
        if spec.get("pitch") is not None or spec.get("speed") is not None:
            raise SynthesizerError(f"voices: {name}: pitch and speed are espeak-ng settings, not festival's")
    else:
        pitch, speed = spec.get("pitch", 50), spec.get("speed", 175)
        if not isinstance(pitch, int) or not 0 <= pitch <= 99:
            raise SynthesizerError(f"voices: {name}: pitch must be an integer 0-99, not {pitch!r}")
        if not isinstance(speed, int) or not 80 <= speed <= 450:
            raise SynthesizerError(f"voices: {name}: speed must be an integer 80-450 (words per minute), not {speed!r}")


def check_voices(specs):
    """Every program and voice of ``specs`` ({name: voice}) is installed; else one line naming the
    Debian package. Returns {engine: version} of the engines used."""
    for name, spec in specs.items():
        check_voice_spec(name, spec)
    engines = sorted({spec["engine"] for spec in specs.values()})
    for engine in engines:
        _program(engine)
    if "espeak-ng" in engines:
        data = espeak_data_folder()
        for spec in specs.values():
            if spec["engine"] != "espeak-ng":
                continue
            base, _, variant = spec["voice"].partition("+")
            # espeak-ng falls back to its default voice, silently, for an unknown variant: look for
            # the file; an unknown base voice makes it fail, which the test run below shows.
            if variant and not (data / "voices" / "!v" / variant).is_file():
                raise SynthesizerError(
                    f"espeak-ng voice variant {variant} (voice {spec['voice']}) is missing: "
                    f"apt-get install {ESPEAK_DATA_PACKAGE}"
                )
            proc = _run([_program("espeak-ng"), "-v", base, "-q", "a"], f"espeak-ng -v {base}")
            if proc.returncode != 0:
                why = _last_line(proc.stderr)
                raise SynthesizerError(
                    f"espeak-ng voice {base} is missing ({why}): apt-get install {ESPEAK_DATA_PACKAGE}"
                )
    if "festival" in engines:
        available = festival_voices()
        for spec in specs.values():
            if spec["engine"] == "festival" and spec["voice"] not in available:
                package = FESTIVAL_VOICE_PACKAGES[spec["voice"]]
                raise SynthesizerError(f"festival voice {spec['voice']} is missing: apt-get install {package}")
    return versions(engines)


def spoken_text(word):
    """What the synthesizer reads for a word of the list: lower case, hyphens as spaces."""
    return re.sub(r"[^a-z' ]+", " ", word.lower().replace("-", " ")).strip()


def read_wav_bytes(data, rate, what):
    """A mono 16-bit WAV (bytes) as float64 in [-1, 1], resampled to ``rate``."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getsampwidth() != 2:
                raise SynthesizerError(f"{what}: {8 * w.getsampwidth()}-bit audio, expected 16-bit")
            frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            source, channels = w.getframerate(), w.getnchannels()
    except (wave.Error, EOFError) as err:
        raise SynthesizerError(f"{what}: unreadable audio ({err})") from None
    x = frames.astype(np.float64).reshape(-1, channels).mean(axis=1) / 32768.0
    if x.size == 0:
        raise SynthesizerError(f"{what}: the synthesizer wrote no samples")
    if source != rate:
        g = gcd(rate, source)
        x = signal.resample_poly(x, rate // g, source // g)
    return x


def _espeak(spec, text, rate):
    command = [_program("espeak-ng"), "-v", spec["voice"], "-p", str(spec.get("pitch", 50))]
    command += ["-s", str(spec.get("speed", 175)), "--stdout", text]
    proc = _run(command, f"espeak-ng {spec['voice']}")
    if proc.returncode != 0 or not proc.stdout:
        raise SynthesizerError(f"espeak-ng {spec['voice']} failed on {text!r}: {_last_line(proc.stderr)}")
    return read_wav_bytes(proc.stdout, rate, f"espeak-ng {spec['voice']} on {text!r}")


def _festival(spec, texts, rate):
    voice = spec["voice"]
    with tempfile.TemporaryDirectory(prefix="rehearsal_festival_") as tmp:
        lines = [f"(voice_{voice})"]
        for i, text in enumerate(texts):
            out = os.path.join(tmp, f"{i}.wav")
            lines.append(f'(set! u (Utterance Text "{text}")) (utt.synth u) (utt.save.wave u "{out}" (quote riff))')
        script = Path(tmp) / "words.scm"
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        proc = _run([_program("festival"), "--batch", str(script)], f"festival {voice}")
        signals = []
        for i, text in enumerate(texts):
            wav = Path(tmp) / f"{i}.wav"
            if proc.returncode != 0 or not wav.is_file():
                raise SynthesizerError(f"festival {voice} failed on {text!r}: {_last_line(proc.stderr + proc.stdout)}")
            signals.append(read_wav_bytes(wav.read_bytes(), rate, f"festival {voice} on {text!r}"))
    return signals


def synthesize(spec, words, rate):
    """The clean synthesized ``words`` (list) in the voice ``spec``: float64 signals at ``rate``."""
    texts = [spoken_text(w) for w in words]
    for word, text in zip(words, texts):
        if not text:
            raise SynthesizerError(f"the word {word!r} has nothing a synthesizer can read")
    if spec["engine"] == "festival":
        return _festival(spec, texts, rate) if texts else []
    return [_espeak(spec, text, rate) for text in texts]
