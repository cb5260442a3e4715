"""The rehearsal corpus's model stage: an LM, a speaker-independent (SI) ASR model and one
speaker-adapted (SA) copy per speaker, written as SA experiment folders.

The protocol is the SA pipeline's:

1. ``LM``: a TransformerLM on the word list's text (every word of every block, one a sentence);
   ``LM/lm.ckpt`` (its state dict) and ``LM/tokenizer.ckpt`` (the SA tokenizer) are what each
   ASR experiment's Pretrainer collects into its ``save/``, as the SA pipeline's Pretrainer
   collected SpeechBrain's LibriSpeech LM and tokenizer.
2. ``SI``: a TransformerASR trained from scratch on every speaker's B1 and B2 (no held-out
   speaker: the corpus's SA models all start from it); it keeps its latest epoch.
3. ``<SPK>``: the SI model fine-tuned on the speaker's B1; each epoch is decoded free-running on
   the speaker's B2 and the checkpoint with the highest WRA is kept (the SA protocol); B3 is
   left for testing, decoded once at the end (greedy) for the stage's report.

Each model folder is an SA experiment folder in the SA pipeline's layout::

    <models>/<NAME>/hyperparams.yaml      # rehearsal_asr.yaml with the stage's overrides, as
                                          # SpeechBrain writes it (resolve_references)
    <models>/<NAME>/save/CKPT+<time>/     # model.ckpt (ModuleList CNN, Transformer, seq_lin,
                                          # ctc_lin), normalizer.ckpt, noam_scheduler.ckpt,
                                          # counter.ckpt, CKPT.yaml (ACC, WER, WRA, epoch), ...
    <models>/<NAME>/save/lm.ckpt          # symlinks left by the Pretrainer (made relative, so
    <models>/<NAME>/save/tokenizer.ckpt   # that the folder can move), to ../../LM/*.ckpt
    <models>/<NAME>/train_log.txt, log.txt, wer_<SPK>_B3_greedy.txt, rehearsal_model.json

``extract_logits.py --models NAME=<models>/NAME/hyperparams.yaml:<models>/NAME/save`` and
``decode.py`` load them as they load the user's SA models. ``rehearsal_model.json`` (written when
the model is finished: its settings' fingerprint, times, sizes, WRA, and the size and sha256 of
each file of its checkpoint) makes a rerun skip it, once its files are checked against it (a
damaged finished model stops the run before anything is written); a model killed before it
resumes from its SpeechBrain checkpoints (the summary table marks its times, of its last run only).
``<models>/rehearsal_models.json`` holds the stage's configuration (a folder of another
configuration is refused) and every model's figures.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from local.corpus import SPEAKERS, parse_utterance_id
from local.files import write_json

HPARAMS = Path(__file__).resolve().parents[1] / "hparams"
ASR_HPARAMS = HPARAMS / "rehearsal_asr.yaml"
LM_HPARAMS = HPARAMS / "rehearsal_lm.yaml"
PRESETS_FILE = HPARAMS / "rehearsal_presets.yaml"
BLOCKS = ("B1", "B2", "B3")
MANIFEST = "rehearsal_models.json"
DONE = "rehearsal_model.json"
LM_NAME, SI_NAME = "LM", "SI"
CROSS_FOLDER = "greedy_B3"

logger = logging.getLogger(__name__)


# One error type for every stage of the rehearsal corpus, so make_rehearsal.py reports them alike.
from local.rehearsal_audio import RehearsalError  # noqa: E402

# --------------------------------------------------------------------------------------------
# Options and corpus
# --------------------------------------------------------------------------------------------


def read_presets():
    import ruamel.yaml

    return ruamel.yaml.YAML(typ="safe").load(PRESETS_FILE.read_text(encoding="utf-8"))


@dataclass
class Corpus:
    folder: Path
    speakers: list
    csvs: dict  # speaker -> block -> CSV path
    counts: dict = field(default_factory=dict)  # speaker -> block -> utterances
    words: list = field(default_factory=list)  # every word of every block
    unk_words: list = field(default_factory=list)  # words with an <unk> piece
    check_seconds: float = 0.0  # reading and checking every CSV and audio header


def read_corpus(folder, speakers=None):
    """The corpus's speakers and CSVs, every file checked before anything is trained: the CSVs of
    B1, B2 and B3 of each speaker, their columns, ids (speaker and block), upper-case words, and
    audio files (present, 16 kHz mono)."""
    import soundfile

    from local.sa_models import ExtractionError, check_audio, read_speaker_csv

    folder = Path(folder)
    if not (folder / "csv").is_dir():
        raise RehearsalError(f"--corpus {folder}: no csv/ folder (not a rehearsal corpus)")
    if speakers is None:
        speakers = [s for s in SPEAKERS if (folder / "csv" / f"{s}_B1.csv").is_file()]
        if not speakers:
            raise RehearsalError(f"--corpus {folder}: csv/ holds no <SPK>_B1.csv of a UASpeech speaker")
    repeated = sorted({s for s in speakers if list(speakers).count(s) > 1})
    if repeated:
        raise RehearsalError(f"--speakers: {' '.join(repeated)} given more than once")
    corpus = Corpus(folder, list(speakers), {})
    words = set()
    for spk in speakers:
        if spk not in SPEAKERS:
            raise RehearsalError(f"--speakers: {spk} is not a UASpeech dysarthric speaker ({', '.join(SPEAKERS)})")
        corpus.csvs[spk], corpus.counts[spk] = {}, {}
        for block in BLOCKS:
            csv = folder / "csv" / f"{spk}_{block}.csv"
            if not csv.is_file():
                raise RehearsalError(f"speaker {spk}: {csv} does not exist")
            try:
                utts = read_speaker_csv(csv, spk, folder)
            except ExtractionError as err:
                raise RehearsalError(str(err)) from None
            for utt in utts:
                if parse_utterance_id(utt.id)["block"] != block:
                    raise RehearsalError(f"speaker {spk}: CSV {csv}, utterance {utt.id}: not of block {block}")
                if not Path(utt.wav).is_file():
                    raise RehearsalError(f"speaker {spk}: CSV {csv}, utterance {utt.id}: {utt.wav} does not exist")
                try:
                    info = soundfile.info(utt.wav)
                except RuntimeError as err:
                    raise RehearsalError(
                        f"speaker {spk}, utterance {utt.id}: unreadable audio {utt.wav}: {err}"
                    ) from None
                if info.samplerate != 16000 or info.channels != 1:
                    raise RehearsalError(
                        f"speaker {spk}, utterance {utt.id}: {utt.wav} is {info.samplerate} Hz, "
                        f"{info.channels} channel(s); the models read 16 kHz mono"
                    )
                words.add(utt.word)
            try:  # truncated recordings, and lengths that disagree with the CSV's durations
                check_audio(utts)
            except ExtractionError as err:
                raise RehearsalError(f"speaker {spk}: CSV {csv}, {err}") from None
            corpus.csvs[spk][block] = csv
            corpus.counts[spk][block] = len(utts)
    corpus.words = sorted(words)
    return corpus


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _diff(old, new, where=""):
    """The first key path (in ``new``'s key order) at which two JSON-like values differ, with
    both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in old if k not in new)]:
            path = f"{where}.{key}" if where else key
            if key not in old or key not in new:
                return f"{path} only in {'the new' if key in new else 'the existing'} one"
            found = _diff(old[key], new[key], path)
            if found is not None:
                return found
        return None
    return f"{where} ({old!r} -> {new!r})" if old != new else None


@dataclass
class Plan:
    """What the stage trains, with the settings that make each model what it is."""

    corpus: Corpus
    models_dir: Path
    tokenizer_file: Path
    vocab_size: int
    preset: str
    seed: int
    overrides: dict  # lm / si / sa -> hparams overrides (architecture and training)
    config: dict  # the fingerprint of the whole stage
    finished: dict = field(default_factory=dict)  # model -> its rehearsal_model.json, files verified


def _yaml_keys(path):
    return set(_yaml_values(path))


def _yaml_values(path):
    """The top-level values of an hparams file, as written (tags such as ``!ref`` or
    ``!PLACEHOLDER`` kept as ruamel objects)."""
    import ruamel.yaml

    with open(path, encoding="utf-8") as handle:
        return dict(ruamel.yaml.YAML().load(handle))


# Keys whose value the stage sets itself: an override of them would be silently replaced.
STAGE_SET = {"seed": "give --seed", "output_neurons": "the stage sets it to the tokenizer's pieces"}
# Knobs with a range of their own (the others: the rule of their preset value, see check_override).
KNOB_RANGES = {
    "label_smoothing": (0.0, 1.0, "a number in [0, 1)"),
    "transformer_dropout": (0.0, 1.0, "a number in [0, 1)"),
    "ctc_weight": (0.0, 1.0, "a number in [0, 1]"),
    "ctc_weight_decode": (0.0, 1.0, "a number in [0, 1]"),
    "lm_weight": (0.0, None, "a non-negative number"),
    "ckpt_interval_minutes": (0.0, None, "a non-negative number (0: no intra-epoch checkpoints)"),
}
KNOB_CHOICES = {
    "sorting": ("random", "ascending", "descending"),
    "batch_ordering": ("random", "ascending", "descending"),
    "precision": ("fp32", "fp16", "bf16"),
}


def _plain(value):
    return value is None or isinstance(value, (bool, int, float, str)) and not hasattr(value, "tag")


def check_override(name, key, value, base):
    """Checks one override value against the value it replaces (``base``: the preset's, else the
    hparams file's): the same type (an int for an int; an int or a float for a float; a bool for a
    bool; a string for a string), finite, positive where ``base`` is positive and non-negative
    where it is 0, or the knob's own range (KNOB_RANGES, KNOB_CHOICES). Keys the stage sets and
    values that are not plain scalars in the yaml (references, objects, mappings) are refused."""
    import math

    def refuse(why):
        raise RehearsalError(f"--overrides: {name}={value!r} is not allowed: {why}")

    if key in STAGE_SET:
        refuse(STAGE_SET[key])
    if not _plain(base):
        refuse("not a plain value of the hparams file (a reference, an object or a value the stage sets)")
    if key in KNOB_CHOICES:
        if value not in KNOB_CHOICES[key]:
            refuse(f"one of {', '.join(KNOB_CHOICES[key])}")
        return
    if isinstance(base, bool):
        if not isinstance(value, bool):
            refuse(f"true or false (the preset's: {base})")
    elif isinstance(base, (int, float)):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(base, int) and not is_int:
            refuse(f"an integer (the preset's: {base})")
        if not is_int and not (isinstance(value, float) and math.isfinite(value)):
            refuse(f"a finite number (the preset's: {base})")
        if key in KNOB_RANGES:
            low, high, what = KNOB_RANGES[key]
            open_high = "[0, 1)" in what
            if value < low or high is not None and (value >= high if open_high else value > high):
                refuse(what)
        elif base > 0 and value <= 0:
            refuse(f"a positive {'integer' if isinstance(base, int) else 'number'} (the preset's: {base})")
        elif base == 0 and value < 0:
            refuse(f"a non-negative {'integer' if isinstance(base, int) else 'number'} (the preset's: {base})")
    elif isinstance(base, str):
        if not isinstance(value, str) or not value:
            refuse(f"a string (the preset's: {base!r})")
    elif base is None and not (value is None or isinstance(value, str)):
        refuse("null or a string")


def merge_overrides(preset, extra):
    """The preset's overrides with ``extra`` ({asr|si|sa|lm: {key: value}}) on top, every key
    checked against the hparams file it overrides and every value of ``extra`` against the value
    it replaces (check_override); the model sizes checked together (d_model a multiple of nhead)."""
    yaml_values = {"asr": _yaml_values(ASR_HPARAMS), "lm": _yaml_values(LM_HPARAMS)}
    known = {part: set(yaml_values["lm" if part == "lm" else "asr"]) for part in ("asr", "si", "sa", "lm")}
    if not isinstance(extra, dict) or set(extra) - set(known):
        raise RehearsalError(f"--overrides={extra!r} is not allowed: a mapping of {', '.join(known)} to mappings")
    preset_parts = {part: dict(preset.get(part) or {}) for part in known}
    merged = {part: dict(values) for part, values in preset_parts.items()}

    def chain(parts, part):
        """The values a part's model sees, in order of precedence (the asr part under si and sa)."""
        base = yaml_values["lm" if part == "lm" else "asr"]
        layers = [parts[part]] + ([parts["asr"]] if part in ("si", "sa") else []) + [base]
        return lambda key: next(layer[key] for layer in layers if key in layer)

    for part, values in extra.items():
        if not isinstance(values, dict):
            raise RehearsalError(f"--overrides: {part} must map hparams keys to values, not {values!r}")
        merged[part].update(values)
    for part, values in merged.items():
        unknown = sorted(set(values) - known[part] - {"seed"})
        if unknown:
            target = LM_HPARAMS if part == "lm" else ASR_HPARAMS
            raise RehearsalError(f"--overrides: {part}.{unknown[0]} is not a key of {target.name}")
    for part, values in extra.items():
        base = chain(preset_parts, part)
        for key, value in values.items():
            check_override(f"{part}.{key}", key, value, base(key))
    for part in ("si", "sa", "lm"):
        value = chain(merged, part)
        if value("d_model") % value("nhead"):
            raise RehearsalError(
                f"--overrides: {part}: d_model={value('d_model')} is not a multiple of nhead={value('nhead')}"
            )
    return merged


def make_plan(
    corpus_dir, models_dir, tokenizer_file, preset="full", speakers=None, seed=None, overrides=None, cross=None
):
    """Checks every option and input (``cross``: speakers of the corpus that ``--cross`` decodes),
    and the files of every finished model of ``models_dir``, and returns the plan; nothing is
    written."""
    from local.store import LogitStoreError, load_tokenizer

    presets = read_presets()
    if preset not in presets:
        raise RehearsalError(f"--preset={preset} is not allowed: one of {', '.join(presets)}")
    parts = merge_overrides(presets[preset], overrides or {})
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise RehearsalError(f"--seed={seed} is not allowed: a non-negative integer")
    try:
        tokenizer = load_tokenizer(tokenizer_file)
    except LogitStoreError as err:
        raise RehearsalError(str(err)) from None
    tick = time.time()
    corpus = read_corpus(corpus_dir, speakers)
    corpus.check_seconds = round(time.time() - tick, 1)
    missing = [s for s in cross or () if s not in corpus.speakers]
    if missing:
        raise RehearsalError(f"--cross {' '.join(missing)}: no such speaker in the corpus")
    # Words the tokenizer cannot spell whole (the SA tokenizer has no "-": X-RAY, ROLY-POLY,
    # THIRTY-FIVE of UASpeech's B3) keep their <unk> piece, as in the SA pipeline's training.
    corpus.unk_words = [w for w in corpus.words if tokenizer.unk_id() in tokenizer.encode_as_ids(w)]
    seed = int(seed if seed is not None else presets[preset].get("seed", 1986))
    vocab = tokenizer.vocab_size()
    lm = {**parts["lm"], "seed": seed, "output_neurons": vocab}
    lm_arch = {k: lm[k] for k in ("d_model", "nhead", "num_encoder_layers", "d_ffn") if k in lm}
    lm_arch = {**_lm_architecture(), **lm_arch}
    asr = {**parts["asr"], "seed": seed, "output_neurons": vocab}
    asr.update({f"lm_{k}": v for k, v in lm_arch.items()})
    overrides = {"lm": lm, "si": {**asr, **parts["si"]}, "sa": {**asr, **parts["sa"]}}
    config = {
        "preset": preset,
        "seed": seed,
        "speakers": corpus.speakers,
        "tokenizer_sha256": _sha256(tokenizer_file),
        "csv_sha256": {f"{s}_{b}": _sha256(corpus.csvs[s][b]) for s in corpus.speakers for b in BLOCKS},
        "hparams": {p.name: _sha256(p) for p in (ASR_HPARAMS, LM_HPARAMS)},
        "overrides": overrides,
    }
    plan = Plan(corpus, Path(models_dir), Path(tokenizer_file), vocab, preset, seed, overrides, config)
    check_models_dir(plan)
    for name, stage in ((LM_NAME, "lm"), (SI_NAME, "si"), *((s, "sa") for s in corpus.speakers)):
        record = _record_matches(plan.models_dir / name, _fingerprint(plan, stage, name))
        if record is not None:
            plan.finished[name] = record
    return plan


def _lm_architecture():
    """The LM sizes of rehearsal_lm.yaml (read without building anything)."""
    import ruamel.yaml

    with open(LM_HPARAMS, encoding="utf-8") as handle:
        doc = ruamel.yaml.YAML().load(handle)
    return {k: doc[k] for k in ("d_model", "nhead", "num_encoder_layers", "d_ffn")}


def check_models_dir(plan):
    """A models folder is this stage's, of the same configuration, or new (or empty)."""
    folder = plan.models_dir
    if folder.exists() and not folder.is_dir():
        raise RehearsalError(f"--models_dir {folder} is a file")
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError) as err:
            raise RehearsalError(f"{manifest} is unreadable ({err}): not overwritten") from None
        where = _diff(old, plan.config)
        if where is not None:
            raise RehearsalError(
                f"--models_dir {folder} holds models of another configuration ({where}): "
                f"give another --models_dir (nothing there is overwritten)"
            )
    elif folder.is_dir() and any(folder.iterdir()):
        raise RehearsalError(f"--models_dir {folder} is not empty and has no {MANIFEST}: not this stage's folder")


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _mb(nbytes):
    return f"{nbytes / 1e6:.1f} MB"


def _took(record):
    """Wall and CPU seconds (CPU: every thread's; on cores shared with others, the cost)."""
    return f"{record['seconds']:.1f} s (CPU {record['cpu_seconds']:.1f} s)"


def _record_matches(folder, fingerprint):
    """The finished model's record (its ``rehearsal_model.json``) when it is of these settings,
    its files checked against the sizes and checksums it recorded (RehearsalError naming the
    first file that differs); None when the model is not finished (or its record unreadable)."""
    done = folder / DONE
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    files = record.get("files") or {}
    if not isinstance(files, dict) or not all(
        isinstance(w, dict) and isinstance(w.get("bytes"), int) and isinstance(w.get("sha256"), str)
        for w in files.values()
    ):
        raise RehearsalError(
            f"{done}: its files' sizes and checksums are unreadable; delete {folder} to train it again"
        )
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != want["bytes"]:
            problem = f"is {path.stat().st_size} bytes, {want['bytes']} when the model finished"
        elif _sha256(path) != want["sha256"]:
            problem = "differs from the file the model finished with (sha256)"
        else:
            continue
        raise RehearsalError(
            f"{folder.name}: {path} {problem}: the finished model is damaged; "
            f"delete {folder} to train it again (nothing was written)"
        )
    return record


def _files_record(folder, paths):
    """Size and sha256 of each file (paths relative to the model folder): what identifies a
    finished model's checkpoint, checked before a rerun skips it."""
    files = {}
    for path in sorted(paths):
        rel = Path(path).relative_to(folder).as_posix()
        files[rel] = {"bytes": Path(path).stat().st_size, "sha256": _sha256(path)}
    return files


def _fingerprint(plan, stage, speaker):
    return hashlib.sha256(json.dumps([plan.config, stage, speaker], sort_keys=True).encode()).hexdigest()


class _ModelLog:
    """The model folder's ``log.txt`` (SpeechBrain's experiment log) while the model trains.

    SpeechBrain's ``create_experiment_directory`` sets the whole process's logging (and its
    exception hook) for one experiment per process; this stage trains many in one process, so it
    writes each model's hyperparams.yaml itself and attaches one file handler at a time."""

    def __init__(self, folder):
        self.path = Path(folder) / "log.txt"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
        root = logging.getLogger()
        self.level = root.level
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.level)
        self.handler.close()


def write_hparams(source, overrides, dest):
    """``dest``: ``source`` with ``overrides`` applied and references resolved, as SpeechBrain's
    ``create_experiment_directory`` writes an experiment's hyperparams.yaml."""
    from hyperpyyaml import resolve_references

    from local.files import atomic_write

    with open(source, encoding="utf-8") as handle:
        resolved = resolve_references(handle, overrides)
    text = f"# Generated {time.strftime('%Y-%m-%d')} from:\n# {source.name}\n# yamllint disable\n" + resolved.getvalue()
    atomic_write(dest, lambda handle: handle.write(text))


def _relative_symlink(link):
    """The Pretrainer's absolute symlink ``link`` made relative (the models folder can move)."""
    target = Path(os.readlink(link))
    if target.is_absolute():
        relative = os.path.relpath(target, link.parent)
        link.unlink()
        link.symlink_to(relative)


def collect_lm_and_tokenizer(hparams):
    """The Pretrainer of the experiment's hparams collects lm.ckpt and tokenizer.ckpt into save/
    (symlinks, never a hub) and loads them (the tokenizer is the one the data pipelines use)."""
    from speechbrain.utils.fetching import FetchConfig

    pretrainer = hparams["pretrainer"]
    Path(hparams["save_folder"]).mkdir(parents=True, exist_ok=True)
    pretrainer.collect_files(fetch_config=FetchConfig(allow_network=False))
    for name in ("lm", "tokenizer"):
        _relative_symlink(Path(hparams["save_folder"]) / f"{name}.ckpt")
    pretrainer.load_collected()


def _checkpointer(hparams, key="checkpointer"):
    """The hparams' Checkpointer as an atomic one (local.checkpoints: SpeechBrain writes
    CKPT.yaml before the parameter files, so a run killed in between would resume from a broken
    checkpoint). The yaml keeps SpeechBrain's class, as the SA experiment folders have it."""
    from local.checkpoints import CompleteCheckpointer

    original = hparams[key]
    return CompleteCheckpointer(original.checkpoints_dir, recoverables=original.recoverables)


def _run_opts(device, progressbar, hparams):
    opts = {"device": device, "noprogressbar": not progressbar}
    minutes = hparams.get("ckpt_interval_minutes", 0)
    if minutes:
        opts["ckpt_interval_minutes"] = minutes
    return opts


def train_lm(plan, device, progressbar, log):
    from hyperpyyaml import load_hyperpyyaml

    from local.files import atomic_write
    from local.rehearsal_asr import LMBrain, folder_size, lm_dataset, train_loader_kwargs
    from local.store import load_tokenizer

    folder = plan.models_dir / LM_NAME
    fingerprint = _fingerprint(plan, "lm", LM_NAME)
    record = plan.finished.get(LM_NAME)
    if record is not None:
        log(f"{LM_NAME}: finished, skipped ({record['seconds']:.1f} s when trained{_unverified(record)})")
        return record
    start, start_cpu = time.time(), time.process_time()
    overrides = {**plan.overrides["lm"], "output_folder": str(folder.resolve())}
    write_hparams(LM_HPARAMS, overrides, folder / "hyperparams.yaml")
    with _ModelLog(folder):
        with open(folder / "hyperparams.yaml", encoding="utf-8") as handle:
            hp = load_hyperpyyaml(handle)
        tokenizer = load_tokenizer(plan.tokenizer_file)
        data = lm_dataset(plan.corpus.words, tokenizer, hp)
        checkpointer = _checkpointer(hp)
        resumed = checkpointer.find_checkpoint() is not None
        if resumed:
            log(f"{LM_NAME}: resuming from {checkpointer.find_checkpoint().path.name}")
        brain = LMBrain(
            modules=hp["modules"],
            opt_class=hp["optimizer"],
            hparams=hp,
            run_opts=_run_opts(device, progressbar, hp),
            checkpointer=checkpointer,
        )
        brain.fit_with_sampler(hp["epoch_counter"], data, None, train_loader_kwargs(data, hp), {}, progressbar)
        lm = hp["lm_model"]
        state = {k: v.detach().cpu() for k, v in lm.state_dict().items()}  # a CPU file, whatever the device
        atomic_write(folder / "lm.ckpt", lambda handle: torch.save(state, handle), binary=True)
        atomic_write(folder / "tokenizer.ckpt", lambda h: h.write(plan.tokenizer_file.read_bytes()), binary=True)
    record = {
        "fingerprint": fingerprint,
        "model": LM_NAME,
        "stage": "lm",
        "words": len(plan.corpus.words),
        "epochs": hp["number_of_epochs"],
        "train_loss": round(float(getattr(brain, "last_loss", float("nan"))), 4),
        "parameters": sum(p.numel() for p in lm.parameters()),
        "seconds": round(time.time() - start, 1),
        "cpu_seconds": round(time.process_time() - start_cpu, 1),
        "resumed": resumed,
        "bytes": folder_size(folder),
        "files": _files_record(
            folder, [*(folder / "save").glob("CKPT+*/*"), folder / "lm.ckpt", folder / "tokenizer.ckpt"]
        ),
    }
    write_json(folder / DONE, record)
    log(
        f"{LM_NAME}: TransformerLM on {len(plan.corpus.words)} words, {record['epochs']} epochs: "
        f"{_took(record)}, {_mb(record['bytes'])}"
    )
    return record


def asr_overrides(plan, stage, speaker, si_checkpoint=None):
    """The overrides of rehearsal_asr.yaml for one model (its data, folders and stage)."""
    corpus = plan.corpus
    folder = (plan.models_dir / speaker).resolve()
    csv = {s: {b: str(Path(p).resolve()) for b, p in blocks.items()} for s, blocks in corpus.csvs.items()}
    if stage == "si":
        train = [csv[s][b] for s in corpus.speakers for b in ("B1", "B2")]
        valid, test = [], [csv[s]["B3"] for s in corpus.speakers]
    else:
        train, valid, test = ([csv[speaker][b]] for b in BLOCKS)
    return {
        **plan.overrides[stage],
        "stage": stage,
        "speaker": speaker,
        "output_folder": str(folder),
        "data_folder": str(corpus.folder.resolve()),
        "train_csv": train,
        "valid_csv": valid,
        "test_csv": test,
        "load_ckpt": None if si_checkpoint is None else str(si_checkpoint),
        "pretrained_lm_tokenizer_path": str((plan.models_dir / LM_NAME).resolve()),
    }


def _load_start(hp, load_ckpt):
    """An SA model starts from the SI checkpoint: its model and normalizer, loaded with
    SpeechBrain's load hooks (the optimizer, scheduler and epoch counter start afresh)."""
    from speechbrain.utils.checkpoints import DEFAULT_LOAD_HOOKS, get_default_hook

    for key, obj in (("model", hp["model"]), ("normalizer", hp["normalize"])):
        get_default_hook(obj, DEFAULT_LOAD_HOOKS)(obj, Path(load_ckpt) / f"{key}.ckpt", True)


def train_asr(plan, stage, speaker, device, progressbar, log, si_checkpoint=None):
    """Trains (or resumes, or skips when finished) one ASR model; returns its record."""
    from hyperpyyaml import load_hyperpyyaml

    from local.rehearsal_asr import ASRBrain, asr_dataset, folder_size, train_loader_kwargs

    folder = plan.models_dir / speaker
    fingerprint = _fingerprint(plan, stage, speaker)
    record = plan.finished.get(speaker)
    if record is not None:
        _keep_only(folder / "save", folder / "save" / Path(record["checkpoint"]).name)
        log(f"{speaker}: finished, skipped ({record['seconds']:.1f} s when trained{_unverified(record)})")
        return record
    start, start_cpu = time.time(), time.process_time()
    write_hparams(ASR_HPARAMS, asr_overrides(plan, stage, speaker, si_checkpoint), folder / "hyperparams.yaml")
    with _ModelLog(folder):
        with open(folder / "hyperparams.yaml", encoding="utf-8") as handle:
            hp = load_hyperpyyaml(handle)
        collect_lm_and_tokenizer(hp)
        tokenizer = hp["tokenizer"]
        train = asr_dataset(hp["train_csv"], hp["data_folder"], tokenizer, hp, train=True)
        valid = asr_dataset(hp["valid_csv"], hp["data_folder"], tokenizer, hp) if hp["valid_csv"] else None
        test = asr_dataset(hp["test_csv"], hp["data_folder"], tokenizer, hp)
        checkpointer = _checkpointer(hp)
        resumed = checkpointer.find_checkpoint() is not None
        if stage == "sa" and not resumed:
            _load_start(hp, hp["load_ckpt"])
        brain = ASRBrain(
            modules=hp["modules"],
            opt_class=hp["Adam"],
            hparams=hp,
            run_opts=_run_opts(device, progressbar, hp),
            checkpointer=checkpointer,
        )
        if resumed:
            log(f"{speaker}: resuming from {checkpointer.find_checkpoint().path.name}")
        brain.fit_with_sampler(
            hp["epoch_counter"],
            train,
            valid,
            train_loader_kwargs(train, hp),
            dict(hp["valid_dataloader_opts"]),
            progressbar,
        )
        train_seconds = time.time() - start
        # evaluate() loads the checkpoint the SA pipeline would use (and extract_logits.py will):
        # the highest WRA on B2 (ties to the most recent); the SI model, its latest.
        brain.test_wer_file = folder / f"wer_{speaker}_B3_greedy.txt"
        brain.evaluate(test, progressbar=progressbar, test_loader_kwargs=dict(hp["test_dataloader_opts"]))
        test_stats = brain.last_stats
        chosen, meta, how = brain.chosen
    record = {
        "fingerprint": fingerprint,
        "model": speaker,
        "stage": stage,
        "train_csv": [Path(p).name for p in hp["train_csv"]],
        "valid_csv": [Path(p).name for p in hp["valid_csv"]],
        "test_csv": [Path(p).name for p in hp["test_csv"]],
        "train_utterances": len(train),
        "epochs": hp["number_of_epochs"],
        "parameters": sum(p.numel() for p in hp["model"].parameters()),
        "checkpoint": str(chosen),
        "checkpoint_selected_by": how,
        "checkpoint_meta": {k: v for k, v in meta.items() if k in ("ACC", "WER", "WRA", "epoch", "loss")},
        "test_greedy": {k: round(float(test_stats[k]), 4) for k in ("WRA", "WER", "ACC")},
        "test_greedy_wra_by_speaker": {k: round(v, 4) for k, v in brain.wra_by_speaker.items()},
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - start, 1),
        "cpu_seconds": round(time.process_time() - start_cpu, 1),
        "resumed": resumed,
        # the chosen checkpoint's files (the others are deleted next)
        "files": _files_record(folder, [p for p in (folder / "save" / Path(chosen).name).iterdir() if p.is_file()]),
    }
    write_json(folder / DONE, record)
    _keep_only(folder / "save", chosen)
    record["bytes"] = folder_size(folder)
    write_json(folder / DONE, record)
    valid_text = (
        f"B2 WRA {100 * meta['WRA']:.1f} (greedy) at epoch {meta.get('epoch')}, "
        if "WRA" in meta
        else f"{record['epochs']} epochs, "
    )
    log(
        f"{speaker}: {stage.upper()} on {', '.join(record['train_csv'][:2])}"
        f"{' ...' if len(record['train_csv']) > 2 else ''} ({len(train)} utterances): {valid_text}"
        f"B3 WRA {100 * test_stats['WRA']:.1f} (greedy); {_took(record)}, {_mb(record['bytes'])}"
    )
    return record


def _unverified(record):
    return "" if record.get("files") else "; no checksums recorded, its files not checked"


def _keep_only(save_folder, chosen):
    """Deletes every checkpoint of ``save_folder`` but ``chosen`` (SpeechBrain's own deletion).
    The paths are compared resolved: the trained model's checkpoint path is absolute, the folder
    may be given relative (``--corpus results/...``), and a plain comparison then deleted all."""
    from speechbrain.utils.checkpoints import Checkpointer, ckpt_recency

    checkpointer = Checkpointer(save_folder)
    keep = Path(chosen).resolve()
    if not any(Path(c.path).resolve() == keep for c in checkpointer.list_checkpoints()):
        raise RehearsalError(f"{save_folder}: the chosen checkpoint {chosen} is not there; nothing was deleted")
    if len(checkpointer.list_checkpoints()) > 1:
        checkpointer.delete_checkpoints(
            num_to_keep=0,
            importance_keys=[ckpt_recency],
            ckpt_predicate=lambda c: Path(c.path).resolve() != keep,
            verbosity=logging.DEBUG,
        )


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def check_device(device, threads):
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RehearsalError(f"--threads={threads} is not allowed: at least 1")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise RehearsalError(f"--device={device} is not allowed: cpu, cuda or cuda:N")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RehearsalError(f"--device={device}: no CUDA device is available here")


def train_models(
    corpus,
    models_dir,
    tokenizer_file,
    preset="full",
    device="cpu",
    threads=None,
    speakers=None,
    seed=None,
    overrides=None,
    progressbar=True,
    log=print,
    cross=None,
):
    """The model stage: LM, SI, then one SA model per speaker (see the module docstring).
    Deterministic for a seed; resumable; returns the manifest (``<models>/rehearsal_models.json``).
    ``overrides`` ({asr|si|sa|lm: {hparams key: value}}) go on top of the preset (each value
    checked: check_override); ``cross``: speakers the caller decodes afterwards (checked to be of
    the corpus). Every option and input, and the files of every finished model, is checked first
    (RehearsalError, nothing written): a finished model whose checkpoint files differ from those
    its rehearsal_model.json recorded is refused, not skipped."""
    check_device(device, threads)
    plan = make_plan(corpus, models_dir, tokenizer_file, preset, speakers, seed, overrides, cross)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    from local.sa_models import set_tf32

    set_tf32(False)  # as extraction and decoding compute (SpeechBrain 1.1.2 turns TF32 on)
    start = time.time()
    try:
        plan.models_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"config": plan.config, "models": {}}
        old = plan.models_dir / MANIFEST
        if old.is_file():
            manifest["models"] = json.loads(old.read_text(encoding="utf-8")).get("models", {})
        write_json(old, manifest)
        counts = plan.corpus.counts
        log(
            f"models: preset {plan.preset}, seed {plan.seed}, {len(plan.corpus.speakers)} speakers "
            f"({sum(c['B1'] + c['B2'] for c in counts.values())} B1+B2 utterances), "
            f"{plan.vocab_size} pieces, device {device}, {torch.get_num_threads()} thread(s); "
            f"{sum(sum(c.values()) for c in counts.values())} utterances checked in {plan.corpus.check_seconds:.1f} s"
        )
        if plan.corpus.unk_words:
            log(
                f"models: {len(plan.corpus.unk_words)} word(s) have an <unk> piece in the tokenizer "
                f"(kept, as the SA pipeline kept them): {', '.join(plan.corpus.unk_words[:8])}"
            )

        def done(record):
            manifest["models"][record["model"]] = {k: v for k, v in record.items() if k not in ("fingerprint", "files")}
            write_json(old, manifest)

        done(train_lm(plan, device, progressbar, log))
        si = train_asr(plan, "si", SI_NAME, device, progressbar, log)
        done(si)
        for spk in plan.corpus.speakers:
            done(train_asr(plan, "sa", spk, device, progressbar, log, si_checkpoint=si["checkpoint"]))
        from local.rehearsal_asr import folder_size

        manifest["seconds"] = round(time.time() - start, 1)
        manifest["bytes"] = folder_size(plan.models_dir)
        write_json(old, manifest)
        for line in summary_table(manifest):
            log(line)
        log(f"models: done in {manifest['seconds']:.1f} s (this run), {_mb(manifest['bytes'])} in {plan.models_dir}")
        return manifest
    finally:
        torch.set_num_threads(saved_threads)


def summary_table(manifest):
    """The stage's figures, one line per model (greedy WRA in %; times of the run that finished
    it: a model resumed from a checkpoint is marked ``*``, its times those of its last run only)."""
    lines = ["model  trained on            epoch kept  B2 WRA  B3 WRA   seconds  CPU s"]
    for name, r in manifest["models"].items():
        mark = " *" if r.get("resumed") else ""
        if r["stage"] == "lm":
            lines.append(f"{name:6} {r['words']} words{'':13}{'':26}{r['seconds']:8.1f} {r['cpu_seconds']:6.1f}{mark}")
            continue
        meta = r.get("checkpoint_meta", {})
        b2 = f"{100 * meta['WRA']:6.1f}" if "WRA" in meta else f"{'-':>6}"
        trained = f"{r['train_utterances']} utts ({len(r['train_csv'])} CSV)"
        lines.append(
            f"{name:6} {trained:21} {meta.get('epoch', '-')!s:>10}  {b2}  {100 * r['test_greedy']['WRA']:6.1f} "
            f"{r['seconds']:8.1f} {r['cpu_seconds']:6.1f}{mark}"
        )
    if any(r.get("resumed") for r in manifest["models"].values()):
        lines.append("* resumed from a checkpoint: the times are those of its last run only, not of its whole training")
    return lines


def evaluate_greedy(models_dir, corpus, pairs, device="cpu", progressbar=True, log=print):
    """Greedy WRA of (model, speaker) pairs on the speaker's B3: {model: {speaker: WRA}} (a
    fraction), each pair's ``wer_<SPK>.txt`` in ``<models>/greedy_B3/<MODEL>/``; pairs already
    there are read back, not decoded again."""
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.utils.train_logger import FileTrainLogger

    from local.rehearsal_asr import ASRBrain, asr_dataset

    models_dir, corpus = Path(models_dir), Path(corpus)
    out = models_dir / CROSS_FOLDER
    results_file = out / "results.json"
    results = json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else {}
    for model in dict.fromkeys(m for m, _ in pairs):
        todo = [s for m, s in pairs if m == model and s not in results.get(model, {})]
        if not todo:
            continue
        with open(models_dir / model / "hyperparams.yaml", encoding="utf-8") as handle:
            hp = load_hyperpyyaml(handle)
        hp["tokenizer"].load(str(models_dir / model / "save" / "tokenizer.ckpt"))
        # the model folder is finished: this decode logs beside its wer files, not in its train_log.txt
        (out / model).mkdir(parents=True, exist_ok=True)
        hp["train_logger"] = FileTrainLogger(out / model / "train_log.txt")
        brain = ASRBrain(
            modules=hp["modules"], hparams=hp, run_opts={"device": device, "noprogressbar": not progressbar}
        )
        brain.checkpointer = _checkpointer(hp)  # evaluate() loads the chosen checkpoint
        for spk in todo:
            test = asr_dataset([corpus / "csv" / f"{spk}_B3.csv"], corpus, hp["tokenizer"], hp)
            brain.test_wer_file = out / model / f"wer_{spk}.txt"
            brain.test_wer_file.parent.mkdir(parents=True, exist_ok=True)
            tick = time.time()
            brain.evaluate(test, progressbar=progressbar, test_loader_kwargs=dict(hp["test_dataloader_opts"]))
            results.setdefault(model, {})[spk] = round(float(brain.last_stats["WRA"]), 4)
            write_json(results_file, results)
            log(f"{model} on {spk} B3: greedy WRA {100 * results[model][spk]:.1f} ({time.time() - tick:.1f} s)")
    return results
