#!/usr/bin/env python3
"""Build the rehearsal corpus: SYNTHETIC speech shaped like UASpeech (NOT UASpeech recordings).

Stages (this version has the audio only; docs/rehearsal.md describes the corpus):

- ``audio``: every speaker's B1, B2 and B3 words spoken by a Debian synthesizer voice (espeak-ng
  or festival), changed by simulated dysarthria of the speaker's severity, recorded on two or more
  simulated microphones; SpeechBrain CSVs per speaker and block; ``corpus.json``.
- ``audio_check``: listening proxies of a built corpus (durations, levels, and a template
  recognizer's accuracy by speaker, which should fall with the severity).

Deterministic for a seed; a killed build resumes where it stopped when run again; it prints its
time and size. A missing synthesizer or voice stops with one line naming the Debian package.

Usage (from recipes/UASpeech/logit_kd)::

    python make_rehearsal.py --corpus rehearsal_data/full --metadata_dir /data/uaspeech/metadata
    python make_rehearsal.py --corpus rehearsal_data/tiny --preset tiny --jobs 1
    python make_rehearsal.py --corpus rehearsal_data/full --stage audio_check

Without ``--metadata_dir`` (the real ``<SPK>_metadata.json`` files) the B3 words are the demo
tree's word list, and the log and ``corpus.json`` say so.
"""

import argparse
import os
import sys

from local.rehearsal_audio import DEFAULT_HPARAMS, RehearsalError, build_audio, listen_report

STAGES = ("audio", "audio_check")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="folder of the corpus (made if absent)")
    parser.add_argument("--stage", choices=STAGES, default="audio", help="what to build (default: audio)")
    parser.add_argument("--preset", default="full", help="a preset of the hparams file: full (default) or tiny")
    parser.add_argument("--hparams", default=str(DEFAULT_HPARAMS), help="the corpus's hparams (rehearsal.yaml)")
    parser.add_argument("--seed", type=int, help="replaces the hparams file's seed")
    parser.add_argument("--metadata_dir", help="folder of the real <SPK>_metadata.json files: the B3 words")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: 2, or 1 on one core)"
    )
    parser.add_argument("--noprogressbar", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from local.files import DiskFullError
    from local.synthesizers import SynthesizerError
    from local.word_list import WordListError

    try:
        if args.stage == "audio":
            build_audio(
                args.corpus,
                hparams_file=args.hparams,
                preset=args.preset,
                seed=args.seed,
                metadata_dir=args.metadata_dir,
                jobs=args.jobs,
                progress=not args.noprogressbar,
            )
        else:
            listen_report(args.corpus)
    except (RehearsalError, SynthesizerError, WordListError, DiskFullError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"ERROR: {err.filename}: not found (build the audio stage first?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
