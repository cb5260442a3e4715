#!/usr/bin/env python3
"""Train the rehearsal corpus's SA models: a TransformerLM, a speaker-independent TransformerASR
and one speaker-adapted copy per speaker, each written as an SA experiment folder that
extract_logits.py and decode.py load as they load the user's SA models (local/rehearsal_models.py
says how; docs/rehearsal_models.md has the protocol, the sizes and the times).

Usage (from recipes/UASpeech/logit_kd)::

    python train_rehearsal_models.py --corpus=/data/rehearsal_corpus --models_dir=/data/rehearsal_models \\
        --tokenizer_file=/data/sa_tokenizer.model [--preset=full|tiny] [--speakers F02 M05 ...] \\
        [--seed=N] [--device=cpu|cuda] [--threads=2] [--noprogressbar] [--cross M08 M05 M16 M01]

The corpus is the rehearsal corpus's layout (``csv/<SPK>_B1.csv``, ``_B2``, ``_B3``: SpeechBrain CSVs
with ``$data_root`` paths; ``audio/<SPK>/<UTT_ID>.wav``). Every option and input file is checked
before anything is written (one ``ERROR:`` line, exit status 2): the ``--overrides`` values
against the preset's (local/rehearsal_models.py, check_override), the ``--cross`` speakers against
the corpus, and the checkpoint files of every finished model against the sizes and checksums its
``rehearsal_model.json`` recorded (a damaged model is refused, not skipped: delete its folder to
train it again). A killed run resumes when the same command is run again: finished models are
skipped, the others resume from their SpeechBrain checkpoints. ``--cross SPK...`` then decodes
(greedy) every speaker given with every model (SI and SA) on the speaker's B3 and prints the word
recognition accuracy table.
"""

import argparse
import logging
import sys
import warnings

from local import cpu_kernels  # noqa: F401  first: it pins the CPU math libraries' code paths before torch loads

# isort: split
from local.rehearsal_models import SI_NAME, RehearsalError, evaluate_greedy, read_presets, train_models


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="the rehearsal corpus folder (csv/, audio/)")
    parser.add_argument("--models_dir", required=True, help="where the model folders go (LM, SI, <SPK>)")
    parser.add_argument("--tokenizer_file", required=True, help="the SA SentencePiece model (a file path)")
    parser.add_argument("--preset", default="full", help=f"one of {', '.join(read_presets())} (default full)")
    parser.add_argument("--speakers", nargs="+", help="default: every speaker of the corpus")
    parser.add_argument("--seed", type=int, help="default: the preset's")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--overrides",
        default="",
        help='hparams on top of the preset, a yaml mapping: "{si: {number_of_epochs: 2}, lm: {lr: 0.003}}"',
    )
    parser.add_argument("--noprogressbar", action="store_true")
    parser.add_argument("--cross", nargs="+", metavar="SPK", help="speakers whose B3 every model decodes (greedy)")
    return parser


def parse_overrides(text):
    import ruamel.yaml

    if not text:
        return {}
    try:
        value = ruamel.yaml.YAML(typ="safe").load(text)
    except Exception as err:  # noqa: BLE001 - one line naming the option
        raise RehearsalError(f"--overrides is not a yaml mapping: {err}".splitlines()[0]) from None
    if not isinstance(value, dict):
        raise RehearsalError(f"--overrides={text!r} is not a yaml mapping")
    return value


def main(argv=None):
    args = build_parser().parse_args(argv)
    # torch's notice about SpeechBrain's masks of two types, once per model: noise on the console
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)  # SpeechBrain's INFO lines go to each model's log.txt
    logging.basicConfig(level=logging.INFO, handlers=[console], format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_overrides(args.overrides)
        if args.cross:
            unknown = [s for s in args.cross if args.speakers and s not in args.speakers]
            if unknown:
                raise RehearsalError(f"--cross {' '.join(unknown)}: not among --speakers")
        manifest = train_models(
            args.corpus,
            args.models_dir,
            args.tokenizer_file,
            preset=args.preset,
            device=args.device,
            threads=args.threads,
            speakers=args.speakers,
            seed=args.seed,
            overrides=overrides,
            progressbar=not args.noprogressbar,
            cross=args.cross,  # checked with the other options, before anything is trained
        )
        if args.cross:
            speakers = manifest["config"]["speakers"]
            models = [SI_NAME, *speakers]
            pairs = [(m, s) for m in models for s in args.cross]
            results = evaluate_greedy(
                args.models_dir, args.corpus, pairs, args.device, progressbar=not args.noprogressbar
            )
            print("greedy WRA (%) on B3, model (rows) x audio speaker (columns)")
            print("model " + " ".join(f"{s:>6}" for s in args.cross))
            for m in models:
                print(f"{m:5} " + " ".join(f"{100 * results[m][s]:6.1f}" for s in args.cross))
    except RehearsalError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
