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
