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
beside the real ones, the same tolerances, every statistic outside its tolerance marked.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from local import cpu_kernels  # noqa: F401  first: it pins the CPU math libraries' code paths before torch loads

# isort: split
from local.calibration import STATISTICS, FirstPiece, real_decodes, speaker_statistics, tree_decodes
from local.corpus import HELD_OUT, SPEAKERS
from local.files import write_json
from local.folds import teacher_speakers
from local.store import load_tokenizer
from local.synthetic import DEMO_SEED, ensure_demo_tree
from local.tables import markdown_table

RECIPE = Path(__file__).resolve().parent
REAL = RECIPE / "docs" / "calibration_real.json"
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


def real_statistics(cross_testing, tokenizer_file, speakers=FOLDS):
    """The statistics of a cross-testing folder (``<MODEL>/wer_<SPK>.txt``) for ``speakers``;
    ValueError (one line) when it lacks one of their decodes or its files are unreadable."""
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
    sp = load_tokenizer(tokenizer_file)
    decodes = real_decodes(files)
    words = {ref for pair in decodes.values() for _, ref in pair.values()}
    # The learned-confusion fusion learns on the fold models' decodes of the teacher speakers' audio:
    # a folder with only the held-out speakers' decodes (a cross stage run with --cross_speakers)
    # gives the other statistics, not the fusion's (nor the oracle, reported beside it).
    decoded = {spk for _, spk in decodes}
    return {
        speaker: speaker_statistics(
            decodes, speaker, words, FirstPiece(sp), fusion=set(teacher_speakers(speaker, "all_others")) <= decoded
        )
        for speaker in speakers
    }


def demo_statistics(tree, seed=DEMO_SEED):
    """The statistics of a demo tree (generated or extended under ``tree`` with every model on every
    other speaker's audio: the four held-out speakers' decodes, and the teacher speakers' on which
    the confusion fusion learns)."""
    pairs = [(m, s) for s in SPEAKERS for m in SPEAKERS if m != s]
    logit_root, tokenizer_file, _ = ensure_demo_tree(tree, seed=seed, pairs=pairs)
    sp = load_tokenizer(tokenizer_file)
    decodes = tree_decodes(logit_root, sp, pairs)
    words = {ref for pair in decodes.values() for _, ref in pair.values()}
    return {speaker: speaker_statistics(decodes, speaker, words, FirstPiece(sp)) for speaker in FOLDS}


def comparison(demo, real):
    """Rows (speaker, statistic, demo, real, difference, tolerance, within) and whether all hold
    (the speakers and statistics ``demo`` has)."""
    rows, ok = [], True
    for speaker in [s for s in FOLDS if s in demo]:
        for name in [n for n in STATISTICS if n in demo[speaker]]:
            d, r = demo[speaker][name], real[speaker][name]
            within = abs(d - r) <= TOLERANCE[name]
            ok &= within
            rows.append((speaker, name, d, r, d - r, TOLERANCE[name], within))
    return rows, ok


def table(rows, label="demo"):
    """One row per statistic: demo and real per held-out speaker, the tolerance; a statistic out of
    its tolerance is marked with ✗."""

    def fmt(value, name):
        return f"{value:.2f}" if name == "phi" else f"{value:.1f}"

    cells = {(s, n): (d, r, w) for s, n, d, r, _, _, w in rows}
    speakers = [s for s in FOLDS if any(k[0] == s for k in cells)]
    header = ["statistic", *(f"{s} {label} / real" for s in speakers), "tolerance"]
    body = []
    for name in [n for n in STATISTICS if any(k[1] == n for k in cells)]:
        line = [name]
        for speaker in speakers:
            d, r, within = cells[(speaker, name)]
            line.append(f"{fmt(d, name)} / {fmt(r, name)}" + ("" if within else " ✗"))
        body.append(line + [f"± {fmt(TOLERANCE[name], name)}"])
    return markdown_table(header, body, right=list(range(1, len(header))))


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
            demo = real_statistics(args.rehearsal, args.tokenizer_file, args.speakers)
        except ValueError as err:
            print(f"ERROR: {err}", file=sys.stderr)
            return 1
    else:
        with tempfile.TemporaryDirectory() as tmp:
            demo = demo_statistics(Path(args.tree) if args.tree else Path(tmp) / "demo_data", seed=args.seed)
    rows, ok = comparison(demo, real)
    text = table(rows, "rehearsal" if args.rehearsal else "demo")
    print(text)
    print("\nevery statistic within its tolerance" if ok else "\nNOT every statistic within its tolerance")
    if args.out:
        out = Path(args.out)
        side = "rehearsal" if args.rehearsal else "demo"
        write_json(out / "calibration.json", {side: demo, "real": real, "tolerance": TOLERANCE, "ok": ok})
        (out / "calibration.md").write_text(text + "\n", encoding="utf-8")
    # The demo tree is tuned to the real statistics: out of tolerance is a failure. The rehearsal
    # corpus is not tuned to them (its speech is what it is): its distance is a finding, reported.
    return 0 if ok or args.rehearsal else 1


if __name__ == "__main__":
    sys.exit(main())
