"""Fold files: a small yaml that names the shared base and the keys it changes.

    # hparams/fold_M01.yaml
    base_yaml: logit_kd.yaml
    held_out: M01
    teacher_set: all_others

The fold's keys and then the command line's are applied as overrides onto the base, so every key
of the base can be overridden at the top level (``--temperature=2.0``) and a mistyped key is an
error, not a silently ignored setting. A file without ``base_yaml`` is loaded as a plain hparams file.
"""

import os

import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml
from hyperpyyaml.core import recursive_update


class HparamsError(ValueError):
    """A fold file or an override that does not fit the base hparams."""


def load_fold_hparams(hparams_file, cli_overrides=""):
    """Returns (base_file, overrides dict, hparams dict)."""
    yaml = ruamel.yaml.YAML()
    with open(hparams_file, encoding="utf-8") as f:
        fold = yaml.load(f) or {}
    cli = yaml.load(cli_overrides) if cli_overrides else None
    if "base_yaml" not in fold:
        base, overrides = hparams_file, dict(cli or {})
    else:
        base = os.path.join(os.path.dirname(os.path.abspath(hparams_file)), fold.pop("base_yaml"))
        overrides = dict(fold)
        if cli:
            recursive_update(overrides, dict(cli))  # the command line wins over the fold file
    with open(base, encoding="utf-8") as f:
        try:
            hparams = load_hyperpyyaml(f, overrides)
        except KeyError as err:
            raise HparamsError(f"{err.args[0] if err.args else err} (fold file {hparams_file}, base {base})") from None
    return base, overrides, hparams
