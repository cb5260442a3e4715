#!/usr/bin/env python3
"""Decode the held-out speaker's audio free-running, with a trained student in the loop: figures
that stand beside the user's SpeechBrain results (beam search + CTC + LM on the audio).

train.py scores the student teacher-forced (it reads the logits extracted on the reference
prefix). Here the fold's test-stream SA models (``matched`` / ``self``: the held-out speaker's own
model; ``cross``: the teachers' models) decode the audio step by step, the student fuses their
step logits, and SpeechBrain's searchers extend the hypotheses (``local/free_running.py``):

- ``greedy``: ``S2STransformerGreedySearcher`` (max length = encoder frames x max_decode_ratio,
  stop at ``</s>``);
- ``beam``: ``S2STransformerBeamSearcher`` with the CTC prefix scorer (the frame mean of the
  models' CTC posteriors) and the TransformerLM, with the settings of the held-out speaker's
  hparams file (its ``test_search``: beam 66, CTC 0.4, LM 0.6, temperature 1.15 in the SA
  project's yaml), each overridable here.

The baselines are decoded by the same search: ``sa_self`` (the held-out speaker's own SA model
alone: with beam + LM it is the SA pipeline's own test decode of that speaker), and with ``cross``
each teacher alone, ``mean`` (the teachers' probabilities averaged per step) and their
``majority_vote``.

Usage (from recipes/UASpeech/logit_kd; the fold's output folder is train.py's)::

    python decode.py results/logit_kd/M08_same_level_matched_transformer/1986 \\
        --models M08=/exp/M08/hyperparams.yaml:/exp/M08/save \\
        --speaker_csv=/data/csv/M08.csv --data_root=/data/UASpeech [--search greedy beam]
        [--lm_file=/exp/M08/save/lm.ckpt | --lm_file=none] [--beam_size=66] [--ctc_weight=0.4]
        [--lm_weight=0.6] [--temperature=1.15] [--lm_temperature=1.15] [--device=cuda] [--force]

``--models`` takes every test-stream model (the held-out speaker's for matched/self, the teachers'
for cross; the held-out speaker's one too for the ``sa_self`` baseline), as extract_logits.py
does; the LM defaults to the ``lm.ckpt`` of the held-out (or first) model's save folder. Writes
``wer_test_<search>.txt`` (student) and ``wer_test_<search>_<system>.txt`` (baselines) in the
SpeechBrain ``ErrorRateStats`` format, and a ``free_running`` block (with how each figure was
decoded) into ``test_results.json``. A search already in it is not redone without ``--force``.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from local.console import RULE
from local.corpus import parse_utterance_id, word_category
from local.distributed import RunError
from local.files import write_json
from local.free_running import (
    StreamDecoder,
    StreamIdentity,
    build_searcher,
    describe,
    same_frames,
    search_settings,
)
from local.fusion import MeanFusion
from local.run_folder import OutputLock
from local.sa_models import (
    BOS,
    EOS,
    ExtractionError,
    SAModel,
    load_language_model,
    load_model_hparams,
    parse_model_arg,
    read_speaker_csv,
    read_wav,
    set_tf32,
)
from local.scoring import SystemScores, majority_vote, results_table
from local.store import LogitStoreError, load_tokenizer

logger = logging.getLogger("decode")
SEARCHES = ("greedy", "beam")


class DecodeError(RuntimeError):
    """Bad input or options; the message names the file, the model or the option."""


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
    return student.eval()


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


def systems_of(info, models, student):
    """name -> StreamDecoder of every system this fold decodes."""
    held_out, teachers = info["held_out"], info["teachers"]
    streams = test_stream_models(info, models)
    systems = {"student": StreamDecoder([models[m] for m in streams], student)}
    if held_out in models:
        systems["sa_self"] = StreamDecoder([models[held_out]], StreamIdentity())
    else:
        logger.info("no model of %s given: no sa_self baseline", held_out)
    if info["input_streams"] == "cross":
        systems["mean"] = StreamDecoder([models[m] for m in teachers], MeanFusion())
        for m in teachers:
            systems[f"teacher_{m}"] = StreamDecoder([models[m]], StreamIdentity())
    return systems


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold_folder", help="train.py's output folder of the fold (test_results.json, save/)")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=HPARAMS.yaml:CKPT")
    parser.add_argument("--speaker_csv", required=True, help="the held-out speaker's SpeechBrain CSV")
    parser.add_argument("--data_root", help="replaces $data_root in the CSV's wav column")
    parser.add_argument("--search", nargs="+", choices=SEARCHES, default=list(SEARCHES))
    parser.add_argument(
        "--lm_file", help="TransformerLM checkpoint (default: lm.ckpt of the model's save folder); none"
    )
    for key, kind in (
        ("beam_size", int),
        ("ctc_weight", float),
        ("lm_weight", float),
        ("temperature", float),
        ("lm_temperature", float),
    ):
        parser.add_argument(f"--{key}", type=kind, help="default: the held-out speaker's hparams file (test_search)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--force", action="store_true", help="redo a search already in test_results.json")
    return parser


def check_options(args, settings):
    for key in ("beam_size", "ctc_weight", "lm_weight", "temperature", "lm_temperature"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if settings["beam_size"] < 1:
        raise DecodeError(f"--beam_size={settings['beam_size']} is not allowed: it must be at least 1")
    for key in ("ctc_weight", "lm_weight"):
        if not 0.0 <= settings[key] <= 1.0:
            raise DecodeError(f"--{key}={settings[key]} is not allowed: it must be in [0, 1]")
    if settings["ctc_weight"] >= 1.0:
        raise DecodeError("--ctc_weight=1.0 is not allowed: the decoder (and the student) would not be used")
    for key in ("temperature", "lm_temperature"):
        if settings[key] <= 0:
            raise DecodeError(f"--{key}={settings[key]} is not allowed: it must be > 0")
    return settings


def run(args):
    info, fold_hparams = read_fold(args.fold_folder)
    folder = Path(args.fold_folder)
    done = [s for s in args.search if s in info.get("free_running", {})]
    if done and not args.force:
        raise DecodeError(
            f"{folder / 'test_results.json'} already has the {' and '.join(done)} search(es): --force redoes them"
        )
    specs = dict(parse_model_arg(m) for m in args.models)
    test_stream_models(info, specs)
    for name, spec in specs.items():
        if not Path(spec.hparams).is_file():
            raise DecodeError(f"model {name}: hparams file {spec.hparams} does not exist")
        if not Path(spec.checkpoint).exists():
            raise DecodeError(f"model {name}: checkpoint {spec.checkpoint} does not exist")
    anchor = specs.get(info["held_out"]) or next(iter(specs.values()))
    settings, source = search_settings(anchor.hparams)
    settings = check_options(args, settings)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(info["tokenizer_file"])
    utts = read_speaker_csv(args.speaker_csv, info["held_out"], args.data_root)
    lm_file = args.lm_file
    if lm_file is None:
        candidate = Path(anchor.checkpoint) / "lm.ckpt"
        candidate = candidate if candidate.exists() else Path(anchor.checkpoint).parent / "lm.ckpt"
        lm_file = str(candidate) if candidate.exists() else "none"
    if "beam" in args.search and settings["lm_weight"] > 0 and lm_file == "none":
        raise DecodeError(
            "the beam search has lm_weight > 0 but no language model: give --lm_file=PATH, or --lm_weight=0 "
            "(then its figures are not comparable with an LM decode)"
        )
    try:
        lock = OutputLock(folder).acquire()
    except RunError as err:  # its advice (another --output_folder) is train.py's
        raise DecodeError(str(err).split("; ")[0] + ": wait for it to finish") from None
    try:
        set_tf32(False)  # as the SA models' fork computed (SpeechBrain 1.1.2 turns TF32 on)
        models = {}
        for name, spec in specs.items():
            models[name] = SAModel(name, spec.hparams, spec.checkpoint, spec.overrides, device=device)
            if models[name].vocab_size != tokenizer.vocab_size():
                raise DecodeError(
                    f"model {name} has {models[name].vocab_size} outputs, the fold's tokenizer "
                    f"{info['tokenizer_file']} {tokenizer.vocab_size()} pieces"
                )
            logger.info("model %s: %s (%s)", name, models[name].ckpt_dir, models[name].ckpt_how)
        rates = {m.sample_rate for m in models.values()}
        if len(rates) > 1:
            raise DecodeError(
                f"the models expect different sample rates ({sorted(map(str, rates))}): one audio cannot feed them"
            )
        student = load_student(fold_hparams, folder / "save", tokenizer.vocab_size()).to(device)
        systems = systems_of(info, models, student)
        lm = None
        if "beam" in args.search and settings["lm_weight"] > 0:
            lm = load_language_model(anchor.hparams, lm_file, device)
            logger.info("language model: %s", lm_file)
        searchers = {
            (search, name): build_searcher(search, decoder, settings, BOS, EOS, lm).to(device)
            for search in args.search
            for name, decoder in systems.items()
        }
        scores = {key: SystemScores(tokenizer) for key in searchers}
        seconds = dict.fromkeys(args.search, 0.0)  # per search, its systems included; encoding apart
        start = time.time()
        for i, utt in enumerate(utts):
            wav = read_wav(utt, models[next(iter(models))])
            encoded = {name: model.encode(wav) for name, model in models.items()}
            try:
                same_frames(encoded, f"utterance {utt.id}")
            except ValueError as err:
                raise DecodeError(str(err)) from None
            parts = parse_utterance_id(utt.id)
            group = ([utt.id], [utt.word], [word_category(parts["word"])], [parts["mic"]])
            for (search, name), searcher in searchers.items():
                decoder = systems[name]
                enc = torch.cat([encoded[m.name] for m in decoder.models], -1)
                tick = time.time()
                with torch.no_grad():
                    hyps = searcher(enc, torch.ones(1, device=enc.device))[0]
                seconds[search] += time.time() - tick
                scores[(search, name)].append_ids(group[0], [list(hyps[0])], *group[1:])
            if (i + 1) % 50 == 0:
                logger.info("%d/%d utterances (%.1f s)", i + 1, len(utts), time.time() - start)
        results, wer_files = dict(info.get("free_running", {})), dict(info.get("wer_files", {}))
        for search in args.search:
            # --force: the files of the search being redone go, so that none of another run stays listed
            for old in [f for f in wer_files if f == f"wer_test_{search}.txt" or f.startswith(f"wer_test_{search}_")]:
                (folder / old).unlink(missing_ok=True)
                del wer_files[old]
            by_system = {name: scores[(search, name)] for name in systems}
            if info["input_streams"] == "cross":
                teachers = {n: s for n, s in by_system.items() if n.startswith("teacher_")}
                accuracy = {f"teacher_{m}": a for m, a in info.get("teacher_accuracy", {}).items()}
                by_system["majority_vote"], _ = majority_vote(teachers, tokenizer, accuracy)
            decoding = describe(search, settings, lm)
            for name, system in by_system.items():
                file = f"wer_test_{search}.txt" if name == "student" else f"wer_test_{search}_{name}.txt"
                system.write_stats(folder / file)
                wer_files[file] = {"system": name, "decoding": decoding}
            results[search] = {
                "decoding": decoding,
                "settings": dict(settings)
                if search == "beam"
                else {k: settings[k] for k in ("min_decode_ratio", "max_decode_ratio")},
                "settings_from": dict(source),
                "lm_file": str(lm_file) if search == "beam" and lm is not None else None,
                "models": {m.name: str(m.ckpt_dir) for m in models.values()},
                "systems_decoded": len(systems),
                "search_seconds": round(seconds[search], 1),  # all its systems, encoders not included
                "utterances_per_second": round(len(utts) / max(seconds[search], 1e-9), 3),
                "systems": {name: system.summary() for name, system in by_system.items()},
            }
        write_json(folder / "test_results.json", {**info, "wer_files": wer_files, "free_running": results})
    finally:
        lock.release()
    lines = [RULE, f"fold {info['held_out']}: free-running decodes of its audio ({len(utts)} utterances)"]
    for search in args.search:
        lines += [f"{search}: {results[search]['decoding']}", results_table(results[search]["systems"])]
    lines += [f"results: {folder.resolve()} (test_results.json: free_running; wer_test_<search>*.txt)", RULE]
    print("\n".join(lines), flush=True)
    return 0


def main(argv=None):
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DecodeError, ExtractionError, LogitStoreError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
