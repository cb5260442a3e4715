"""The demo tree is calibrated to the real SA outputs: its decodes' statistics (accuracy, error
correlation, vote gain, kinds of wrong words) stay within stated tolerances of the real files', and
the README's table is what calibrate_demo.py prints."""

import json
import subprocess
import sys

from calibrate_demo import REAL, TOLERANCE, real_statistics

from local.calibration import STATISTICS

from conftest import RECIPE, check_table


def test_demo_tree_within_tolerance_and_the_readme_table(tmp_path):
    """Against docs/calibration_real.json (written by calibrate_demo.py from the real files), so
    that the check also runs where the real files are absent."""
    assert set(TOLERANCE) == set(STATISTICS)
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(RECIPE / "calibrate_demo.py"),
            "--out",
            str(out / "calibration"),
            "--tree",
            str(tmp_path / "demo_data"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # every statistic within its tolerance
    assert "every statistic within its tolerance" in proc.stdout
    data = json.loads((out / "calibration" / "calibration.json").read_text())
    assert data["ok"] and set(data["demo"]) == {"M08", "M05", "M16", "M01"}
    check_table("calibration", out)


def test_the_committed_real_statistics_are_the_real_files(shared_uaspeech):
    computed = real_statistics(shared_uaspeech / "cross_testing", shared_uaspeech / "sa_tokenizer.model")
    committed = json.loads(REAL.read_text())["statistics"]
    assert computed == committed


def test_rehearsal_calibration_needs_every_fold_speaker_and_says_so_in_one_line(tmp_path):
    """calibrate_demo.py --rehearsal on a cross-testing folder without the four held-out speakers'
    decodes (the tiny corpus's, or a partial cross stage): one line naming what to run, exit 1."""
    import subprocess
    import sys

    from conftest import RECIPE

    folder = tmp_path / "cross_testing" / "F02"
    folder.mkdir(parents=True)
    rule = "=" * 80
    (folder / "wer_M16.txt").write_text(
        "%WER 0.00 [ 0 / 1, 0 ins, 0 del, 0 sub ]\n%SER 0.00 [ 0 / 1 ]\n"
        f"Scored 1 sentences, 0 not present in hyp.\n{rule}\nALIGNMENTS\n\nFormat:\n<utterance-id>, WER DETAILS\n"
        "<eps> ; reference  ; on ; the ; first ;  line\n  I   ;     S      ; =  ;  =  ;   S   ;   D  \n"
        f" and  ; hypothesis ; on ; the ; third ; <eps>\n{rule}\n"
        "M16_B3_D1_M5, %WER 0.00 [ 0 / 1, 0 ins, 0 del, 0 sub ]\nONE\n =  \nONE\n"
    )
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "calibrate_demo.py", "--rehearsal", str(tmp_path / "cross_testing"),
         "--tokenizer_file", str(tokenizer)],
        cwd=RECIPE, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ERROR: {tmp_path / 'cross_testing'}: fewer than two models' decodes of M08's audio (the statistics "
        "need M08, M05, M16, M01: make_rehearsal.py --cross_speakers M08 M05 M16 M01)"
    ]
