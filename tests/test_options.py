"""The recipe's options: every option of the hparams file is checked in one place, and --help
lists them with their defaults and comments."""

import subprocess
import sys

import ruamel.yaml

from local.options import CHECKS, describe_options

from conftest import RECIPE

BASE = RECIPE / "hparams" / "logit_kd.yaml"


def plain_options():
    doc = ruamel.yaml.YAML().load(BASE.read_text())
    keys = []
    for key, value in doc.items():
        tag = getattr(getattr(value, "tag", None), "value", None)
        if str(key).startswith("__") or (tag and not tag.startswith(("!ref", "!PL"))):
            continue
        keys.append(key)
    return keys


def test_every_option_of_the_hparams_file_is_checked():
    assert set(plain_options()) == set(CHECKS)


def test_help_lists_the_recipe_options_with_their_defaults():
    proc = subprocess.run(
        [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "fold_M01.yaml"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--distributed_backend" in out  # SpeechBrain's own flags first
    assert "Recipe options (logit_kd.yaml, with the values of fold_M01.yaml)" in out
    lines = out.splitlines()
    held_out = next(i for i, line in enumerate(lines) if line.strip().startswith("--held_out"))
    assert lines[held_out].split()[-1] == "M01"  # the fold's value, not the base's placeholder
    teacher_set = next(line for line in lines if line.strip().startswith("--teacher_set"))
    assert teacher_set.split()[-1] == "all_others"
    temperature = next(i for i, line in enumerate(lines) if line.strip().startswith("--temperature "))
    assert lines[temperature].split()[-1] == "3.0"
    assert "T of the KD term" in lines[temperature + 1]  # the yaml's comment
    for key in plain_options():
        assert f"--{key} " in out, key
    assert "--student" not in out and "--checkpointer" not in out  # objects, built from the options


def test_describe_options_of_a_plain_hparams_file():
    text = describe_options(BASE)
    assert "--held_out" in text and "--fusion" in text
