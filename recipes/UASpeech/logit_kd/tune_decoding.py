#!/usr/bin/env python3
"""Choose each system's free-running decoding on the teacher speakers' validation audio, for
``decode.py --search chosen``.

The SA pipeline decodes with its yaml's beam settings (CTC 0.4, LM 0.6), tuned for its own models.
A fusion student, and the untrained combinations it is held against, may be served best by other
weights; this job picks, for each kind of system, the decoding with the highest WRA on the fold's
validation productions of the teacher speakers (never the held-out speaker), decoded from their
audio exactly as the test is (``local/decoding_choice.py`` says which streams read which audio).
Candidates: the greedy search, and the beam search at every pair of ``--ctc_weights`` and
``--lm_weights`` (the other beam settings from the SA hparams file or the options, as decode.py).

Usage (from recipes/UASpeech/logit_kd; the fold folder is train.py's)::

    python tune_decoding.py results/logit_kd/M08_all_others_cross_transformer/1986 \\
        --models F02=/exp/F02/hyperparams.yaml:/exp/F02/save ... \\
        --csv_folder=/data/csv --data_root=/data/UASpeech \\
        [--ctc_weights 0 0.2 0.4] [--lm_weights 0 0.3 0.6] [--beam_size=8] [--ctc_scoring=partial]
    python decode.py <the same fold folder> --models ... --speaker_csv=... --search chosen

``--models``: the teacher models (every model that reads validation audio: the teachers'; with
``matched`` each teacher speaker's own). ``--csv_folder``: a folder of SpeechBrain CSVs named
``<SPEAKER>.csv``, one per speaker whose validation audio is decoded. Writes
``<fold folder>/decoding_choice.json``: the candidates, the WRA of every system on every candidate,
the utterances, and the choice (refused when it exists, unless ``--force``; a new choice removes
the fold's ``chosen`` decoding made with the earlier one). Bad options and inputs
stop before anything is written, with one line ``ERROR: ...`` (exit status 2).
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from local import cpu_kernels  # noqa: F401  first: it pins the CPU math libraries' code paths before torch loads

# isort: split
import decode
import torch

from local.console import RULE, OneLineParser
from local.corpus import parse_utterance_id, word_category
from local.decoding_choice import (
    CHOICE_FILE,
    ChoiceError,
    Tally,
    candidates,
    choose,
    validation_streams,
    validation_utterances,
    write_choice,
)
from local.files import DiskFullError
from local.free_running import (
    CTC_SCORING,
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
from local.sa_models import (
    BOS,
    EOS,
    ExtractionError,
    SAModel,
    check_audio,
    check_device,
    load_language_model,
    parse_model_arg,
    read_speaker_csv,
    set_tf32,
)
from local.scoring import SystemScores, majority_vote, teacher_ranks
from local.store import LogitStoreError, TokenTable, load_tokenizer, read_metadata

logger = logging.getLogger("tune_decoding")
DecodeError = decode.DecodeError
DEFAULT_CTC = (0.0, 0.2, 0.4)
DEFAULT_LM = (0.0, 0.3, 0.6)


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold_folder", help="train.py's output folder of the fold")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=HPARAMS.yaml:CKPT")
    parser.add_argument("--csv_folder", required=True, help="the speakers' SpeechBrain CSVs, <SPEAKER>.csv")
    parser.add_argument("--data_root", help="replaces $data_root in the CSVs' wav column")
    parser.add_argument("--ctc_weights", nargs="+", default=[str(w) for w in DEFAULT_CTC])
    parser.add_argument("--lm_weights", nargs="+", default=[str(w) for w in DEFAULT_LM])
    parser.add_argument(
        "--lm_file", help="TransformerLM checkpoint (default: lm.ckpt of the first model's save folder)"
    )
    for key in ("beam_size", "temperature", "lm_temperature"):
        parser.add_argument(f"--{key}", help="default: the first teacher model's hparams file (test_search)")
    parser.add_argument("--ctc_scoring", choices=CTC_SCORING, default="full", help="full (default) or partial")
    parser.add_argument("--scorer_beam_scale", help="with --ctc_scoring=partial (default 2)")
    parser.add_argument(
        "--utterances_per_speaker",
        help="decode this many of each speaker's validation utterances, drawn with the fold's seed (default: all)",
    )
    parser.add_argument("--batch_size", help="utterances searched at once (default 16)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--noprogressbar", action="store_true")
    parser.add_argument("--force", action="store_true", help=f"replace an existing {CHOICE_FILE}")
    return parser


def fold_valid_fraction(hparams_file):
    """``valid_fraction`` of the fold's hyperparams.yaml (train.py's validation split)."""
    import ruamel.yaml

    try:
        with open(hparams_file, encoding="utf-8") as handle:
            value = ruamel.yaml.YAML().load(handle).get("valid_fraction")
    except (OSError, ValueError, AttributeError) as err:
        raise DecodeError(f"{hparams_file} is unreadable ({err})") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise DecodeError(f"{hparams_file}: valid_fraction is {value!r}: not the hparams file train.py wrote")
    return float(value)


def draw(ids, n, seed):
    """``n`` of ``ids`` (all when fewer), drawn with ``seed``, in their order."""
    if len(ids) <= n:
        return list(ids)
    gen = torch.Generator().manual_seed(int(seed))
    keep = set(torch.randperm(len(ids), generator=gen)[:n].tolist())
    return [u for i, u in enumerate(ids) if i in keep]


def prepare(args):
    """Every check that needs no model; the job. Nothing is written."""
    job = SimpleNamespace(args=args, folder=Path(args.fold_folder))
    job.info, job.fold_hparams = decode.read_fold(job.folder)
    info = job.info
    if (job.folder / CHOICE_FILE).exists() and not args.force:
        raise DecodeError(f"{job.folder / CHOICE_FILE} exists: --force replaces it")
    for key in ("seed", "logit_root"):
        if key not in info:
            raise DecodeError(f"{job.folder / 'test_results.json'} lacks {key}: not a results file of train.py")
    job.specs = dict(parse_model_arg(m) for m in args.models)
    job.streams = validation_streams(info)
    needed = sorted({m for models in job.streams.values() for m in models})
    missing = [m for m in needed if m not in job.specs]
    if missing:
        raise DecodeError(
            f"the fold's validation audio is read by the SA models {needed}: give {', '.join(missing)} with --models"
        )
    job.specs = {m: job.specs[m] for m in needed}
    for name, spec in job.specs.items():
        if not Path(spec.hparams).is_file():
            raise DecodeError(f"model {name}: hparams file {spec.hparams} does not exist")
        if not Path(spec.checkpoint).exists():
            raise DecodeError(f"model {name}: checkpoint {spec.checkpoint} does not exist")
    job.anchor = job.specs[needed[0]]
    settings, _ = search_settings(job.anchor.hparams)
    for key in ("beam_size", "temperature", "lm_temperature"):
        if getattr(args, key) is not None:
            settings[key] = decode.number(key, getattr(args, key), decode.NUMERIC[key])
    grid = {}
    for key, values in (("ctc_weight", args.ctc_weights), ("lm_weight", args.lm_weights)):
        grid[key] = [decode.number(key, v, decode.NUMERIC[key]) for v in values]
    job.settings = settings
    job.candidates = candidates(settings, grid["ctc_weight"], grid["lm_weight"])
    job.scale = (
        decode.number("scorer_beam_scale", args.scorer_beam_scale, decode.RUN_NUMERIC["scorer_beam_scale"])
        if args.scorer_beam_scale
        else 2.0
    )
    job.batch_size = (
        decode.number("batch_size", args.batch_size, decode.RUN_NUMERIC["batch_size"]) if args.batch_size else 16
    )
    job.device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    job.tokenizer = load_tokenizer(info["tokenizer_file"])
    tokens = TokenTable(job.tokenizer)
    # the utterances of the training audio, as the fold's store lists them (any model that reads a
    # speaker lists the same ones: train.py checks it), and the validation productions among them
    store_ids = {
        s: read_metadata(info["logit_root"], models[0], s, tokens).utt_ids for s, models in job.streams.items()
    }
    valid = validation_utterances(store_ids, fold_valid_fraction(job.fold_hparams), info["seed"])
    if args.utterances_per_speaker:
        n = decode.number("utterances_per_speaker", args.utterances_per_speaker, decode.RUN_NUMERIC["batch_size"])
        valid = {spk: draw(ids, n, info["seed"]) for spk, ids in valid.items()}
    job.groups = []
    for spk, ids in valid.items():
        if not ids:
            continue
        csv = Path(args.csv_folder) / f"{spk}.csv"
        utts = {u.id: u for u in read_speaker_csv(csv, spk, args.data_root)}
        absent = [u for u in ids if u not in utts]
        if absent:
            raise DecodeError(
                f"speaker {spk}: {csv} lacks validation utterance {absent[0]} (and {len(absent) - 1} more) of the fold"
            )
        job.groups.append((spk, job.streams[spk], [utts[u] for u in ids]))
    if not job.groups:
        raise DecodeError("the fold has no validation utterances (valid_fraction): nothing to choose on")
    for _, _, utts in job.groups:
        check_audio(utts)
    lm_weights = [c[2]["lm_weight"] for c in job.candidates if c[1] == "beam"]
    job.lm_file = None
    if any(w > 0 for w in lm_weights):
        lm_file = args.lm_file if args.lm_file is not None else decode.default_lm_file(job.anchor)
        if lm_file is None or not Path(lm_file).is_file():
            raise DecodeError(
                f"--lm_weights has a weight > 0 but there is no language model file ({lm_file}): give --lm_file=PATH"
            )
        job.lm_file = lm_file
    return job


def systems_for(info, models, names, student):
    """name -> StreamDecoder of the systems decoded on one speaker's validation audio (``names``:
    the SA models that read it)."""
    decoders = {"student": StreamDecoder([models[m] for m in names], student)}
    if info["input_streams"] == "cross":
        decoders["mean"] = StreamDecoder([models[m] for m in names], MeanFusion())
        for m in names:
            decoders[f"teacher_{m}"] = StreamDecoder([models[m]], StreamIdentity())
    else:
        decoders["sa_self"] = StreamDecoder([models[names[0]]], StreamIdentity())
    return decoders


def run(args):
    job = prepare(args)
    info = job.info
    set_tf32(False)
    models = {}
    for name, spec in job.specs.items():
        models[name] = SAModel(name, spec.hparams, spec.checkpoint, spec.overrides, device=job.device)
        if models[name].vocab_size != job.tokenizer.vocab_size():
            raise DecodeError(
                f"model {name} has {models[name].vocab_size} outputs, the fold's tokenizer "
                f"{info['tokenizer_file']} {job.tokenizer.vocab_size()} pieces"
            )
    student, student_ckpt = decode.load_student(job.fold_hparams, job.folder / "save", job.tokenizer.vocab_size())
    student = student.to(job.device)
    lm = load_language_model(job.anchor.hparams, job.lm_file, job.device) if job.lm_file else None
    names = [c[0] for c in job.candidates]
    tally, ranks = Tally(), teacher_ranks(info)
    n_total, tick = 0, time.time()
    for spk, streams, utts in job.groups:
        systems = systems_for(info, models, streams, student)
        searchers = {
            (name, system): build_searcher(
                search,
                decoder,
                settings,
                BOS,
                EOS,
                lm if settings["lm_weight"] > 0 else None,
                args.ctc_scoring,
                job.scale,
            ).to(job.device)
            for name, search, settings in job.candidates
            for system, decoder in systems.items()
        }
        samples = check_audio(utts)
        frames = {u.id: encoder_frames(samples[u.id]) for u in utts}

        def per_utterance(t, systems=systems):
            return max(
                sum(search_memory(s, d, st, t, args.ctc_scoring, job.scale).values())
                for _, s, st in job.candidates
                for d in systems.values()
            )

        hyps = {}
        for batch in plan_batches(utts, frames, job.batch_size, per_utterance, decode.default_budget(job.device)):
            try:
                out = decode_batch(batch, {m: models[m] for m in streams}, searchers, systems)
            except ValueError as err:
                raise DecodeError(str(err)) from None
            for key, by in out.items():
                for system, ids in by.items():
                    for utt, h in zip(batch, ids):
                        hyps.setdefault((key, system), {})[utt.id] = h
        for name in names:
            scores = {}
            for system in systems:
                scores[system] = SystemScores(job.tokenizer)
                for utt in utts:
                    parts = parse_utterance_id(utt.id)
                    scores[system].append_ids(
                        [utt.id],
                        [hyps[(name, system)][utt.id]],
                        [utt.word],
                        [word_category(parts["word"])],
                        [parts["mic"]],
                    )
            if info["input_streams"] == "cross":
                teachers = {s: v for s, v in scores.items() if s.startswith("teacher_")}
                scores["majority_vote"], _ = majority_vote(teachers, job.tokenizer, ranks)
            for system, s in scores.items():
                summary = s.summary()
                pooled = "single" if system.startswith("teacher_") else system
                right = round(summary["WRA"] * summary["n"] / 100)
                tally.add(name, pooled, right, summary["n"])
        n_total += len(utts)
        logger.info("speaker %s: %d validation utterances read by %s decoded", spk, len(utts), ", ".join(streams))
    systems = (
        ["student", "mean", "majority_vote", "single"] if info["input_streams"] == "cross" else ["student", "sa_self"]
    )
    wra = tally.table(names, systems)
    by_kind = {"student": "student", "mean": "mean", "single": "majority_vote" if "majority_vote" in wra else "sa_self"}
    if info["input_streams"] != "cross":
        by_kind.pop("mean")
    chosen = {}
    for kind, judged_by in by_kind.items():
        name = choose(wra[judged_by], names)
        search, settings = next((c[1], c[2]) for c in job.candidates if c[0] == name)
        chosen[kind] = {
            "candidate": name,
            "judged_by": judged_by,
            "validation_WRA": wra[judged_by][name],
            "search": search,
            "settings": settings,
            "ctc_scoring": args.ctc_scoring,
            "scorer_beam_scale": job.scale,
            "lm_file": job.lm_file if search == "beam" and settings["lm_weight"] > 0 else None,
            "decoding": describe(
                search, settings, lm if settings["lm_weight"] > 0 else None, args.ctc_scoring, job.scale
            ),
        }
    data = {
        "fold": {k: info[k] for k in ("held_out", "teachers", "input_streams")},
        "rule": (
            "each kind of system gets the candidate with the highest WRA on the teacher speakers' validation "
            "utterances (the held-out speaker's never); the single SA models by the vote's WRA with cross; "
            "ties: the candidate listed first (the SA setting, greedy, then the grid)"
        ),
        "candidates": [{"name": n, "search": s, "settings": st} for n, s, st in job.candidates],
        "validation_WRA": wra,
        "validation": {spk: {"streams": streams, "utterances": len(utts)} for spk, streams, utts in job.groups},
        "utterances": n_total,
        "utterances_per_speaker": int(args.utterances_per_speaker) if args.utterances_per_speaker else None,
        "student_checkpoint": student_ckpt,
        "models": {m.name: str(m.ckpt_dir) for m in models.values()},
        "ctc_scoring": args.ctc_scoring,
        "chosen": chosen,
        "seconds": round(time.time() - tick, 1),
    }
    write_choice(job.folder, data)
    dropped = drop_stale_decoding(job.folder)
    print_block(job, data)
    if dropped:
        print(
            f"removed the chosen decoding made with the earlier choice ({', '.join(dropped)}): run decode.py "
            f"--search chosen again",
            flush=True,
        )
    return 0


def drop_stale_decoding(folder):
    """A new choice makes the fold's ``chosen`` decoding (made with the earlier one) stale: its
    files and its block of test_results.json go, so that no figure outlives the choice it was
    decoded with. Returns the files removed."""
    from local.files import write_json

    path = Path(folder) / "test_results.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    if decode.CHOSEN not in info.get("free_running", {}):
        return []
    wer_files = dict(info.get("wer_files", {}))
    removed = decode.files_of_key(wer_files, decode.CHOSEN)
    for name in removed:
        (Path(folder) / name).unlink(missing_ok=True)
        del wer_files[name]
    free = {k: v for k, v in info["free_running"].items() if k != decode.CHOSEN}
    write_json(path, {**info, "wer_files": wer_files, "free_running": free})
    return removed


def print_block(job, data):
    wra, names = data["validation_WRA"], [c["name"] for c in data["candidates"]]
    width = max(len(n) for n in names)
    lines = [
        RULE,
        f"fold {job.info['held_out']} ({job.info['input_streams']}): each system's decoding chosen on "
        f"{data['utterances']} validation utterances of the teacher speakers",
        f"{'candidate':<{width}}  " + "  ".join(f"{s:>13}" for s in wra),
    ]
    for n in names:
        lines.append(f"{n:<{width}}  " + "  ".join(f"{wra[s][n]:13.2f}" for s in wra))
    for kind, c in data["chosen"].items():
        lines.append(f"chosen for {kind}: {c['candidate']} ({c['judged_by']} {c['validation_WRA']:.2f})")
    lines += [f"written: {(job.folder / CHOICE_FILE).resolve()}", RULE]
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
    sys.exit(main())
