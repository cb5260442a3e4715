#!/usr/bin/env python3
"""Decode the held-out speaker's audio free-running, with a trained student in the loop: figures
that stand beside the user's SpeechBrain results (beam search + CTC + LM on the audio).

train.py scores the student teacher-forced (it reads the logits extracted on the reference
prefix). Here the fold's test-stream SA models (``matched`` / ``self``: the held-out speaker's own
model; ``cross``: the teachers' models) decode the audio step by step, the student fuses their
step logits, and SpeechBrain's searchers extend the hypotheses (``local/free_running.py``):

- ``greedy``: ``S2STransformerGreedySearcher`` (max length = encoder frames x max_decode_ratio,
  stop at ``</s>``);
- ``beam``: ``S2STransformerBeamSearcher`` with the CTC prefix scorer and the TransformerLM, with
  the settings of the held-out speaker's hparams file (its ``test_search``: beam 66, CTC 0.4, LM
  0.6, temperature 1.15 in the SA project's yaml), each overridable here.

- ``chosen``: each kind of system (the student, ``mean``, the SA models alone and so their vote) by
  the search tune_decoding.py chose for it on the teacher speakers' validation audio (greedy, or
  beam at the CTC and LM weights best there; ``<fold>/decoding_choice.json``): not the SA
  pipeline's settings, so its figures stand beside other ``chosen`` figures only.

The baselines are decoded by the same search: ``sa_self`` (the held-out speaker's own SA model
alone: with beam + LM it is the SA pipeline's own test decode of that speaker), and with ``cross``
each teacher alone, ``mean`` (the teachers' probabilities averaged per step) and their
``majority_vote`` (of the teachers' own searches: no search of its own).

Usage (from recipes/UASpeech/logit_kd; the fold's output folder is train.py's)::

    python decode.py results/logit_kd/M08_same_level_matched_transformer/1986 \\
        --models M08=/exp/M08/hyperparams.yaml:/exp/M08/save \\
        --speaker_csv=/data/csv/M08.csv --data_root=/data/UASpeech [--search greedy beam chosen]
        [--batch_size=N] [--max_memory=GiB] [--device=cuda --precision=bf16]
        [--lm_file=/exp/M08/save/lm.ckpt | --lm_file=none] [--beam_size=66] [--ctc_weight=0.4]
        [--lm_weight=0.6] [--temperature=1.15] [--lm_temperature=1.15] [--ctc_scoring=full|partial]
        [--ctc_source=own|mean|MODEL] [--subset] [--force]
    torchrun --standalone --nproc_per_node=4 decode.py <fold folder> ...   # the utterances shared out

``--models`` takes every test-stream model (the held-out speaker's for matched/self, the teachers'
for cross; the held-out speaker's one too for the ``sa_self`` baseline), as extract_logits.py
does; the LM defaults to the ``lm.ckpt`` of the held-out (or first) model's save folder.

Batches. Utterances are decoded ``--batch_size`` at a time (default 16; 1 for a beam search with CTC
scored in full on a CPU, where batches were slower: docs/benchmark.md), sorted by length so that
little is padding: the models' encoders run once per batch, SpeechBrain's searchers search the batch x beam
at once, and each utterance gets the hypothesis it gets alone, token for token (tested; how:
``local/free_running.py``). The memory a search needs per utterance is printed (the CTC prefix
scorer holds [T, batch x beam, V] floats several times over with ``--ctc_scoring=full``) and a batch
is cut to fit ``--max_memory`` (GiB; default: most of the free memory of the device).
``--ctc_scoring=partial`` scores CTC on the ``--scorer_beam_scale`` x beam best candidates of the
attention and LM scores only (SpeechBrain's partial scorers): much less memory and time, and a
token outside those candidates cannot win on its CTC score alone (not the SA pipeline's setting;
said in the results).

The CTC of a beam figure (``--ctc_source``). By default each system is searched with its own
streams' CTC: the student and ``mean`` with the frame mean of every test-stream model's CTC
posteriors, a teacher alone with its own. A gain of the student over a single teacher then mixes
the fusion with the CTC average. ``--ctc_source=mean`` decodes every system with the frame mean
of the test-stream models' CTC, ``--ctc_source=MODEL`` every system with that model's CTC (e.g.
the student with one teacher's CTC): the ablations that separate the two.

Outputs (in the fold folder): ``wer_test_free_<key>.txt`` (student) and
``wer_test_free_<key>_<system>.txt`` (baselines) in SpeechBrain's ``ErrorRateStats`` format, with
``<key>`` ``greedy`` or ``beam`` (``beam_partialctc``, ``beam_ctc-mean``, ``beam_ctc-<MODEL>`` for
the variants), and ``free_running.<key>`` in ``test_results.json``: how it was decoded, the settings
and where they came from, the models' checkpoints, how many of the fold's test utterances it
covers (a CSV with only some of them is refused unless ``--subset``; a subset is marked as such),
utterances per second. Folders of earlier versions (``wer_test_greedy.txt``, ``wer_test_beam*.txt``)
stay readable: every file is listed with its decoding in ``test_results.json``'s ``wer_files``.
A key already in it is not redone without ``--force`` (which removes that key's old files first).

A killed decode resumes: each finished batch's hypotheses are saved (atomically) in
``<fold folder>/.free_running_partial/`` and a rerun of the same command decodes only the rest;
the folder is removed once the results are written. Under ``torchrun`` the batches are shared out
over the processes and the main process gathers the hypotheses and writes the same files as one
process. A progress bar shows utterances/s and the time left (``--noprogressbar``).

Bad options and inputs stop before anything is written, with one line ``ERROR: ...`` naming the
option, the file or the utterance (exit status 2).
"""

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from local import cpu_kernels  # noqa: F401  first: it pins the CPU math libraries' code paths before torch loads

# isort: split
import torch

from local.console import RULE, OneLineParser
from local.corpus import parse_utterance_id, word_category
from local.decoding_choice import ChoiceError, kind_of, read_choice
from local.distributed import RunError, agree, is_distributed, leave, local_rank, world_size
from local.files import DiskFullError, write_json
from local.free_running import (
    CTC_SCORING,
    PROGRESS,
    SEARCHES,
    StreamDecoder,
    StreamIdentity,
    build_searcher,
    decode_batch,
    describe,
    encoder_frames,
    plan_batches,
    search_memory,
    search_settings,
)
from local.fusion import MeanFusion
from local.run_folder import OutputLock
from local.sa_models import (
    BOS,
    EOS,
    ExtractionError,
    SAModel,
    check_audio,
    check_device,
    load_language_model,
    load_model_hparams,
    parse_model_arg,
    read_speaker_csv,
    set_tf32,
)
from local.scoring import SystemScores, majority_vote, results_table, teacher_ranks
from local.store import LogitStoreError, load_tokenizer

logger = logging.getLogger("decode")
PARTIAL = ".free_running_partial"
CHOSEN = "chosen"  # the search of --search chosen: each system's own, from tune_decoding.py
GIB = 2**30


class DecodeError(RuntimeError):
    """Bad input or options; the message names the file, the model or the option."""


# ------------------------------------------------------------------------------------------------
# The fold
# ------------------------------------------------------------------------------------------------


def read_fold(folder):
    """The fold's test_results.json and its hparams."""
    folder = Path(folder)
    results_file = folder / "test_results.json"
    if not results_file.is_file():
        raise DecodeError(
            f"{results_file} does not exist: run train.py for this fold first (decode.py reads its output)"
        )
    try:
        info = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DecodeError(f"{results_file} is unreadable ({err})") from None
    missing = [k for k in ("held_out", "teachers", "input_streams", "tokenizer_file") if k not in info]
    if missing:
        raise DecodeError(f"{results_file} lacks {missing}: not a results file of train.py")
    return info, folder / "hyperparams.yaml"


def fold_test_ids(folder, info):
    """(the fold's test utterance ids or None, their number or None), from what train.py wrote:
    ``test_utterances.json`` (every test utterance) and ``n_utterances`` in test_results.json."""
    ids = None
    path = Path(folder) / "test_utterances.json"
    if path.is_file():
        try:
            ids = json.loads(path.read_text(encoding="utf-8"))["ids"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DecodeError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DecodeError(f"{path}: its ids are not a list of utterance ids")
    n = info.get("n_utterances")
    if ids is not None:
        n = len(ids)
    elif n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise DecodeError(f"{Path(folder) / 'test_results.json'}: n_utterances is {n!r}, not a count")
    return ids, n


def coverage(utts, ids, n, subset, csv):
    """(the utterances to decode, {"decoded", "fold_test_utterances", "complete"}): the CSV's
    utterances that the fold tested; DecodeError when they are not all of them, unless ``subset``."""
    if ids is not None:
        fold = set(ids)
        outside = [u.id for u in utts if u.id not in fold]
        if outside:
            logger.info("%d utterance(s) of %s are not among the fold's test utterances: left out", len(outside), csv)
        utts = [u for u in utts if u.id in fold]
    complete = n is not None and len(utts) == n
    if not complete and not subset:
        if n is None:
            raise DecodeError(
                "the fold folder records neither test_utterances.json nor n_utterances: whether the CSV holds "
                "all of the fold's test utterances cannot be told; give --subset to decode it as a subset"
            )
        raise DecodeError(
            f"{csv} holds {len(utts)} of the fold's {n} test utterances: its figures would not be the "
            f"fold's; give the held-out speaker's whole CSV, or --subset to decode these as a subset"
        )
    if not utts:
        raise DecodeError(f"{csv} holds none of the fold's test utterances")
    return utts, {"decoded": len(utts), "fold_test_utterances": n, "complete": complete}


def load_student(hparams_file, save_folder, vocab_size):
    """The fold's student, with the checkpoint train.py tested (the lowest validation loss)."""
    from speechbrain.utils.checkpoints import Checkpointer

    from local.corpus import SPEAKERS

    student = load_model_hparams(hparams_file, required=("student",), optional=(), what="a fold's hparams")["student"](
        vocab_size=vocab_size, n_identities=len(SPEAKERS)
    )
    if any(p.requires_grad for p in student.parameters()):
        checkpointer = Checkpointer(save_folder, recoverables={"student": student})
        ckpt = checkpointer.find_checkpoint(min_key="loss")
        if ckpt is None:
            raise DecodeError(f"no checkpoint of the student in {save_folder}")
        checkpointer.load_checkpoint(ckpt)
        logger.info("student: %s", ckpt.path)
        return student.eval(), str(ckpt.path)
    return student.eval(), None


def test_stream_models(info, given):
    """The SA models of the fold's test streams; DecodeError naming those not ``given``."""
    streams = [info["held_out"]] if info["input_streams"] in ("matched", "self") else list(info["teachers"])
    missing = [m for m in streams if m not in given]
    if missing:
        raise DecodeError(
            f"the fold's test streams ({info['input_streams']}) are read from the SA models {streams}: "
            f"give {', '.join(missing)} with --models NAME=HPARAMS.yaml:CHECKPOINT"
        )
    return streams


def ctc_models_of(info, ctc_source, given):
    """The names of the models whose CTC every system's beam search reads (None: each its own)."""
    if ctc_source == "own":
        return None
    if ctc_source == "mean":
        return test_stream_models(info, given)
    if ctc_source not in given:
        choices = ", ".join(given)
        raise DecodeError(
            f"--ctc_source={ctc_source} is not allowed: it must be own, mean or one of --models ({choices})"
        )
    return [ctc_source]


def systems_of(info, models, student, ctc_names=None):
    """name -> StreamDecoder of every system this fold decodes."""
    held_out, teachers = info["held_out"], info["teachers"]
    streams = test_stream_models(info, models)
    ctc = [models[m] for m in ctc_names] if ctc_names else None

    def decoder(names, fusion):
        return StreamDecoder([models[m] for m in names], fusion, ctc_models=ctc)

    systems = {"student": decoder(streams, student)}
    if held_out in models:
        systems["sa_self"] = decoder([held_out], StreamIdentity())
    else:
        logger.info("no model of %s given: no sa_self baseline", held_out)
    if info["input_streams"] == "cross":
        systems["mean"] = decoder(teachers, MeanFusion())
        for m in teachers:
            systems[f"teacher_{m}"] = decoder([m], StreamIdentity())
    return systems


def search_key(search, ctc_scoring, ctc_source):
    """The name of a decoding in test_results.json and in its file names."""
    if search in ("greedy", CHOSEN):
        return search
    key = "beam"
    if ctc_scoring == "partial":
        key += "_partialctc"
    if ctc_source != "own":
        key += f"_ctc-{ctc_source}"
    return key


def wer_file_name(key, system):
    return f"wer_test_free_{key}.txt" if system == "student" else f"wer_test_free_{key}_{system}.txt"


def files_of_key(wer_files, key):
    """The files ``wer_files`` lists for decoding ``key``: this version's, and the names of earlier
    versions (``wer_test_greedy*.txt``, ``wer_test_beam*.txt``) for greedy and beam."""
    found = []
    for name, entry in wer_files.items():
        entry = entry if isinstance(entry, dict) else {}
        legacy = key in SEARCHES and (name == f"wer_test_{key}.txt" or name.startswith(f"wer_test_{key}_"))
        legacy = legacy and not str(entry.get("decoding", "")).startswith("teacher-forced")
        if entry.get("free_running") == key or legacy:
            found.append(name)
    return found


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


# option -> (kind, (low, low open?), (high, high open?), what it must be); read as text so that
# nan, inf and .inf get the recipe's one-line error rather than argparse's
NUMERIC = {
    "beam_size": (int, (1, False), None, "an integer >= 1"),
    "ctc_weight": (float, (0.0, False), (1.0, True), "a number 0 <= x < 1"),
    "lm_weight": (float, (0.0, False), (1.0, False), "a number 0 <= x <= 1"),
    "temperature": (float, (0.0, True), None, "a finite number > 0"),
    "lm_temperature": (float, (0.0, True), None, "a finite number > 0"),
    "min_decode_ratio": (float, (0.0, False), None, "a finite number >= 0"),
    "max_decode_ratio": (float, (0.0, True), None, "a finite number > 0"),
}
RUN_NUMERIC = {
    "batch_size": (int, (1, False), None, "an integer >= 1"),
    "max_memory": (float, (0.0, True), None, "a finite number of GiB > 0"),
    "scorer_beam_scale": (float, (0.0, True), None, "a finite number > 0"),
}


def number(key, value, spec):
    """``value`` (text, or a number from an hparams file) as ``spec`` wants it; DecodeError naming
    ``--key`` otherwise (not a number, not finite, out of range)."""
    kind, low, high, what = spec
    problem = f"--{key}={value} is not allowed: {key} must be {what}"
    if isinstance(value, bool):
        raise DecodeError(problem)
    try:
        number_ = float(value)
    except (TypeError, ValueError):
        raise DecodeError(problem) from None
    if not math.isfinite(number_):
        raise DecodeError(problem)
    if kind is int:
        if number_ != int(number_) or (isinstance(value, str) and not value.strip().lstrip("+-").isdigit()):
            raise DecodeError(problem)
        number_ = int(number_)
    if low is not None and (number_ <= low[0] if low[1] else number_ < low[0]):
        raise DecodeError(problem)
    if high is not None and (number_ >= high[0] if high[1] else number_ > high[0]):
        raise DecodeError(problem)
    return number_


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold_folder", help="train.py's output folder of the fold (test_results.json, save/)")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=HPARAMS.yaml:CKPT")
    parser.add_argument("--speaker_csv", required=True, help="the held-out speaker's SpeechBrain CSV")
    parser.add_argument("--data_root", help="replaces $data_root in the CSV's wav column")
    parser.add_argument(
        "--search",
        nargs="+",
        choices=(*SEARCHES, CHOSEN),
        default=list(SEARCHES),
        help="greedy, beam (default: both), chosen (each system as tune_decoding.py chose on the teacher speakers)",
    )
    parser.add_argument(
        "--lm_file", help="TransformerLM checkpoint (default: lm.ckpt of the model's save folder); none"
    )
    for key in NUMERIC:
        parser.add_argument(f"--{key}", help="default: the held-out speaker's hparams file (test_search)")
    parser.add_argument(
        "--batch_size",
        help="utterances searched at once (default: 16; 1 for a beam search with CTC scored in full on a CPU, where "
        "batches are slower: docs/benchmark.md)",
    )
    parser.add_argument("--max_memory", help="GiB a batch's search may use (default: most of the device's free memory)")
    parser.add_argument("--ctc_scoring", choices=CTC_SCORING, default="full", help="full (default) or partial")
    parser.add_argument(
        "--scorer_beam_scale", default="2.0", help="partial CTC: candidates per hypothesis = scale x beam (default 2)"
    )
    parser.add_argument("--ctc_source", default="own", help="own (default), mean, or a model of --models")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast (fp16: GPU)")
    parser.add_argument("--distributed_backend", default=None, help="under torchrun: gloo or nccl (default: by device)")
    parser.add_argument(
        "--subset", action="store_true", help="decode a CSV that holds only some of the fold's test utterances"
    )
    parser.add_argument("--noprogressbar", action="store_true")
    parser.add_argument("--force", action="store_true", help="redo a decoding already in test_results.json")
    return parser


def check_options(args, settings, source, anchor):
    """The search settings with the options applied, every number checked; the run's own numbers."""
    for key, spec in NUMERIC.items():
        given = getattr(args, key)
        if given is not None:
            settings[key] = number(key, given, spec)
            source[key] = "command line"
        else:  # from the hparams file: the same checks, naming the file
            try:
                settings[key] = number(key, settings[key], spec)
            except DecodeError as err:
                raise DecodeError(f"{err} (the value of {anchor})") from None
    if settings["min_decode_ratio"] >= settings["max_decode_ratio"]:
        raise DecodeError(
            f"--min_decode_ratio={settings['min_decode_ratio']} is not allowed: it must be below "
            f"max_decode_ratio ({settings['max_decode_ratio']})"
        )
    run = {key: number(key, getattr(args, key), spec) for key, spec in RUN_NUMERIC.items() if getattr(args, key)}
    run.setdefault("max_memory", None)
    if args.ctc_source != "own" and "greedy" in args.search:
        raise DecodeError(f"--ctc_source={args.ctc_source} is not allowed with the greedy search: give --search beam")
    if args.ctc_scoring == "partial" and "beam" not in args.search:
        raise DecodeError("--ctc_scoring=partial is not allowed without the beam search: give --search beam")
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.precision == "fp16" and device.type != "cuda":
        raise DecodeError("--precision=fp16 is not allowed on a CPU: fp16 autocast needs a GPU (bf16 runs on a CPU)")
    return settings, run, device


# ------------------------------------------------------------------------------------------------
# Finished batches, kept until the results are written
# ------------------------------------------------------------------------------------------------


class PartialResults:
    """The hypotheses of finished batches, in ``<fold>/.free_running_partial/`` (one file per batch,
    written atomically), for a killed decode to resume; tied to a fingerprint of everything that
    decides the hypotheses (another configuration's files are discarded)."""

    def __init__(self, folder, fingerprint):
        self.folder, self.fingerprint = Path(folder) / PARTIAL, fingerprint

    def load(self):
        """{utterance id: {key: {system: ids}}} of the finished batches of this configuration."""
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            return {}
        try:
            same = json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint") == self.fingerprint
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            logger.info("%s holds the batches of another configuration: not reused", self.folder)
            return None
        done = {}
        for path in sorted(self.folder.glob("batch-*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not one of ours, or unreadable: its utterances are decoded again
            for i, utt_id in enumerate(data.get("ids", [])):
                done[utt_id] = {k: {s: h[i] for s, h in by.items()} for k, by in data["hyps"].items()}
        return done

    def start(self, fresh):
        """(The main process.) Removes another configuration's batches (``fresh``)."""
        if fresh and self.folder.exists():
            shutil.rmtree(self.folder)

    def save(self, batch, hyps):
        if not (self.folder / "manifest.json").is_file():  # this configuration's first batch
            write_json(self.folder / "manifest.json", {"fingerprint": self.fingerprint})
        name = hashlib.sha256("\n".join(u.id for u in batch).encode()).hexdigest()[:16]
        write_json(self.folder / f"batch-{name}.json", {"ids": [u.id for u in batch], "hyps": hyps}, indent=None)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def fingerprint_of(parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def init_distributed(args, device):
    """Joins torchrun's process group (WORLD_SIZE > 1); returns the device of this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return device
    backend = args.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def rank():
    return torch.distributed.get_rank() if is_distributed() else 0


def prepare(args):
    """Every check that needs no model: the options, the fold folder, the CSV and its audio files.
    Returns the job (a namespace); DecodeError (one line) otherwise. Nothing is written."""
    job = SimpleNamespace(args=args, folder=Path(args.fold_folder))
    job.info, job.fold_hparams = read_fold(job.folder)
    job.specs = dict(parse_model_arg(m) for m in args.models)
    test_stream_models(job.info, job.specs)
    for name, spec in job.specs.items():
        if not Path(spec.hparams).is_file():
            raise DecodeError(f"model {name}: hparams file {spec.hparams} does not exist")
        if not Path(spec.checkpoint).exists():
            raise DecodeError(f"model {name}: checkpoint {spec.checkpoint} does not exist")
    job.anchor = job.specs.get(job.info["held_out"]) or next(iter(job.specs.values()))
    settings, job.source = search_settings(job.anchor.hparams)
    job.settings, job.run_opts, job.device = check_options(args, settings, job.source, job.anchor.hparams)
    job.scale = job.run_opts.get("scorer_beam_scale", 2.0)
    job.batch_size = job.run_opts.get("batch_size") or default_batch_size(args, job.settings, job.device)
    job.ctc_names = ctc_models_of(job.info, args.ctc_source, job.specs)
    if args.ctc_source != "own" and CHOSEN in args.search:
        raise DecodeError(
            f"--ctc_source={args.ctc_source} is not allowed with --search chosen: each system reads its own CTC"
        )
    job.choice = chosen_decodings(job.folder, job.info) if CHOSEN in args.search else None
    job.keys = {search: search_key(search, args.ctc_scoring, args.ctc_source) for search in args.search}
    done = [k for k in job.keys.values() if k in job.info.get("free_running", {})]
    if done and not args.force:
        raise DecodeError(
            f"{job.folder / 'test_results.json'} already has the {' and '.join(done)} decoding(s): --force redoes them"
        )
    job.tokenizer = load_tokenizer(job.info["tokenizer_file"])
    utts = read_speaker_csv(args.speaker_csv, job.info["held_out"], args.data_root)
    ids, n = fold_test_ids(job.folder, job.info)
    job.utts, job.covered = coverage(utts, ids, n, args.subset, args.speaker_csv)
    job.samples = check_audio(job.utts)  # every audio file readable
    lm_file = args.lm_file if args.lm_file is not None else default_lm_file(job.anchor) or "none"
    if uses_lm(job) and lm_file == "none":
        raise DecodeError(
            "the beam search has lm_weight > 0 but no language model: give --lm_file=PATH, or --lm_weight=0 "
            "(then its figures are not comparable with an LM decode)"
        )
    if uses_lm(job) and not Path(lm_file).is_file():
        raise DecodeError(f"--lm_file={lm_file} is not allowed: the file does not exist (or give --lm_file=none)")
    job.lm_file = lm_file
    return job


def load_models(job):
    """The SA models, the student, the systems, the language model and the searchers of the job."""
    args, info = job.args, job.info
    set_tf32(False)  # as the SA models' fork computed (SpeechBrain 1.1.2 turns TF32 on)
    job.models = {}
    for name, spec in job.specs.items():
        model = SAModel(
            name, spec.hparams, spec.checkpoint, spec.overrides, device=job.device, precision=args.precision
        )
        if model.vocab_size != job.tokenizer.vocab_size():
            raise DecodeError(
                f"model {name} has {model.vocab_size} outputs, the fold's tokenizer "
                f"{info['tokenizer_file']} {job.tokenizer.vocab_size()} pieces"
            )
        logger.info("model %s: %s (%s)", name, model.ckpt_dir, model.ckpt_how)
        job.models[name] = model
    rates = {m.sample_rate for m in job.models.values()}
    if len(rates) > 1:
        raise DecodeError(
            f"the models expect different sample rates ({sorted(map(str, rates))}): one audio cannot feed them"
        )
    check_audio(job.utts, next(iter(rates)))
    student, job.student_ckpt = load_student(job.fold_hparams, job.folder / "save", job.tokenizer.vocab_size())
    job.systems = systems_of(info, job.models, student.to(job.device), job.ctc_names)
    if job.choice is not None and job.choice["student_checkpoint"] != job.student_ckpt:
        raise DecodeError(
            f"{job.folder / 'decoding_choice.json'} was chosen with the student {job.choice['student_checkpoint']}, "
            f"not {job.student_ckpt}: run tune_decoding.py --force again"
        )
    job.lm = None
    if uses_lm(job):
        job.lm = load_language_model(job.anchor.hparams, job.lm_file, job.device)
        logger.info("language model: %s", job.lm_file)
    # (key, system) -> (search, settings, ctc_scoring, scorer_beam_scale) of its searcher
    job.search_of = {}
    for search in args.search:
        for name in job.systems:
            if search == CHOSEN:
                entry = job.choice["chosen"][kind_of(name)]
                spec = (entry["search"], entry["settings"], entry["ctc_scoring"], entry["scorer_beam_scale"])
            else:
                spec = (search, job.settings, args.ctc_scoring, job.scale)
            job.search_of[(job.keys[search], name)] = spec
    job.searchers = {
        (key, name): build_searcher(
            search, job.systems[name], settings, BOS, EOS, job.lm if settings["lm_weight"] > 0 else None, scoring, scale
        ).to(job.device)
        for (key, name), (search, settings, scoring, scale) in job.search_of.items()
    }


def chosen_decodings(folder, info):
    """The fold's decoding_choice.json (tune_decoding.py), checked against the fold."""
    try:
        choice = read_choice(folder)
    except ChoiceError as err:
        raise DecodeError(str(err)) from None
    fold = {k: info[k] for k in ("held_out", "teachers", "input_streams")}
    if choice.get("fold") != fold:
        raise DecodeError(
            f"{Path(folder) / 'decoding_choice.json'} was chosen for the fold {choice.get('fold')}, not {fold}: "
            f"run tune_decoding.py --force on this fold"
        )
    return choice


def default_lm_file(spec):
    """The ``lm.ckpt`` of an SA model's save folder (the Pretrainer's link), or of the folder above
    a checkpoint given directly; None when there is none."""
    for candidate in (Path(spec.checkpoint) / "lm.ckpt", Path(spec.checkpoint).parent / "lm.ckpt"):
        if candidate.exists():
            return str(candidate)
    return None


def uses_lm(job):
    """Whether a search of the job scores with the TransformerLM."""
    if "beam" in job.args.search and job.settings["lm_weight"] > 0:
        return True
    chosen = job.choice["chosen"].values() if job.choice is not None else ()
    return any(c["search"] == "beam" and c["settings"]["lm_weight"] > 0 for c in chosen)


def plan(job, todo):
    """The batches of ``todo``: length-sorted, each within --batch_size and the memory budget (the
    costliest search per utterance, logged with its parts for the job's longest utterance)."""
    frames = {u.id: encoder_frames(job.samples[u.id]) for u in job.utts}
    budget = job.run_opts["max_memory"] * GIB if job.run_opts["max_memory"] else default_budget(job.device)

    def parts(t):
        return max(
            (
                (search, name, search_memory(search, job.systems[name], these, t, scoring, scale), these)
                for (_, name), (search, these, scoring, scale) in job.search_of.items()
            ),
            key=lambda x: sum(x[2].values()),
        )

    def per_utterance(t):
        return sum(parts(t)[2].values())

    longest = max(frames.values())
    search, name, memory, settings = parts(longest)
    logger.info(
        "memory of a search per utterance (the longest, %d encoder frames; the %s search of %s, %d stream(s)%s): "
        "%s; budget %.1f GiB: batches of up to %d utterance(s) at that length (--batch_size=%d)",
        longest,
        search,
        name,
        len(job.systems[name].models),
        f", beam {settings['beam_size']}" if search == "beam" else "",
        ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in memory.items()),
        budget / GIB,
        min(job.batch_size, max(1, int(budget // max(per_utterance(longest), 1)))),
        job.batch_size,
    )
    return plan_batches(todo, frames, job.batch_size, per_utterance, budget)


def run(args):
    job = prepare(args)
    job.device = init_distributed(args, job.device)
    try:  # the main process holds the folder; every process stops if it cannot
        lock = agree(lambda: OutputLock(job.folder).acquire(), on=lambda: rank() == 0)
    except RunError as err:  # its advice (another --output_folder) is train.py's
        raise DecodeError(str(err).split("; ")[0] + ": wait for it to finish") from None
    try:
        load_models(job)
        return decode(job)
    finally:
        if lock is not None:
            lock.release()


def decode(job):
    """Decodes the job's utterances (this process's share of the batches, the finished ones of a
    killed run skipped), gathers the hypotheses on the main process, which writes the results."""
    args, models = job.args, job.models
    fingerprint = fingerprint_of(
        {
            "keys": sorted(job.keys.values()),
            "settings": job.settings,
            "lm": job.lm_file if job.lm is not None else None,
            "models": {n: str(m.ckpt_dir) for n, m in models.items()},
            "student": job.student_ckpt,
            "systems": sorted(job.systems),
            "ctc": [args.ctc_scoring, job.scale, job.ctc_names],
            "precision": args.precision,
            "chosen": job.choice["chosen"] if job.choice is not None else None,
            "tokenizer": job.info["tokenizer_file"],
            "utterances": [(u.id, u.wav, u.word) for u in job.utts],
        }
    )
    partial = PartialResults(job.folder, fingerprint)
    finished = partial.load()
    if is_distributed():
        torch.distributed.barrier()  # every process has read the finished batches
    if rank() == 0:
        partial.start(fresh=finished is None)
    if is_distributed():
        torch.distributed.barrier()
    finished = finished or {}
    if finished:
        logger.info("resuming: %d of %d utterances already decoded (%s)", len(finished), len(job.utts), partial.folder)
    batches = plan(job, [u for u in job.utts if u.id not in finished])
    mine = batches[rank() :: world_size()]

    from tqdm import tqdm

    bar = tqdm(
        total=sum(len(b) for b in mine),
        unit="utt",
        disable=args.noprogressbar or rank() != 0,
        dynamic_ncols=True,
        desc=f"decoding ({', '.join(job.keys.values())}; {len(job.systems)} systems)",
        bar_format=PROGRESS,
    )
    hyps = dict(finished)
    seconds, decoded = 0.0, 0
    for batch in mine:
        tick = time.time()
        try:
            out = decode_batch(batch, models, job.searchers, job.systems, args.precision)
        except ValueError as err:
            raise DecodeError(str(err)) from None
        seconds += time.time() - tick
        decoded += len(batch)
        partial.save(batch, out)
        for i, utt in enumerate(batch):
            hyps[utt.id] = {k: {s: h[i] for s, h in by.items()} for k, by in out.items()}
        bar.update(len(batch))
    bar.close()
    if is_distributed():
        gathered = [None] * world_size()
        torch.distributed.all_gather_object(gathered, (hyps, seconds, decoded))
        seconds = max(s for _, s, _ in gathered)  # the processes ran side by side
        decoded = sum(d for _, _, d in gathered)
        for part, _, _ in gathered:
            hyps.update(part)
    if rank() == 0:
        results = write_results(job, hyps, seconds, decoded)
        partial.remove()
    if is_distributed():
        torch.distributed.barrier()
    if rank() == 0:
        print_block(job, results)
    return 0


def default_batch_size(args, settings, device):
    """16, or 1 for a beam search with CTC scored in full on a CPU: there every row of a batch costs
    its T x V per step until the batch's last utterance ends, and batches were slower than one
    utterance at a time (docs/benchmark.md)."""
    full_ctc = "beam" in args.search and args.ctc_scoring == "full" and settings["ctc_weight"] > 0
    return 1 if device.type == "cpu" and full_ctc else 16


def default_budget(device):
    """Most of the free memory of the device (GPU: 90 % of what is free; CPU: 80 % of the
    available memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.9 * free
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return 0.8 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def write_results(job, hyps, seconds, decoded):
    """wer_test_free_<key>*.txt and the free_running block of test_results.json (written last)."""
    args, info, folder, settings = job.args, job.info, job.folder, job.settings
    covered = job.covered
    results, wer_files = dict(info.get("free_running", {})), dict(info.get("wer_files", {}))
    for search, key in job.keys.items():
        by_system = {name: SystemScores(job.tokenizer) for name in job.systems}
        for utt in job.utts:
            parts = parse_utterance_id(utt.id)
            group = ([utt.word], [word_category(parts["word"])], [parts["mic"]])
            for name, scores in by_system.items():
                scores.append_ids([utt.id], [hyps[utt.id][key][name]], *group)
        if info["input_streams"] == "cross":
            teachers = {n: s for n, s in by_system.items() if n.startswith("teacher_")}
            by_system["majority_vote"], _ = majority_vote(teachers, job.tokenizer, teacher_ranks(info))
        ctc_source = None if args.ctc_source == "own" else args.ctc_source
        if search == CHOSEN:
            decoding, of_system = chosen_description(job.choice, by_system)
        else:
            decoding = describe(search, settings, job.lm, args.ctc_scoring, job.scale, ctc_source)
            of_system = dict.fromkeys(by_system, decoding)
        if not covered["complete"]:
            total = covered["fold_test_utterances"]
            subset = f" [SUBSET: {covered['decoded']} of the fold's {total} test utterances]"
            decoding += subset
            of_system = {name: text + subset for name, text in of_system.items()}
        # --force: the files of the decoding being redone go, so that none of another run stays listed
        for old in files_of_key(wer_files, key):
            (folder / old).unlink(missing_ok=True)
            del wer_files[old]
        for name, system in by_system.items():
            file = wer_file_name(key, name)
            system.write_stats(folder / file)
            wer_files[file] = {"system": name, "decoding": of_system[name], "free_running": key}
        beam = search == "beam"
        results[key] = {
            "decoding": decoding,
            "search": search,
            **(chosen_record(job.choice) if search == CHOSEN else {}),
            "settings": dict(settings) if beam else {k: settings[k] for k in ("min_decode_ratio", "max_decode_ratio")},
            "settings_from": dict(job.source),
            "ctc_scoring": args.ctc_scoring if beam else None,
            "scorer_beam_scale": job.scale if beam and args.ctc_scoring == "partial" else None,
            "ctc_source": args.ctc_source if beam else None,
            "lm_file": str(job.lm_file) if (beam or search == CHOSEN) and job.lm is not None else None,
            "models": {m.name: str(m.ckpt_dir) for m in job.models.values()},
            "systems_decoded": len(job.systems),
            "test_utterances": dict(covered),
            "subset": not covered["complete"],
            "batch_size": job.batch_size,
            "processes": world_size(),
            "precision": args.precision,
            "device": str(job.device),
            # wall time of this run's batches (every search and system, the encoders included; the
            # slowest process under torchrun) and the utterances it decoded (not those resumed)
            "search_seconds": round(seconds, 1),
            "utterances_decoded_by_this_run": decoded,
            "utterances_per_second": round(decoded / seconds, 3) if seconds > 0 else None,
            "systems": {name: system.summary() for name, system in by_system.items()},
        }
    write_json(folder / "test_results.json", {**info, "wer_files": wer_files, "free_running": results})
    return results


def chosen_description(choice, systems):
    """(How a ``chosen`` decode was made, in words; {system: how that system was decoded})."""
    chosen = choice["chosen"]
    head = "each system decoded as chosen on the teacher speakers' validation audio (tune_decoding.py)"
    names = {"student": "student", "mean": "mean", "single": "SA models alone and their vote"}
    parts = [f"{names[kind]}: {entry['decoding']}" for kind, entry in chosen.items()]
    of_system = {}
    for name in systems:
        kind = "single" if name == "majority_vote" else kind_of(name)
        of_system[name] = f"{head}: {chosen[kind]['decoding']}"
    return f"{head}; " + "; ".join(parts), of_system


def chosen_record(choice):
    """What test_results.json keeps of the choice a ``chosen`` decode used."""
    return {
        "chosen": {kind: entry["candidate"] for kind, entry in choice["chosen"].items()},
        "chosen_settings": {kind: entry["settings"] for kind, entry in choice["chosen"].items()},
        "chosen_on": {"validation_utterances": choice.get("utterances"), "rule": choice.get("rule")},
    }


def print_block(job, results):
    covered = job.covered
    n, total = covered["decoded"], covered["fold_test_utterances"]
    if covered["complete"]:
        cover = f"all {n} test utterances of the fold"
    else:
        cover = f"SUBSET: {n} of the fold's {total if total is not None else 'unknown number of'} test utterances"
    lines = [RULE, f"fold {job.info['held_out']}: free-running decodes of its audio ({cover})"]
    for key in job.keys.values():
        lines += [f"{key}: {results[key]['decoding']}", results_table(results[key]["systems"])]
    lines += [f"results: {job.folder.resolve()} (test_results.json: free_running; wer_test_free_<key>*.txt)", RULE]
    print("\n".join(lines), flush=True)


def main(argv=None):
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DecodeError, ChoiceError, ExtractionError, LogitStoreError, DiskFullError) as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    leave(main())  # under torchrun: every process leaves together, past the interpreter's teardown
