#!/usr/bin/env python3
"""The synthetic demo tree against the real SA outputs: the statistics that decide how much an
ensemble or a student can gain (``local/calibration.py``), side by side, on the four held-out
speakers' audio decoded by the 14 other SA models.

The real statistics come from the SA project's cross-testing files (beam search + CTC + LM decodes)
and the SA tokenizer; they are written to ``docs/calibration_real.json``, which the demo side is
compared with when the real files are absent (a fresh clone, CI). The demo statistics come from a
demo tree holding every SA model on every other speaker's audio (the held-out speakers' decodes, and
the teacher speakers' ones on which the learned-confusion fusion is fitted; generated into
``--tree`` when it lacks them) and its teacher-forced greedy decodes. Each statistic must lie
within its tolerance (``TOLERANCE``) of the real one.

Usage (from recipes/UASpeech/logit_kd)::

    python calibrate_demo.py                                    # demo vs docs/calibration_real.json
    python calibrate_demo.py --seed 1                           # another demo tree than the embedded one
    python calibrate_demo.py --cross_testing ../../../../shared/uaspeech/cross_testing \\
        --tokenizer_file ../../../../shared/uaspeech/sa_tokenizer.model --write_real
    python calibrate_demo.py --rehearsal results/rehearsal_corpus/cross_testing \\
        --tokenizer_file ../../../../shared/uaspeech/sa_tokenizer.model --out results/rehearsal_calibration

``--rehearsal`` puts the rehearsal corpus's own cross-testing decodes (``make_rehearsal.py``'s
cross stage: beam search + CTC + LM, as the real files) in the demo's place: the same statistics
beside the real ones, the same tolerances, every statistic outside its tolerance marked. The folder
must be ``<corpus>/cross_testing`` of a corpus marked as rehearsal data (``REHEARSAL.json`` at its
root, ``local/data_kind.py``), and hold, for each speaker of ``--speakers``, the decodes of every
other model the corpus has (``corpus.json``'s speakers: the 14 other SA models for the full corpus);
anything else stops with one line naming the folder, the speaker and the missing models, exit 1.

A statistic that cannot be computed (phi with a single pair of models, as on the tiny corpus) is
written as null in calibration.json, shown as "–" in the table, said so below it, and never counted
as within its tolerance.

``--out`` gets calibration.json and calibration.md. A rerun may replace what this job wrote there
(calibration.json carries ``"written_by": "calibrate_demo.py"``); a path that is a file, or a
calibration.json or calibration.md written by someone else, stops with one line before anything is
computed or written.
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from local import cpu_kernels  # noqa: F401  first: it pins the CPU math libraries' code paths before torch loads

# isort: split
from local import data_kind
from local.calibration import STATISTICS, FirstPiece, real_decodes, speaker_statistics, tree_decodes
from local.corpus import HELD_OUT, SPEAKERS
from local.files import atomic_write, write_json
from local.folds import teacher_speakers
from local.store import load_tokenizer
from local.synthetic import DEMO_SEED, ensure_demo_tree
from local.tables import markdown_table

RECIPE = Path(__file__).resolve().parent
REAL = RECIPE / "docs" / "calibration_real.json"
WRITTEN_BY = "calibrate_demo.py"  # calibration.json's "written_by": what a rerun may replace
OUT_FILES = ("calibration.json", "calibration.md")
FOLDS = ("M08", "M05", "M16", "M01")
# How far each demo statistic may lie from the real one (percentage points; phi: absolute).
TOLERANCE = {
    "WRA mean": 6.0,
    "WRA best": 8.0,
    "vote - best": 4.0,
    "phi": 0.12,
    "not a list word": 12.0,
    "first piece right": 8.0,
    "oracle": 8.0,
    # a tree whose wrong words identify the reference puts these two far above the real figures,
    # and above the oracle (generator 7: 93 on M05 and 72 on M01 against 56 and 16); a test also
    # keeps them below the demo's own oracle
    "learned-confusion fusion": 8.0,
    "fusion, pieces known": 8.0,
}


def finite(statistics):
    """{speaker: {statistic: value}} with a value that could not be computed (NaN) as None."""
    return {
        speaker: {n: None if isinstance(v, float) and not math.isfinite(v) else v for n, v in stats.items()}
        for speaker, stats in statistics.items()
    }


def rehearsal_fold_models(cross_testing, speakers):
    """{speaker: the models whose decodes of its audio the rehearsal corpus of ``cross_testing``
    (``<corpus>/cross_testing``) must hold}: every other speaker of its ``corpus.json``. ValueError
    (one line) when the folder's corpus is not marked as rehearsal data, its manifest is unreadable
    or lacks one of ``speakers``."""
    from local.rehearsal_audio import MANIFEST

    folder = Path(cross_testing)
    corpus = folder.resolve().parent
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (--rehearsal takes <corpus>/cross_testing of make_rehearsal.py)")
    kind = data_kind.of_folder(folder)
    if kind != data_kind.REHEARSAL or not (corpus / data_kind.REHEARSAL_MARKER).is_file():
        raise ValueError(
            f"{folder}: not the cross_testing folder of a rehearsal corpus (no {data_kind.REHEARSAL_MARKER} at "
            f"{corpus}; its data is {data_kind.LABELS[kind]}): --rehearsal takes <corpus>/cross_testing of "
            "make_rehearsal.py"
        )
    try:
        manifest = json.loads((corpus / MANIFEST).read_text(encoding="utf-8"))
        held = [s for s in SPEAKERS if s in manifest["speakers"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{corpus / MANIFEST}: unreadable corpus manifest ({type(err).__name__}: {err})") from None
    for speaker in speakers:
        if speaker not in held:
            raise ValueError(
                f"{folder}: {speaker} is not a speaker of the rehearsal corpus ({', '.join(held) or 'none'}, "
                f"{corpus / MANIFEST}): --speakers names the held-out speakers it has"
            )
    return {speaker: [m for m in held if m != speaker] for speaker in speakers}


def real_statistics(cross_testing, tokenizer_file, speakers=FOLDS, models=None):
    """The statistics of a cross-testing folder (``<MODEL>/wer_<SPK>.txt``) for ``speakers`` (a
    statistic that cannot be computed: None); ValueError (one line) when it lacks one of their
    decodes (with ``models``, {speaker: models}: one of these models' decodes) or its files are
    unreadable."""
    from word_fusion import CrossTestingError, read_cross_testing

    try:
        files, _ = read_cross_testing(cross_testing)
    except (CrossTestingError, OSError, ValueError) as err:
        raise ValueError(str(err)) from None
    for speaker in speakers:
        if sum(1 for _, spk in files if spk == speaker) < 2:
            raise ValueError(
                f"{cross_testing}: fewer than two models' decodes of {speaker}'s audio (the statistics need "
                f"{', '.join(speakers)}: make_rehearsal.py --cross_speakers {' '.join(speakers)})"
            )
    for speaker, wanted in (models or {}).items():
        missing = [m for m in wanted if (m, speaker) not in files]
        if missing:
            raise ValueError(
                f"{cross_testing}: {speaker}'s audio lacks the decodes of {len(missing)} of the {len(wanted)} "
                f"other models of the corpus: {', '.join(missing)} (an unfinished cross stage: rerun "
                "make_rehearsal.py, it resumes)"
            )
    sp = load_tokenizer(tokenizer_file)
    decodes = real_decodes(files)
    words = {ref for pair in decodes.values() for _, ref in pair.values()}
    # The learned-confusion fusion learns on the fold models' decodes of the teacher speakers' audio:
    # a folder with only the held-out speakers' decodes (a cross stage run with --cross_speakers)
    # gives the other statistics, not the fusion's (nor the oracle, reported beside it).
    decoded = {spk for _, spk in decodes}
    return finite(
        {
            speaker: speaker_statistics(
                decodes, speaker, words, FirstPiece(sp), fusion=set(teacher_speakers(speaker, "all_others")) <= decoded
            )
            for speaker in speakers
        }
    )


def demo_statistics(tree, seed=DEMO_SEED):
    """The statistics of a demo tree (generated or extended under ``tree`` with every model on every
    other speaker's audio: the four held-out speakers' decodes, and the teacher speakers' on which
    the confusion fusion learns)."""
    pairs = [(m, s) for s in SPEAKERS for m in SPEAKERS if m != s]
    logit_root, tokenizer_file, _ = ensure_demo_tree(tree, seed=seed, pairs=pairs)
    sp = load_tokenizer(tokenizer_file)
    decodes = tree_decodes(logit_root, sp, pairs)
    words = {ref for pair in decodes.values() for _, ref in pair.values()}
    return finite({speaker: speaker_statistics(decodes, speaker, words, FirstPiece(sp)) for speaker in FOLDS})


def comparison(demo, real):
    """Rows (speaker, statistic, demo, real, difference, tolerance, within) and whether all hold
    (the speakers and statistics ``demo`` has). A value that could not be computed (None or NaN)
    gives difference and within None: not within its tolerance."""
    rows, ok = [], True
    for speaker in [s for s in FOLDS if s in demo]:
        for name in [n for n in STATISTICS if n in demo[speaker]]:
            d, r = demo[speaker][name], real[speaker][name]
            if _missing(d) or _missing(r):
                ok = False
                rows.append((speaker, name, d, r, None, TOLERANCE[name], None))
                continue
            within = abs(d - r) <= TOLERANCE[name]
            ok &= within
            rows.append((speaker, name, d, r, d - r, TOLERANCE[name], within))
    return rows, ok


def _missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


WHY_NOT = {"phi": "it needs two models that are each right on some words and wrong on others"}


def not_computed(rows, label="demo"):
    """One line per statistic that could not be computed ("" when all were)."""
    lines = []
    for speaker, name, d, r, _, _, within in rows:
        if within is None:
            side = " and ".join(x for x, v in ((label, d), ("real", r)) if _missing(v))
            why = f": {WHY_NOT[name]}" if name in WHY_NOT else ""
            lines.append(f"{speaker} {name}: could not be computed ({side}{why}); not within its tolerance")
    return "\n".join(lines)


def table(rows, label="demo"):
    """One row per statistic: demo and real per held-out speaker, the tolerance; a statistic out of
    its tolerance is marked with ✗."""

    def fmt(value, name):
        if _missing(value):
            return "–"
        return f"{value:.2f}" if name == "phi" else f"{value:.1f}"

    cells = {(s, n): (d, r, w) for s, n, d, r, _, _, w in rows}
    speakers = [s for s in FOLDS if any(k[0] == s for k in cells)]
    header = ["statistic", *(f"{s} {label} / real" for s in speakers), "tolerance"]
    body = []
    for name in [n for n in STATISTICS if any(k[1] == n for k in cells)]:
        line = [name]
        for speaker in speakers:
            d, r, within = cells[(speaker, name)]
            line.append(f"{fmt(d, name)} / {fmt(r, name)}" + ("" if within or within is None else " ✗"))
        body.append(line + [f"± {fmt(TOLERANCE[name], name)}"])
    return markdown_table(header, body, right=list(range(1, len(header))))


def check_out(out):
    """ValueError (one line) unless ``out`` is a folder to make, or one where calibration.json and
    calibration.md are absent or were written by this job (calibration.json's ``written_by``; or,
    from before that key, exactly its keys): a rerun replaces its own files, nobody else's."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder (calibration.json and calibration.md go into it)")
    parent = next((p for p in out.parents if p.exists()), None)
    if not out.exists() and parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder")
    json_file, md_file = (out / name for name in OUT_FILES)
    ours = False
    if json_file.exists():
        try:
            data = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        legacy = isinstance(data, dict) and len(set(data) & {"demo", "rehearsal"}) == 1
        legacy = legacy and set(data) - {"demo", "rehearsal"} == {"real", "tolerance", "ok"}
        ours = isinstance(data, dict) and (data.get("written_by") == WRITTEN_BY or legacy)
        if not ours:
            raise ValueError(
                f"--out {out}: {json_file} was not written by calibrate_demo.py: not overwritten (another --out)"
            )
    if md_file.exists() and not ours:
        raise ValueError(
            f"--out {out}: {md_file} without calibrate_demo.py's calibration.json beside it: not overwritten "
            "(another --out)"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cross_testing", help="the SA project's cross_testing folder (else docs/calibration_real.json)"
    )
    parser.add_argument("--tokenizer_file", help="the SA tokenizer (with --cross_testing)")
    parser.add_argument(
        "--write_real", action="store_true", help="write the real statistics to docs/calibration_real.json"
    )
    parser.add_argument("--tree", help="the demo tree to measure (default: a temporary one)")
    parser.add_argument(
        "--speakers",
        nargs="+",
        default=list(FOLDS),
        choices=FOLDS,
        help="with --rehearsal: the held-out speakers whose decodes it has (default: all four)",
    )
    parser.add_argument(
        "--rehearsal",
        help="measure this cross_testing folder of the rehearsal corpus instead of the demo tree "
        "(with --tokenizer_file)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEMO_SEED,
        help=f"the demo tree's seed (default {DEMO_SEED}, the embedded tree's): another seed shows how much "
        "the statistics vary from one demo tree to another",
    )
    parser.add_argument("--out", help="write calibration.json and calibration.md here")
    args = parser.parse_args(argv)
    if args.out:
        try:
            check_out(Path(args.out))
        except ValueError as err:
            print(f"ERROR: {err}", file=sys.stderr)
            return 1
    if args.cross_testing:
        if not args.tokenizer_file:
            parser.error("--cross_testing needs --tokenizer_file (the SA tokenizer)")
        try:
            real = real_statistics(args.cross_testing, args.tokenizer_file)
        except ValueError as err:
            print(f"ERROR: {err}", file=sys.stderr)
            return 1
        if args.write_real:
            write_json(
                REAL,
                {
                    "source": "the SA project's cross_testing files, all 14 other SA models per speaker",
                    "held_out": HELD_OUT,
                    "statistics": real,
                },
            )
    else:
        real = json.loads(REAL.read_text())["statistics"]
    if args.rehearsal:
        if not args.tokenizer_file:
            parser.error("--rehearsal needs --tokenizer_file (the SA tokenizer)")
        try:
            models = rehearsal_fold_models(args.rehearsal, args.speakers)
            demo = real_statistics(args.rehearsal, args.tokenizer_file, args.speakers, models=models)
        except ValueError as err:
            print(f"ERROR: {err}", file=sys.stderr)
            return 1
    else:
        with tempfile.TemporaryDirectory() as tmp:
            demo = demo_statistics(Path(args.tree) if args.tree else Path(tmp) / "demo_data", seed=args.seed)
    side = "rehearsal" if args.rehearsal else "demo"
    rows, ok = comparison(demo, real)
    text = table(rows, side)
    missing = not_computed(rows, side)
    print(text)
    if missing:
        print("\n" + missing)
    print("\nevery statistic within its tolerance" if ok else "\nNOT every statistic within its tolerance")
    if args.out:
        out = Path(args.out)
        record = {side: demo, "real": real, "tolerance": TOLERANCE, "ok": ok, "written_by": WRITTEN_BY}
        try:
            check_out(out)
            write_json(out / "calibration.json", record)
            atomic_write(out / "calibration.md", lambda handle: handle.write(text + "\n"))
        except (ValueError, OSError) as err:
            print(f"ERROR: {err}", file=sys.stderr)
            return 1
    # The demo tree is tuned to the real statistics: out of tolerance is a failure. The rehearsal
    # corpus is not tuned to them (its speech is what it is): its distance is a finding, reported.
    return 0 if ok or args.rehearsal else 1


if __name__ == "__main__":
    sys.exit(main())
