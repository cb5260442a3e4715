#!/usr/bin/env python3
"""Build the rehearsal corpus: SYNTHETIC speech shaped like UASpeech (NOT UASpeech recordings), SA
models trained on it the SA pipeline's way, and every input of this recipe made by its own jobs.

One command runs every stage in order; ``--stage`` runs one (docs/rehearsal.md says what each
makes and how long it took here):

- ``audio``: every speaker's B1, B2 and B3 words spoken by a Debian synthesizer voice (espeak-ng
  or festival), changed by simulated dysarthria of the speaker's severity, recorded on two
  simulated microphones; SpeechBrain CSVs per speaker and block; ``corpus.json``.
- ``models``: a TransformerLM on the word list, a speaker-independent TransformerASR (joint
  CTC/attention) on every speaker's B1+B2, then one speaker-adapted copy per speaker (its B1,
  selection on its B2), each an SA experiment folder under ``<corpus>/models/<SPK>``.
- ``logits``: ``extract_logits.py``, every model on every speaker's B3 -> ``<corpus>/logit_extraction``.
- ``cross``: every model's beam search + CTC + LM decode of every other speaker's B3 ->
  ``<corpus>/cross_testing/<MODEL>/wer_<SPK>.txt``.
- ``audio_check`` (not part of ``all``): listening proxies of the audio, after checking that every
  recording the CSVs list is there and as long as its CSV says.

Deterministic for a seed; a killed build resumes where it stopped when run again; each stage prints
its time and size (kept in ``corpus.json``). A missing synthesizer or voice stops with one line
naming the Debian package; every option is checked before anything is written (the tokenizer is
loaded, ``--device`` checked as the stages check it, a damaged ``corpus.json`` named). The stages
after ``audio`` need a finished audio stage of a rehearsal corpus in the folder; logits and cross
take only finished models of this corpus and tokenizer (``local/rehearsal_build.py``). One lock
(``<corpus>/.lock``) is held for the whole command: a second command into the corpus is refused.

Usage (from recipes/UASpeech/logit_kd)::

    python make_rehearsal.py --corpus rehearsal_data/full --metadata_dir /data/uaspeech/metadata \\
        --tokenizer_file /data/uaspeech/sa_tokenizer.model
    python make_rehearsal.py --corpus rehearsal_data/tiny --preset tiny --tokenizer_file ... --jobs 1
    python make_rehearsal.py --corpus rehearsal_data/full --stage audio_check

Without ``--metadata_dir`` (the real ``<SPK>_metadata.json`` files) the B3 words are the demo
tree's word list, and the log and ``corpus.json`` say so.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from local import cpu_kernels  # first: the CPU math libraries' paths, before torch loads
from local.rehearsal_audio import DEFAULT_HPARAMS, CorpusLock, RehearsalError, build_audio, listen_report

STAGES = ("audio", "models", "logits", "cross")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="folder of the corpus (made if absent)")
    parser.add_argument(
        "--stage", choices=("all", *STAGES, "audio_check"), default="all", help="what to build (default: all)"
    )
    parser.add_argument("--preset", default="full", help="full (default) or tiny (three speakers, 20 words)")
    parser.add_argument("--hparams", default=str(DEFAULT_HPARAMS), help="the corpus's audio hparams (rehearsal.yaml)")
    parser.add_argument("--seed", type=int, help="replaces the hparams files' seeds")
    parser.add_argument("--metadata_dir", help="folder of the real <SPK>_metadata.json files: the B3 words")
    parser.add_argument(
        "--tokenizer_file", help="the SA models' SentencePiece model (a file path): every stage but audio"
    )
    parser.add_argument("--models_dir", help="where the SA models go (default: <corpus>/models)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the models stage (default: --jobs)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--extract_batch", type=int, default=16, help="utterances per forward pass of extraction")
    parser.add_argument("--cross_beam", type=int, default=8, help="beam of the cross-testing decodes (SA: 66)")
    parser.add_argument(
        "--cross_speakers",
        nargs="+",
        metavar="SPK",
        help="cross stage: decode these speakers' audio only (default: every speaker's; the folds need "
        "M08 M05 M16 M01)",
    )
    parser.add_argument("--cross_batch", type=int, default=16, help="utterances per batch of those decodes")
    parser.add_argument("--noprogressbar", action="store_true", help="no progress bars")
    return parser


def check_options(args):
    """RehearsalError (one line naming the option) before anything is written."""
    for key in ("jobs", "extract_batch", "cross_beam", "cross_batch"):
        if getattr(args, key) < 1:
            raise RehearsalError(f"--{key}={getattr(args, key)} is not allowed: it must be an integer >= 1")
    if args.threads is not None and args.threads < 1:
        raise RehearsalError(f"--threads={args.threads} is not allowed: it must be an integer >= 1")
    stages = STAGES if args.stage == "all" else (args.stage,)
    if any(s != "audio" and s != "audio_check" for s in stages):
        if not args.tokenizer_file:
            raise RehearsalError("--tokenizer_file is needed for the models, logits and cross stages")
        if not Path(args.tokenizer_file).is_file():
            raise RehearsalError(f"--tokenizer_file={args.tokenizer_file} is not allowed: no such file")
    if args.cross_speakers and "cross" in stages:
        # the corpus's speakers (or, before its audio exists, the preset's): known now, not after
        # the hours the earlier stages take
        from local.rehearsal_audio import load_settings

        csv = Path(args.corpus) / "csv"
        if csv.is_dir():
            known = sorted(p.stem for p in csv.glob("*.csv") if "_" not in p.stem)
        else:
            known = load_settings(args.hparams or DEFAULT_HPARAMS, args.preset, args.seed)["speakers"]
        unknown = [s for s in args.cross_speakers if s not in known]
        if unknown:
            raise RehearsalError(
                f"--cross_speakers: {', '.join(unknown)} not among the corpus's speakers ({', '.join(known)})"
            )
    if "models" in stages:  # the models stage's own check, before any stage runs
        from local.rehearsal_models import check_device as check_models_device

        check_models_device(args.device, args.threads)
    if any(s in ("logits", "cross") for s in stages):
        from local.sa_models import ExtractionError, check_device

        try:
            check_device(args.device)
        except ExtractionError as err:
            raise RehearsalError(str(err)) from None
    if args.tokenizer_file and any(s not in ("audio", "audio_check") for s in stages):
        from local.store import LogitStoreError, load_tokenizer

        try:  # loaded now, not after the hours of the audio stage
            load_tokenizer(args.tokenizer_file)
        except LogitStoreError as err:
            raise RehearsalError(f"--tokenizer_file={args.tokenizer_file} is not allowed: {err}") from None
    return stages


def check_corpus(args, stages):
    """The corpus folder before anything is written: its ``corpus.json`` readable when present;
    with the audio stage, the audio stage's own checks (settings, words, voices, the folder); without
    it, a finished audio stage of a rehearsal corpus there."""
    from local.rehearsal_audio import MANIFEST, check_corpus_folder, prepare
    from local.rehearsal_build import check_audio_stage, read_json_file

    corpus = Path(args.corpus)
    check_corpus_folder(corpus)
    if (corpus / MANIFEST).is_file():
        read_json_file(corpus / MANIFEST, "the corpus's manifest")
    if "audio" in stages:
        prepare(corpus, args.hparams, args.preset, args.seed, args.metadata_dir)
    else:
        check_audio_stage(corpus)


def check_recordings(corpus):
    """``--stage audio_check``: every recording the corpus's CSVs list is there, whole and at least
    as long as the duration its CSV gives; RehearsalError (one line naming the first) otherwise."""
    import csv as csv_module

    from local.rehearsal_audio import wav_frames
    from local.rehearsal_build import check_audio_stage

    corpus = Path(corpus)
    rate = check_audio_stage(corpus).get("sample_rate", 16000)
    files = sorted((corpus / "csv").glob("*_B?.csv"))
    if not files:
        raise RehearsalError(f"{corpus / 'csv'} holds no <SPK>_B<n>.csv: build the audio stage first")
    for path in files:
        with open(path, encoding="utf-8", newline="") as handle:
            for row in csv_module.DictReader(handle):
                wav = Path(row["wav"].replace("$data_root", str(corpus)))
                frames = wav_frames(wav, rate)
                if frames is None:
                    raise RehearsalError(f"{path.name}, utterance {row['ID']}: recording {wav} is missing or not whole")
                if frames / rate < float(row["duration"]) - 1.0 / rate:
                    raise RehearsalError(
                        f"{path.name}, utterance {row['ID']}: recording {wav} is {frames / rate:.3f} s long, shorter "
                        f"than the {float(row['duration']):.3f} s the CSV gives (truncated?)"
                    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    from local.files import DiskFullError
    from local.rehearsal_build import AlreadyReported
    from local.sa_models import ExtractionError
    from local.synthesizers import SynthesizerError
    from local.word_list import WordListError

    progress = not args.noprogressbar
    models_dir = Path(args.models_dir or Path(args.corpus) / "models")
    started = time.monotonic()
    lock = None
    try:
        stages = check_options(args)
        if args.stage == "audio_check":
            check_recordings(args.corpus)
            listen_report(args.corpus)
            return 0
        check_corpus(args, stages)
        # one lock for the whole command: a second build into this corpus is refused, whatever its stages
        lock = CorpusLock(args.corpus)
        lock.__enter__()
        for stage in stages:
            if stage != "audio":
                from local.rehearsal_build import check_audio_stage

                check_audio_stage(args.corpus)
            if stage == "audio":
                build_audio(
                    args.corpus,
                    hparams_file=args.hparams,
                    preset=args.preset,
                    seed=args.seed,
                    metadata_dir=args.metadata_dir,
                    jobs=args.jobs,
                    progress=progress,
                )
            elif stage == "models":
                from local.rehearsal_build import record_stage
                from local.rehearsal_models import train_models

                t0 = time.monotonic()
                manifest = train_models(
                    args.corpus,
                    models_dir,
                    args.tokenizer_file,
                    preset=args.preset,
                    device=args.device,
                    threads=args.threads or args.jobs,
                    seed=args.seed,
                    progressbar=progress,
                )
                from local.rehearsal_build import folder_size

                size, files = folder_size(models_dir)
                record_stage(
                    args.corpus,
                    "models",
                    {
                        "seconds": round(time.monotonic() - t0, 1),
                        "bytes": size,
                        "files": files,
                        "folder": str(models_dir),
                        # a resumed stage skips finished models: their training time is in the manifest
                        "trained_seconds": round(sum(r["seconds"] for r in manifest["models"].values()), 1),
                        "trained_cpu_seconds": round(
                            sum(r.get("cpu_seconds", 0) for r in manifest["models"].values()), 1
                        ),
                    },
                )
                print(f"models stage: {time.monotonic() - t0:.1f} s, {size / 1e6:.1f} MB -> {models_dir}")
                del manifest
            elif stage == "logits":
                from local.rehearsal_build import extract

                extract(args.corpus, models_dir, args.tokenizer_file, args.extract_batch, args.device)
            elif stage == "cross":
                from local.rehearsal_build import cross_decodes

                cross_decodes(
                    args.corpus,
                    models_dir,
                    args.tokenizer_file,
                    beam_size=args.cross_beam,
                    batch_size=args.cross_batch,
                    audio_speakers=args.cross_speakers,
                    jobs=args.jobs,
                    device=args.device,
                    progress=progress,
                )
    except AlreadyReported:  # its one line is on the console already
        return 1
    except (RehearsalError, SynthesizerError, WordListError, DiskFullError, ExtractionError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"ERROR: {err.filename}: not found (build the earlier stages first?)", file=sys.stderr)
        return 1
    else:
        if len(stages) > 1:
            from local.rehearsal_build import record_stage, stage_table

            record_stage(
                args.corpus,
                "all",
                {"seconds": round(time.monotonic() - started, 1), "cpu_kernels": cpu_kernels.describe()},
            )
            print(stage_table(args.corpus))
            print(f"rehearsal corpus built in {time.monotonic() - started:.0f} s (this command) -> {args.corpus}")
        return 0
    finally:
        if lock is not None and lock.handle is not None:
            lock.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
