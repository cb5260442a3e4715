"""The audio stage of the rehearsal corpus: SYNTHETIC speech shaped like UASpeech (not UASpeech).

``build_audio(corpus, preset=...)`` writes::

    <corpus>/audio/<SPK>/<SPK>_B<n>_<WORD-KEY>_M<k>.wav   # 16 kHz mono 16-bit PCM
    <corpus>/csv/<SPK>_B1.csv, <SPK>_B2.csv, <SPK>_B3.csv # SpeechBrain CSV: ID,duration,wav,spk_id,wrd
    <corpus>/csv/<SPK>.csv                                # = <SPK>_B3.csv, the test CSV
    <corpus>/corpus.json                                  # the manifest (what, how, how much)

with ``wav`` written as ``$data_root/audio/<SPK>/<ID>.wav`` (read with ``data_root=<corpus>``).
Each production (speaker, block, word) is the speaker's synthesizer voice saying the word, changed
by the speaker's dysarthria simulations (``local/dysarthria.py``, knobs in
``hparams/rehearsal.yaml``), then recorded by every microphone of the preset from that same
production.

Deterministic: every random draw is seeded by (seed, speaker, block, word, purpose), so a
production is the same bytes whichever process makes it, in whatever order, on a rerun or a
resumed run. Resumable: a recording is written under a temporary name and renamed, so a killed
build leaves whole files only; a rerun redoes the productions that lack a recording (or hold a
damaged one) and nothing else. A corpus folder holds one corpus: a rerun with other settings into
it stops before writing (``.audio_stage.json`` keeps the settings it was built with).
"""

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import resource
import signal as signals
import struct
import time
import wave
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from local import dysarthria, synthesizers
from local.corpus import GROUPS, INTELLIGIBILITY, MICS, SPEAKERS, intelligibility_group
from local.files import DiskFullError, atomic_write, is_disk_full, write_json
from local.word_list import BLOCKS, DICTIONARY, DICTIONARY_PACKAGE, WORD_KEYS, b3_words, block_words, utterance_id

RECIPE = Path(__file__).resolve().parents[1]
DEFAULT_HPARAMS = RECIPE / "hparams" / "rehearsal.yaml"
LABEL = (
    "SYNTHETIC speech (espeak-ng and festival voices with simulated dysarthria), shaped like UASpeech: "
    "NOT UASpeech recordings"
)
STAGE_FILE = ".audio_stage.json"
LOCK_FILE = ".lock"
MANIFEST = "corpus.json"
# Changes when the processing changes, so a corpus built by another version is not resumed.
AUDIO_VERSION = 1
CSV_HEADER = "ID,duration,wav,spk_id,wrd"
CHUNK = 128  # productions per work unit: a progress step, and one festival start


class RehearsalError(ValueError):
    """A bad preset, option or corpus folder: one line naming it."""


# ----------------------------------------------------------------------------- settings

TOP_KEYS = (
    "seed",
    "sample_rate",
    "presets",
    "voices",
    "profile_spread",
    "simulations",
    "level_dbfs",
    "padding_s",
    "microphones",
)
MIC_KEYS = ("rt60", "drr_db", "band_hz", "gain_db", "snr_db", "noise_tilt")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _knob(where, value):
    ok = _number(value) or (
        isinstance(value, dict) and set(value) == {"mild", "severe"} and all(_number(v) for v in value.values())
    )
    if not ok:
        raise RehearsalError(f"{where}: give a number or {{mild: a, severe: b}}, not {value!r}")


def load_settings(hparams_file=DEFAULT_HPARAMS, preset="full", seed=None):
    """The checked settings of one preset: every knob of the hparams file with ``speakers``,
    ``words`` and ``microphones`` resolved. Stops with one line naming the file and the key."""
    from hyperpyyaml import load_hyperpyyaml

    hparams_file = Path(hparams_file)
    where = f"hparams file {hparams_file}"
    try:
        with open(hparams_file, encoding="utf-8") as handle:
            doc = load_hyperpyyaml(handle)
    except OSError as err:
        raise RehearsalError(f"{where} is unreadable: {err.strerror}") from None
    except Exception as err:  # ruamel's and HyperPyYAML's many error types: one line naming the file
        raise RehearsalError(f"{where} is not valid HyperPyYAML: {str(err).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise RehearsalError(f"{where} holds no mapping of settings")
    unknown, missing = sorted(set(doc) - set(TOP_KEYS)), [k for k in TOP_KEYS if k not in doc]
    if unknown or missing:
        raise RehearsalError(f"{where}: unknown key(s) {unknown}, missing key(s) {missing}")
    s = dict(doc)
    if seed is not None:
        s["seed"] = seed
    if not isinstance(s["seed"], int) or isinstance(s["seed"], bool) or s["seed"] < 0:
        raise RehearsalError(f"{where}: seed must be an integer >= 0, not {s['seed']!r}")
    if s["sample_rate"] != 16000:
        raise RehearsalError(f"{where}: sample_rate must be 16000 (the SA models' rate), not {s['sample_rate']!r}")
    presets = s["presets"] if isinstance(s["presets"], dict) else {}
    if preset not in presets:
        raise RehearsalError(f"{where}: no preset {preset!r} (presets: {', '.join(presets) or 'none'})")
    p = presets[preset]
    if not isinstance(p, dict) or set(p) != {"speakers", "words", "microphones"}:
        raise RehearsalError(f"{where}: presets.{preset} must give exactly speakers, words and microphones")
    speakers = list(SPEAKERS) if p["speakers"] == "all" else p["speakers"]
    if not isinstance(speakers, list) or not speakers or len(set(speakers)) != len(speakers):
        raise RehearsalError(f"{where}: presets.{preset}.speakers must be `all` or a list of distinct speakers")
    bad = [spk for spk in speakers if spk not in SPEAKERS]
    if bad:
        raise RehearsalError(f"{where}: presets.{preset}.speakers: {bad} are not UASpeech speakers")
    words = list(WORD_KEYS) if p["words"] == "all" else p["words"]
    if not isinstance(words, list) or not words or len(set(words)) != len(words):
        raise RehearsalError(f"{where}: presets.{preset}.words must be `all` or a list of distinct word keys")
    bad = [k for k in words if k not in WORD_KEYS]
    if bad:
        raise RehearsalError(f"{where}: presets.{preset}.words: {bad} are not UASpeech word keys (D0-D9, LA-LZ, ...)")
    mics = p["microphones"]
    if not isinstance(mics, list) or len(mics) < 2 or len(set(mics)) != len(mics):
        raise RehearsalError(f"{where}: presets.{preset}.microphones must list at least two distinct microphones")
    for mic in mics:
        if mic not in (s["microphones"] or {}):
            raise RehearsalError(f"{where}: presets.{preset}.microphones: {mic} is not defined under microphones")
        lacking = [spk for spk in speakers if mic not in MICS[spk]]
        if lacking:
            raise RehearsalError(
                f"{where}: microphone {mic} was not recorded for {lacking} in UASpeech: use microphones every "
                f"speaker has (M5, M6, M7), so that streams join by block, word and microphone"
            )
        spec = s["microphones"][mic]
        if not isinstance(spec, dict) or set(spec) != set(MIC_KEYS):
            raise RehearsalError(f"{where}: microphones.{mic} must give exactly {', '.join(MIC_KEYS)}")
        band = spec["band_hz"]
        if not (isinstance(band, list) and len(band) == 2 and all(map(_number, band)) and 0 < band[0] < band[1]):
            raise RehearsalError(f"{where}: microphones.{mic}.band_hz must be [low, high] in Hz, low < high")
        for key in ("rt60", "drr_db", "gain_db", "snr_db", "noise_tilt"):
            if not _number(spec[key]):
                raise RehearsalError(f"{where}: microphones.{mic}.{key} must be a number, not {spec[key]!r}")
        if spec["rt60"] < 0 or spec["rt60"] > 2 or spec["gain_db"] > 12:
            raise RehearsalError(f"{where}: microphones.{mic}: rt60 must be 0-2 s and gain_db at most 12")
    voices = s["voices"] if isinstance(s["voices"], dict) else {}
    for spk in speakers:
        if spk not in voices:
            raise RehearsalError(f"{where}: voices: no voice for speaker {spk}")
        try:
            synthesizers.check_voice_spec(f"{spk}", voices[spk])
        except synthesizers.SynthesizerError as err:
            raise RehearsalError(f"{where}: {err}") from None
    sims = s["simulations"] if isinstance(s["simulations"], dict) else {}
    if set(sims) != set(dysarthria.SIMULATIONS):
        raise RehearsalError(f"{where}: simulations must be exactly {', '.join(dysarthria.SIMULATIONS)}")
    for name, knobs in dysarthria.SIMULATIONS.items():
        if not isinstance(sims[name], dict) or set(sims[name]) != set(knobs):
            raise RehearsalError(f"{where}: simulations.{name} must give exactly {', '.join(knobs)}")
        for knob in knobs:
            _knob(f"{where}: simulations.{name}.{knob}", sims[name][knob])
    if not _number(s["profile_spread"]) or not 0 <= s["profile_spread"] <= 1:
        raise RehearsalError(f"{where}: profile_spread must be a number 0-1")
    if not _number(s["level_dbfs"]) or not -40 <= s["level_dbfs"] <= -6:
        raise RehearsalError(f"{where}: level_dbfs must be a number from -40 to -6")
    pad = s["padding_s"]
    if not (isinstance(pad, list) and len(pad) == 2 and all(map(_number, pad)) and 0 <= pad[0] <= pad[1] <= 2):
        raise RehearsalError(f"{where}: padding_s must be [low, high] seconds, 0 <= low <= high <= 2")
    s["preset"] = preset
    s["hparams_file"] = hparams_file.name
    s["speakers"] = [spk for spk in SPEAKERS if spk in speakers]  # one order, whatever the file's
    s["words"] = [k for k in WORD_KEYS if k in words]
    s["microphones"] = {mic: s["microphones"][mic] for mic in mics}
    s["voices"] = {spk: voices[spk] for spk in s["speakers"]}
    del s["presets"]
    return s


# ----------------------------------------------------------------------------- speakers and seeds


def _seed(*parts):
    """A 64-bit seed from a stable hash of its parts (the same on every machine and process)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def severity(speaker):
    """1 - intelligibility / 100: M04 (2 %) 0.98 ... F05 (95 %) 0.05."""
    return round(1.0 - INTELLIGIBILITY[speaker] / 100.0, 4)


def speaker_severities(settings, speaker):
    """{simulation: severity} of a speaker: its severity through its fixed profile."""
    rng = np.random.default_rng(_seed(settings["seed"], "profile", speaker))
    base = severity(speaker)
    return {
        name: round(float(np.clip(base * np.exp(settings["profile_spread"] * rng.standard_normal()), 0.0, 1.0)), 4)
        for name in dysarthria.SIMULATIONS
    }


def speaker_plan(settings, speaker):
    """What the manifest records of a speaker, and what its productions are made with."""
    severities = speaker_severities(settings, speaker)
    values = dysarthria.speaker_values(settings["simulations"], severities)
    return {
        "group": intelligibility_group(speaker),
        "intelligibility": INTELLIGIBILITY[speaker],
        "severity": severity(speaker),
        "voice": settings["voices"][speaker],
        "simulation_severities": severities,
        "simulation_values": {n: {k: round(float(v), 6) for k, v in kv.items()} for n, kv in values.items()},
    }


# ----------------------------------------------------------------------------- files


def wav_path(corpus, utt_id):
    return Path(corpus) / "audio" / utt_id.split("_")[0] / f"{utt_id}.wav"


def wav_frames(path, rate=16000):
    """The number of samples of a recording this stage wrote, or None when it is absent or not
    whole (a 44-byte header of 16-bit mono PCM at ``rate`` and a data chunk of the file's size)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(44)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return None
    if len(header) < 44 or header[:4] != b"RIFF" or header[8:16] != b"WAVEfmt " or header[36:40] != b"data":
        return None
    channels, file_rate = struct.unpack("<HI", header[22:28])
    bits, data = struct.unpack("<H", header[34:36])[0], struct.unpack("<I", header[40:44])[0]
    if channels != 1 or file_rate != rate or bits != 16 or data != size - 44 or data == 0:
        return None
    return data // 2


def write_wav(path, pcm, rate):
    """A 16-bit mono WAV written under a temporary name and renamed: a killed process leaves no
    partial recording under its real name (no fsync: a corpus is rebuilt, not recovered, after a
    power cut; fsync of 20 000 files would cost minutes)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())
        os.replace(tmp, path)
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(path) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def read_wav(path):
    """A recording of the corpus as float64 in [-1, 1] (and its rate)."""
    with wave.open(str(path), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm.astype(np.float64) / 32768.0, w.getframerate()


def _remove_leftovers(folder):
    """Temporary files of a killed build (``.<name>.<pid>.tmp``): never whole, never kept."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the work


def _die_with_parent():
    """Worker processes end when the build is killed (Linux): no orphan keeps writing."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signals.SIGKILL)  # PR_SET_PDEATHSIG


def _todo(corpus, settings, speaker, block, keys):
    """The keys of ``keys`` whose productions lack a whole recording on some microphone."""
    rate, mics = settings["sample_rate"], settings["microphones"]
    return [
        k
        for k in keys
        if any(wav_frames(wav_path(corpus, utterance_id(speaker, block, k, m)), rate) is None for m in mics)
    ]


def make_production(settings, speaker, block, key, clean, values=None):
    """{microphone: float signal} of one production, from the clean synthesized word."""
    rate, seed = settings["sample_rate"], settings["seed"]
    values = values or speaker_plan(settings, speaker)["simulation_values"]

    def rngs(purpose):
        return np.random.default_rng(_seed(seed, speaker, block, key, purpose))

    vtl = settings["voices"][speaker].get("vtl", 1.0)
    production = dysarthria.simulate(
        clean, rate, values, vtl, rngs, settings["level_dbfs"], tuple(settings["padding_s"])
    )
    return {
        mic: dysarthria.microphone(production, rate, spec, rngs(f"microphone/{mic}"))
        for mic, spec in settings["microphones"].items()
    }


def build_unit(corpus, settings, speaker, block, keys, words):
    """Makes the productions of ``keys`` (speaker, block) that lack a recording; returns how many
    it made. ``words``: {key: word} of the block."""
    try:
        return _build_unit(Path(corpus), settings, speaker, block, keys, words)
    except DiskFullError as err:  # crosses the process boundary as a one-argument error
        raise RehearsalError(str(err)) from None


def _build_unit(corpus, settings, speaker, block, keys, words):
    folder = corpus / "audio" / speaker
    folder.mkdir(parents=True, exist_ok=True)
    todo = _todo(corpus, settings, speaker, block, keys)
    if not todo:
        return 0
    rate = settings["sample_rate"]
    unique = list(dict.fromkeys(words[k] for k in todo))
    clean = dict(zip(unique, synthesizers.synthesize(settings["voices"][speaker], unique, rate)))
    values = speaker_plan(settings, speaker)["simulation_values"]
    for key in todo:
        recordings = make_production(settings, speaker, block, key, clean[words[key]], values)
        for mic, x in recordings.items():
            write_wav(wav_path(corpus, utterance_id(speaker, block, key, mic)), dysarthria.to_pcm16(x), rate)
    return len(todo)


def _units(settings):
    for speaker in settings["speakers"]:
        for block in BLOCKS:
            keys = settings["words"]
            for start in range(0, len(keys), CHUNK):
                yield speaker, block, keys[start : start + CHUNK]


# ----------------------------------------------------------------------------- CSVs and manifest


def csv_text(corpus, settings, speaker, block, words):
    """The SpeechBrain CSV of one speaker's block (rows by word key, then microphone)."""
    rate = settings["sample_rate"]
    lines = [CSV_HEADER]
    for key in settings["words"]:
        for mic in settings["microphones"]:
            utt_id = utterance_id(speaker, block, key, mic)
            frames = wav_frames(wav_path(corpus, utt_id), rate)
            if frames is None:
                raise RehearsalError(f"speaker {speaker}: recording {wav_path(corpus, utt_id)} is missing or damaged")
            lines.append(f"{utt_id},{frames / rate:.5f},$data_root/audio/{speaker}/{utt_id}.wav,{speaker},{words[key]}")
    return "\n".join(lines) + "\n"


def _write_if_changed(path, text):
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write(path, lambda handle: handle.write(text))


def write_csvs(corpus, settings, blocks):
    for speaker in settings["speakers"]:
        for block in BLOCKS:
            text = csv_text(corpus, settings, speaker, block, blocks[block])
            _write_if_changed(Path(corpus) / "csv" / f"{speaker}_{block}.csv", text)
            if block == "B3":
                _write_if_changed(Path(corpus) / "csv" / f"{speaker}.csv", text)


def folder_bytes(corpus):
    """(bytes, bytes on disk, files) of the stage's recordings and CSVs."""
    total, disk, count = 0, 0, 0
    for sub in ("audio", "csv"):
        for root, _, names in os.walk(Path(corpus) / sub):
            for name in names:
                info = os.stat(os.path.join(root, name))
                total, disk, count = total + info.st_size, disk + info.st_blocks * 512, count + 1
    return total, disk, count


# ----------------------------------------------------------------------------- the stage


class CorpusLock:
    """Exclusive lock of ``<corpus>/.lock`` while a build writes into it; the kernel drops it when
    the process dies. (The recipe's OutputLock does the same but imports torch, which this stage,
    and its few seconds in CI, does without.) Re-entrant within one process: ``make_rehearsal.py``
    holds it for the whole command (every stage) and the audio stage takes it again."""

    _held = {}  # resolved lock path -> [handle, depth], of this process

    def __init__(self, corpus):
        self.path = Path(corpus) / LOCK_FILE
        self.handle = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in CorpusLock._held:
            CorpusLock._held[key][1] += 1
            self.handle = CorpusLock._held[key][0]
            return self
        self.handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            holder = " ".join(self.handle.read().split()) or "another process"
            self.handle.close()
            raise RehearsalError(f"corpus folder {self.path.parent} is in use by another build ({holder})") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}\n")
        self.handle.flush()
        CorpusLock._held[key] = [self.handle, 1]
        return self

    def __exit__(self, *exc):
        key = str(self.path.resolve())
        held = CorpusLock._held.get(key)
        if held is not None and held[0] is self.handle:
            held[1] -= 1
            if held[1] > 0:
                return
            del CorpusLock._held[key]
        self.handle.close()


def check_corpus_folder(corpus):
    corpus = Path(corpus)
    if corpus.exists() and not corpus.is_dir():
        raise RehearsalError(f"corpus folder {corpus} is a file, not a folder")
    probe = corpus
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise RehearsalError(f"corpus folder {corpus} is not writable ({probe})")


def _difference(old, new, where=""):
    """The first setting that differs between two stage records, as ``key old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                return _difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    return f"{where}: {json.dumps(old)[:60]} -> {json.dumps(new)[:60]}"


def _stage_record(settings, blocks, versions):
    record = {"audio_version": AUDIO_VERSION, "settings": settings, "synthesizers": versions, "words": blocks}
    record["fingerprint"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return record


def prepare(corpus, hparams_file=DEFAULT_HPARAMS, preset="full", seed=None, metadata_dir=None):
    """Everything checked before anything is written: settings, words, synthesizers and voices,
    the corpus folder (free, or holding this very corpus). Returns the build's plan."""
    settings = load_settings(hparams_file, preset, seed)
    check_corpus_folder(corpus)
    b3, source = b3_words(metadata_dir, settings["seed"])
    all_blocks, digest = block_words(b3, settings["seed"])
    blocks = {b: {k: all_blocks[b][k] for k in settings["words"]} for b in BLOCKS}
    versions = synthesizers.check_voices(settings["voices"])
    record = _stage_record(settings, blocks, versions)
    stage_file = Path(corpus) / STAGE_FILE
    if stage_file.is_file():
        try:
            old = json.loads(stage_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RehearsalError(f"corpus folder {corpus}: {stage_file.name} is unreadable ({err})") from None
        if old.get("fingerprint") != record["fingerprint"]:
            raise RehearsalError(
                f"corpus folder {corpus} holds a corpus of other settings ({_difference(old, record)}): "
                f"give another folder, or remove it"
            )
    elif Path(corpus).is_dir() and any(p.name != LOCK_FILE for p in Path(corpus).iterdir()):
        raise RehearsalError(f"corpus folder {corpus} is not empty and holds no rehearsal corpus: give another folder")
    words_info = {
        "b3_source": source,
        "b1_b2_uncommon_source": f"{DICTIONARY} (Debian package {DICTIONARY_PACKAGE}), drawn with the seed",
        "dictionary_sha256": digest,
        "blocks": blocks,
    }
    return {"settings": settings, "blocks": blocks, "record": record, "words": words_info, "synthesizers": versions}


def build_audio(
    corpus,
    hparams_file=DEFAULT_HPARAMS,
    preset="full",
    seed=None,
    metadata_dir=None,
    jobs=2,
    progress=True,
    log=print,
):
    """Builds (or finishes) the audio stage of a rehearsal corpus; returns its manifest."""
    from tqdm import tqdm

    if not isinstance(jobs, int) or jobs < 1:
        raise RehearsalError(f"jobs must be an integer >= 1, not {jobs!r}")
    started, cpu_started = time.monotonic(), _cpu_seconds()
    plan = prepare(corpus, hparams_file, preset, seed, metadata_dir)
    settings, blocks = plan["settings"], plan["blocks"]
    corpus = Path(corpus)
    log(f"rehearsal corpus ({LABEL}): preset {preset}, seed {settings['seed']}, into {corpus}")
    log(f"B3 words from {plan['words']['b3_source']}")
    with CorpusLock(corpus):
        write_json(corpus / STAGE_FILE, plan["record"])
        for speaker in settings["speakers"]:
            _remove_leftovers(corpus / "audio" / speaker)
        units = list(_units(settings))
        total = len(units) and sum(len(u[2]) for u in units)
        made = 0
        bar = tqdm(total=total, unit="production", desc="audio", disable=not progress, dynamic_ncols=True)
        try:
            if jobs == 1:
                for speaker, block, keys in units:
                    made += build_unit(corpus, settings, speaker, block, keys, blocks[block])
                    bar.update(len(keys))
            else:
                pool = ProcessPoolExecutor(max_workers=jobs, initializer=_die_with_parent)
                try:
                    futures = {
                        pool.submit(build_unit, corpus, settings, spk, block, keys, blocks[block]): len(keys)
                        for spk, block, keys in units
                    }
                    for future in as_completed(futures):
                        made += future.result()
                        bar.update(futures[future])
                finally:  # on an error, the units not started are dropped, not waited for
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            bar.close()
        write_csvs(corpus, settings, blocks)
        manifest = _manifest(corpus, plan)
        size, disk, files = folder_bytes(corpus)
        seconds, cpu = time.monotonic() - started, _cpu_seconds() - cpu_started
        before = manifest.get("stages", {}).get("audio", {})
        manifest["stages"] = {
            **manifest.get("stages", {}),
            "audio": {
                "seconds": round(seconds, 1),
                # a resumed or rerun stage: the sum over its runs (a rerun finding it done costs ~0)
                "seconds_all_runs": round(before.get("seconds_all_runs", before.get("seconds", 0)) + seconds, 1),
                "cpu_seconds": round(cpu, 1),  # this process, its workers and the synthesizers they ran
                "bytes": size,  # of the recordings and CSVs (the manifest is a few kB more)
                "disk_bytes": disk,
                "files": files,
                "jobs": jobs,
                "productions_made": made,
                "productions_found": total - made,
            },
        }
        write_json(corpus / MANIFEST, manifest)
    log(
        f"audio stage: {seconds:.1f} s ({cpu:.1f} s of CPU), {size / 1e6:.1f} MB ({disk / 1e6:.1f} MB on disk) "
        f"in {files} recordings and CSVs ({made} productions made, {total - made} found already made) -> {corpus}"
    )
    return manifest


def _cpu_seconds():
    """CPU time of this process and of its finished children (workers, synthesizers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _manifest(corpus, plan):
    settings = plan["settings"]
    mics = list(settings["microphones"])
    per_speaker = {}
    for speaker in settings["speakers"]:
        info = speaker_plan(settings, speaker)
        frames = [
            wav_frames(wav_path(corpus, utterance_id(speaker, b, k, m)))
            for b in BLOCKS
            for k in settings["words"]
            for m in mics
        ]
        info["recordings"] = len(frames)
        info["audio_seconds"] = round(sum(frames) / settings["sample_rate"], 2)
        per_speaker[speaker] = info
    old = {}
    path = Path(corpus) / MANIFEST
    if path.is_file():  # later stages add their own keys: keep them
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(path.read_text(encoding="utf-8"))
    productions = len(settings["speakers"]) * len(BLOCKS) * len(settings["words"])
    return {
        **old,
        "label": LABEL,
        "preset": settings["preset"],
        "hparams_file": settings["hparams_file"],
        "seed": settings["seed"],
        "sample_rate": settings["sample_rate"],
        "fingerprint": plan["record"]["fingerprint"],
        "synthesizers": plan["synthesizers"],
        "speakers": per_speaker,
        "groups": {g: [s for s in members if s in settings["speakers"]] for g, members in GROUPS.items()},
        "microphones": settings["microphones"],
        "simulations": settings["simulations"],
        "profile_spread": settings["profile_spread"],
        "level_dbfs": settings["level_dbfs"],
        "padding_s": settings["padding_s"],
        "words": plan["words"],
        "counts": {
            "speakers": len(settings["speakers"]),
            "word_keys": len(settings["words"]),
            "blocks": len(BLOCKS),
            "microphones": len(mics),
            "productions": productions,
            "recordings": productions * len(mics),
        },
        "layout": {
            "audio": "audio/<SPK>/<SPK>_B<n>_<WORD-KEY>_M<k>.wav (16 kHz mono 16-bit PCM)",
            "csv": "csv/<SPK>_B1.csv, csv/<SPK>_B2.csv, csv/<SPK>_B3.csv, csv/<SPK>.csv (= B3); "
            "wav as $data_root/audio/<SPK>/<ID>.wav",
        },
    }


# ----------------------------------------------------------------------------- listening proxies


def listen_report(corpus, keys=None, mic=None, log=print):
    """Per speaker: recordings, mean duration, mean active level, and the template recognizer's
    accuracy (``local/listen_proxy.py``) on the B3 words ``keys`` (default: digits and letters) of
    one microphone, against the speaker's clean synthesized words. Returns {speaker: row}."""
    from local.listen_proxy import durations_and_levels, template_accuracy

    corpus = Path(corpus)
    manifest = json.loads((corpus / MANIFEST).read_text(encoding="utf-8"))
    words = manifest["words"]["blocks"]["B3"]
    keys = [k for k in (keys or [k for k in WORD_KEYS if k[0] in "DL" and len(k) == 2]) if k in words]
    mic = mic or next(iter(manifest["microphones"]))
    rows = {}
    for speaker, info in manifest["speakers"].items():
        rate = manifest["sample_rate"]
        signals = [read_wav(p)[0] for p in sorted((corpus / "audio" / speaker).glob("*.wav"))]
        duration, level = durations_and_levels(signals, rate)
        texts = [words[k] for k in keys]
        clean = dict(zip(texts, synthesizers.synthesize(info["voice"], texts, rate)))
        recordings = {k: (words[k], read_wav(wav_path(corpus, utterance_id(speaker, "B3", k, mic)))[0]) for k in keys}
        accuracy, _ = template_accuracy(recordings, clean, rate)
        rows[speaker] = {
            "group": info["group"],
            "severity": info["severity"],
            "recordings": len(signals),
            "mean_duration_s": round(duration, 3),
            "mean_level_dbfs": round(level, 1),
            "template_accuracy": round(100.0 * accuracy, 1),
        }
    heads = ("severity", "recordings", "duration s", "level dBFS", "template %")
    log(f"{'speaker':8}{'group':10}" + "".join(f"{h:>11}" for h in heads))
    for group, members in GROUPS.items():
        for speaker in members:
            if speaker in rows:
                r = rows[speaker]
                log(
                    f"{speaker:8}{group:10}{r['severity']:11.2f}{r['recordings']:11d}{r['mean_duration_s']:11.3f}"
                    f"{r['mean_level_dbfs']:11.1f}{r['template_accuracy']:11.1f}"
                )
    log(f"template %: nearest clean word by DTW among {len(keys)} B3 words, microphone {mic}; not an ASR accuracy")
    return rows
