"""What a run shows on the console: a closing block with the answer.

SpeechBrain keeps its progress bars and its log file (``log.txt`` has everything); the console
ends with a short block read back from the ``test_results.json`` the run wrote: synthetic or real
data, the fold, the setting, how it was decoded, the student and its baselines, and where the
results are.
"""

import argparse
import json
import sys
from pathlib import Path

from local import data_kind
from local.corpus import intelligibility_group
from local.options import describe_choice
from local.scoring import results_table

RULE = "=" * 78


def setting(input_streams):
    """One line on what the student reads at test time, for the block and the tables' captions."""
    if input_streams == "cross":
        return "cross: other speakers' SA models only (the unseen-speaker setting)"
    return (
        f"{input_streams}: reads the held-out speaker's OWN speaker-adaptive model, adapted on that "
        f"speaker's other recordings: not a speaker-independent figure (cross is)"
    )


def closing_block(results_file, seconds=None):
    """The lines that end a run, from the results file it wrote (and its wall time, when given)."""
    results_file = Path(results_file)
    info = json.loads(results_file.read_text(encoding="utf-8"))
    kind = {
        data_kind.DEMO: "SYNTHETIC demo data: the figures only show that the recipe runs",
        data_kind.REHEARSAL: "rehearsal corpus: SYNTHETIC speech, real models (not UASpeech)",
        data_kind.REAL: "real logits",
    }[data_kind.of_info(info)]
    systems = {"student": info["student"], **info.get("baselines", {})}
    lines = [RULE]
    if info.get("partial"):
        lines.append(f"PARTIAL RUN: {info['partial']}: not the fold's figures")
    lines += [
        f"fold {info['held_out']} ({intelligibility_group(info['held_out'])} intelligibility), {kind}",
        f"teachers: {len(info['teachers'])} ({info['teacher_set']}); fusion {info['fusion']}; "
        f"best checkpoint: epoch {info['epoch_loaded']}",
        f"setting: {setting(info['input_streams'])}",
        *(
            [
                f"options chosen for {info['teacher_set']} teachers (--matched_choice=false: as written): "
                + describe_choice(info["matched_choice"])
            ]
            if info.get("matched_choice")
            else []
        ),
        f"decoding: {info['decoding']}; not comparable with decodes of the audio (beam search + CTC + LM)",
        results_table(systems),
    ]
    for system, decoders in info.get("free_running_ctc", {}).items():
        for decoder, r in decoders.items():
            lines.append(f"free-running CTC ({decoder}) of {system}: WER {r['WER']:.2f}, WRA {r['WRA']:.2f}")
    lines.append(f"results: {results_file.parent.resolve()} (test_results.json, wer_test*.txt, log.txt)")
    if seconds is not None:
        lines.append(f"wall time: {seconds:.0f} s (this command, from its start)")
    lines.append(RULE)
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one ``ERROR:`` line (exit status 2), like the recipe's own errors,
    rather than the usage text and a second line."""

    def error(self, message):
        sys.stderr.write(f"ERROR: {message} (--help lists the options)\n")
        sys.exit(2)
