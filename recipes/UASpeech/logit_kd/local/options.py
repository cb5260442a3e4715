"""The recipe's options: loading a fold file onto the shared hparams, checking every value, and
listing them for ``--help``.

A fold file is a small yaml that names the shared base and the keys it changes::

    # hparams/fold_M01.yaml
    base_yaml: logit_kd.yaml
    held_out: M01
    teacher_set: all_others

The fold's keys and then the command line's are applied as overrides onto the base, so every key
of the base can be overridden at the top level (``--temperature=2.0``) and a mistyped key is an
error (with the closest option suggested), not a silently ignored setting. A file without
``base_yaml`` is loaded as a plain hparams file.

Every plain option of the base is checked here, in one place (``CHECKS``), before anything is
built or written: a bad value stops the run with one line that names the option.
"""

import difflib
import math
import os
from pathlib import Path

import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references
from hyperpyyaml.core import recursive_update

from local.corpus import SPEAKERS
from local.distributed import RunError
from local.folds import CROSS_AUDIO, INPUT_STREAMS, TEACHER_SETS
from local.fusion import FUSIONS, MEAN_MODES
from local.kd import AGGREGATIONS
from local.run_folder import check_writable

STORE_DTYPES = ("float32", "float16", "bfloat16")


class HparamsError(ValueError):
    """A fold file, an option or a value that does not fit the recipe."""


# ----------------------------------------------------------------------------- value checks


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    """A finite int or float (not a bool): ``.inf`` and ``.nan`` are yaml floats, never settings."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low=None):
    def check(value):
        if not _is_int(value):
            return "an integer"
        if low is not None and value < low:
            return f"an integer >= {low}"
        return None

    return check


def optional(check):
    """``check``, or null."""

    def maybe(value):
        if value is None:
            return None
        problem = check(value)
        return None if problem is None else f"null or {problem}"

    return maybe


def number(low=None, high=None, low_open=False, high_open=False):
    def check(value):
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if ok:
            return None
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        return f"a finite number {lo}x{hi}" if lo or hi else "a finite number"

    return check


def choice(options):
    def check(value):
        return None if value in options else "one of " + ", ".join(str(o) for o in options)

    return check


def speakers(allow_null=False):
    def check(value):
        if value is None and allow_null:
            return None
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            return "a list of speakers, e.g. [F02,M07]" + (" (or null)" if allow_null else "")
        unknown = [s for s in value if s not in SPEAKERS]
        if unknown:
            return f"a list of UASpeech speakers ({' '.join(SPEAKERS)}); {unknown} is not"
        repeated = sorted({s for s in value if value.count(s) > 1})
        if repeated:
            return f"a list without repeats; {repeated} is repeated"
        return None

    return check


def path(allow_null=False):
    def check(value):
        if value is None and allow_null:
            return None
        return None if isinstance(value, (str, Path)) and str(value).strip() else "a path"

    return check


def model_items(value):
    """decode.py's ``--models`` items (NAME=HPARAMS.yaml:CHECKPOINT) of the ``models`` option: a
    mapping {NAME: HPARAMS.yaml:CHECKPOINT} (the command line's form: SpeechBrain's parser cuts a
    value at its "="), a list of items, or one item; None when it is none of these."""
    if isinstance(value, dict):
        items = [f"{k}={v}" for k, v in value.items() if isinstance(k, str) and isinstance(v, str)]
        return items if len(items) == len(value) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(i, str) for i in value):
        return value
    return None


def model_specs():
    """The ``models`` option: SA models whose files exist, or null."""

    def check(value):
        import re

        if value is None or value == {} or value == []:
            return None
        items = model_items(value)
        form = "a mapping {NAME: HPARAMS.yaml:CHECKPOINT, ...} (or {})"
        if not items:
            return form
        for item in items:
            match = re.fullmatch(r"([^=]+)=(.+?\.ya?ml):(.+)", item)
            if match is None:
                return f"{form}; {item.replace('=', ': ', 1)} is not one"
            for file in match.groups()[1:]:
                if not Path(file).exists():
                    return f"{form} of files that exist; {file} does not"
        return None

    return check


def searches(value):
    ok = isinstance(value, list) and value and all(v in ("greedy", "beam") for v in value)
    return None if ok and len(set(value)) == len(value) else "a list of greedy and/or beam, e.g. [greedy,beam]"


MATCHED_ITEMS = ("all", "own")
# What a per-teacher-set choice may not change: what the fold is, where it writes, and what
# decides whether a choice applies at all.
NOT_CHOOSABLE = (
    "held_out", "teacher_set", "teachers", "input_streams", "matched_choice", "matched_choices", "fusion", "seed",
    "threads", "output_folder",
    "save_folder", "train_log", "test_wer_file", "test_utterances_file", "test_results_file", "logit_root",
    "tokenizer_file", "demo_folder", "cache_folder", "valid_fraction", "exclude_speakers",
)  # fmt: skip


def matched_choices(value):
    """The ``matched_choices`` option: {teacher set: {option: value, ...}} of checked values."""
    form = "a mapping {same_level: {OPTION: VALUE, ...}, all_others: {...}}"
    if not isinstance(value, dict) or not all(k in TEACHER_SETS for k in value):
        return form
    for teacher_set, options in value.items():
        if not isinstance(options, dict):
            return f"{form}; {teacher_set}: {_show(options)} is not a mapping"
        for key, option in options.items():
            if key in NOT_CHOOSABLE or key not in CHECKS:
                return f"{form} of options a choice may change; {teacher_set}: {key} is not one"
            problem = CHECKS[key](option)
            if problem:
                return f"{form}; {teacher_set}: {key} must be {problem}"
    return None


# Every plain option of hparams/logit_kd.yaml (a test keeps this in step with the yaml).
CHECKS = {
    "seed": integer(0),
    "threads": integer(1),
    "held_out": choice(SPEAKERS),
    "teacher_set": choice(TEACHER_SETS),
    "teachers": speakers(allow_null=True),
    "exclude_speakers": speakers(),
    "valid_fraction": number(0, 1, low_open=True, high_open=True),
    "demo_folder": path(),
    "logit_root": path(),
    "tokenizer_file": path(),
    "store_dtype": choice(STORE_DTYPES),
    "precompute_features": choice((True, False)),
    "device_resident": choice((True, False)),
    "cache_folder": path(allow_null=True),
    "ctc_decode": choice((False, True, "auto")),
    "models": model_specs(),
    "speaker_csv": path(allow_null=True),
    "data_root": path(allow_null=True),
    "free_running": searches,
    "output_folder": path(),
    "save_folder": path(),
    "train_log": path(),
    "test_wer_file": path(),
    "test_utterances_file": path(),
    "test_results_file": path(),
    "input_streams": choice(INPUT_STREAMS),
    "matched_items": choice(MATCHED_ITEMS),
    "matched_choice": choice((True, False)),
    "matched_choices": matched_choices,
    "cross_audio": choice(CROSS_AUDIO),
    "target_aggregation": choice(AGGREGATIONS),
    "temperature": number(0, low_open=True),
    "alpha": number(0, 1),
    "stream_dropout": number(0, 1),
    "fusion": choice(FUSIONS),
    "mean_mode": choice(MEAN_MODES),
    "evidence_k": integer(1),
    "attention_hidden": integer(1),
    "top_k": integer(1),
    "d_model": integer(1),
    "n_heads": integer(1),
    "n_layers": integer(1),
    "d_ffn": integer(1),
    "correction_rank": integer(1),
    "dropout": number(0, 1, high_open=True),
    "mix_temperature": number(0, low_open=True),
    "number_of_epochs": integer(1),
    "early_stop_patience": integer(1),
    "batch_size": integer(1),
    "max_train_items": optional(integer(1)),
    "lr": number(0, low_open=True),
    "warmup_steps": integer(1),
    "max_grad_norm": number(0, low_open=True),
    "num_workers": integer(0),
    "ckpt_interval_minutes": number(0),
}


def check_value(key, value):
    """One line naming the option when ``value`` is not allowed for ``key``, else None."""
    check = CHECKS.get(key)
    if check is None:
        return None
    wanted = check(value)
    return None if wanted is None else f"--{key}={_show(value)} is not allowed: {key} must be {wanted}"


def _show(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def check_hparams(hparams):
    """Checks every option of loaded hparams and the relations between them."""
    for key in CHECKS:
        if key in hparams:
            problem = check_value(key, hparams[key])
            if problem:
                raise HparamsError(problem)
    if hparams.get("cache_folder") is not None:
        try:
            check_writable(hparams["cache_folder"], "cache folder", "cache_folder")
        except RunError as err:
            raise HparamsError(str(err)) from None
    if hparams.get("models") and not hparams.get("speaker_csv"):
        raise HparamsError("--models is given without --speaker_csv: the free-running decode needs the held-out CSV")
    if hparams.get("speaker_csv") and not Path(hparams["speaker_csv"]).is_file():
        raise HparamsError(f"--speaker_csv={hparams['speaker_csv']} is not allowed: the file does not exist")
    if hparams.get("matched_items", "all") != "all" and hparams.get("input_streams") != "matched":
        raise HparamsError(
            f"--matched_items={hparams['matched_items']} is not allowed with input_streams "
            f"{hparams.get('input_streams')}: it chooses the training items of input_streams matched"
        )
    if "d_model" in hparams and hparams["d_model"] % hparams["n_heads"]:
        raise HparamsError(
            f"--n_heads={hparams['n_heads']} is not allowed: n_heads must divide d_model ({hparams['d_model']})"
        )


def check_run_options(run_opts):
    """SpeechBrain's own run options (``--max_grad_norm``, ``--precision``, ...) that would give a
    wrong result or a traceback: a negative max_grad_norm flips the gradients in SpeechBrain 1.1.2,
    and fp16 is refused on a CPU only once the Brain is built."""
    run_opts = dict(run_opts or {})
    for key, check in (
        ("max_grad_norm", number(0, low_open=True)),
        ("grad_accumulation_factor", integer(1)),
        ("ckpt_interval_minutes", number(0)),
        ("ckpt_interval_steps", integer(0)),
    ):
        if run_opts.get(key) is not None:
            wanted = check(run_opts[key])
            if wanted:
                raise HparamsError(f"--{key}={_show(run_opts[key])} is not allowed: {key} must be {wanted}")
    for key in ("debug_batches", "debug_epochs"):
        if run_opts.get(key) is not None and integer(1)(run_opts[key]):
            raise HparamsError(f"--{key}={_show(run_opts[key])} is not allowed: {key} must be an integer >= 1")
    if run_opts.get("optimizer_step_limit") is not None:
        # A run cut after N optimiser steps would be tested, and labelled, as the full run.
        raise HparamsError(
            f"--optimizer_step_limit={run_opts['optimizer_step_limit']} is not supported by this recipe: "
            f"training length is --number_of_epochs (and early stopping); for a quick try use --debug, "
            f"whose results are marked as partial"
        )
    device = str(run_opts.get("device") or "")
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        available = _cuda_count()
        if not available:
            raise HparamsError(f"--device={device} is not allowed: no CUDA GPU is visible to this process")
        if index and (not index.isdigit() or int(index) >= available):
            raise HparamsError(
                f"--device={device} is not allowed: {available} CUDA GPU(s) visible (cuda:0 .. cuda:{available - 1})"
            )
    elif device and not device.startswith("cpu"):
        raise HparamsError(f"--device={device} is not allowed: device must be cpu, cuda or cuda:N")
    for key in ("precision", "eval_precision"):
        if run_opts.get(key) == "fp16" and (device.startswith("cpu") or not _cuda_count()):
            raise HparamsError(f"--{key}=fp16 is not allowed on a CPU: use --{key}=bf16 (or fp32)")


def _cuda_count():
    """CUDA devices this process can use (0 without a GPU or a driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ----------------------------------------------------------------------------- loading


def _yaml_load(text, where):
    try:
        return ruamel.yaml.YAML().load(text)  # round trip: a fold file may hold !ref values
    except ruamel.yaml.YAMLError as err:
        first = " ".join(str(err).split())
        if "duplicate key" in first:
            key = first.split('found duplicate key "', 1)[-1].split('"', 1)[0]
            raise HparamsError(f"{where} gives --{key} more than once") from None
        raise HparamsError(f"{where} is not valid yaml: {first}") from None


def base_keys(base_file):
    """The top-level keys of a base hparams file (without building anything)."""
    return [k for k in base_doc(base_file) if not str(k).startswith("__")]


def base_doc(base_file):
    """A base hparams file as yaml (round trip: nothing built)."""
    with open(base_file, encoding="utf-8") as handle:
        return ruamel.yaml.YAML().load(handle)


def _plain(value):
    """A ruamel value as plain python (mappings and lists included)."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def resolved_choices(base, overrides):
    """``matched_choices`` of a run: the base's, each teacher set the fold file or the command line
    gives replaced whole (``{same_level: {}}``: the options as written for that teacher set)."""
    choices = _plain(base.get("matched_choices")) or {}
    given = _plain(overrides.get("matched_choices"))
    if isinstance(choices, dict) and isinstance(given, dict):
        choices = {**choices, **given}
    elif "matched_choices" in overrides:
        choices = given
    return choices


def describe_choice(options):
    """The options a choice gave a run, as one line says them (``alpha=0.9, ...``; ``none``)."""
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "none"


def matched_choice(base, overrides):
    """The options ``matched_choices`` gives a run ({} when none), from its base hparams file
    (``base``, as ``base_doc`` reads it) and its overrides: a run with ``input_streams:
    matched``, ``matched_choice: true`` and a teacher set (not a list of teachers) gets its teacher
    set's choice whole, when neither the fold file nor the command line (``overrides``) sets any
    option of it; a run that sets one gets the options as written, so that what it asked for is
    never mixed with a choice made for another configuration."""

    def value(key):
        return _plain(overrides[key] if key in overrides else base.get(key))

    if value("input_streams") != "matched" or value("matched_choice") is not True:
        return {}
    if value("teachers") is not None:
        return {}
    choices = resolved_choices(base, overrides)
    if not isinstance(choices, dict):
        return {}  # refused by its check
    chosen = choices.get(value("teacher_set")) or {}
    if not isinstance(chosen, dict) or any(key in overrides for key in chosen):
        return {}
    return dict(chosen)


def unknown_option(key, known, hparams_file):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return HparamsError(f"unknown option --{key}{hint}; `python train.py {hparams_file} --help` lists the options")


def read_fold_file(hparams_file):
    """(base file, the fold's own overrides) of a fold file; (the file, {}) for a plain one."""
    path_ = Path(hparams_file)
    if not path_.is_file():
        raise HparamsError(f"hparams file {hparams_file} does not exist")
    fold = _yaml_load(path_.read_text(encoding="utf-8"), f"hparams file {hparams_file}") or {}
    if not isinstance(fold, dict):
        raise HparamsError(f"hparams file {hparams_file} is not a yaml mapping")
    if "base_yaml" not in fold:
        return str(hparams_file), {}
    base = os.path.join(os.path.dirname(os.path.abspath(hparams_file)), fold.pop("base_yaml"))
    if not Path(base).is_file():
        raise HparamsError(f"hparams file {hparams_file} names base_yaml {base}, which does not exist")
    return base, fold


def load_fold_hparams(hparams_file, cli_overrides="", check=True):
    """Returns (base_file, overrides dict, hparams dict); raises HparamsError with one line. With
    ``check=False`` the relations between the loaded values are left to ``check_hparams``."""
    base, overrides = read_fold_file(hparams_file)
    if base == str(hparams_file):  # a plain hparams file: its own keys are the base
        fold_file_keys = {}
    else:
        fold_file_keys = dict(overrides)
    cli = _yaml_load(cli_overrides, "the command line") if cli_overrides else None
    if cli:
        recursive_update(overrides, dict(cli))  # the command line wins over the fold file
    doc = base_doc(base)
    known = [k for k in doc if not str(k).startswith("__")]
    for key in overrides:
        if key not in known:
            raise unknown_option(key, known, hparams_file)
    for key, value in overrides.items():
        # Literal values are checked before anything is built (a !ref is checked once resolved).
        if not hasattr(value, "tag") or not str(getattr(value.tag, "value", value.tag) or "").startswith("!"):
            problem = check_value(key, value)
            if problem:
                where = "" if cli and key in cli else f" (in {hparams_file})" if key in fold_file_keys else ""
                raise HparamsError(problem + where)
    # The per-teacher-set choice joins the overrides (so hyperparams.yaml and test_results.json
    # say how the run was made); check_hparams checks its values with matched_choices.
    chosen = matched_choice(doc, overrides)
    overrides.update(chosen)
    if cli and "logit_root" in cli and "tokenizer_file" not in cli:
        raise HparamsError(
            "--logit_root is given without --tokenizer_file: a real logit tree needs the SA models' "
            "SentencePiece model (--tokenizer_file=...); the default is the demo tree's"
        )
    # The output folder must be usable before anything is built (the Checkpointer creates its
    # save folder when it is built): resolve the references without building objects.
    with open(base, encoding="utf-8") as handle:
        try:
            resolved = ruamel.yaml.YAML().load(resolve_references(handle, overrides).getvalue())
        except Exception:  # noqa: BLE001 - reported as one line below, by the real load
            resolved = None
    if resolved is not None and isinstance(resolved.get("output_folder"), str):
        try:
            check_writable(resolved["output_folder"])
        except RunError as err:
            raise HparamsError(str(err)) from None
    with open(base, encoding="utf-8") as handle:
        try:
            hparams = load_hyperpyyaml(handle, overrides)
        except Exception as err:  # noqa: BLE001 - any failure to build the hparams is one line
            first = " ".join(str(err).split()) or type(err).__name__
            raise HparamsError(f"cannot load {base} with the options given: {first}") from None
    # hyperpyyaml merged a given matched_choices into the base's key by key (it cannot empty one):
    # the mapping a run holds, and that check_hparams checks, is the one it resolved
    hparams["matched_choices"] = resolved_choices(doc, overrides)
    if check:
        try:
            check_hparams(hparams)
        except HparamsError as err:
            if any(f"--{key}=" in str(err) for key in chosen):
                raise HparamsError(f"{err} (an option chosen per teacher set: matched_choices in {base})") from None
            raise
    hparams["matched_choice_applied"] = chosen
    return base, overrides, hparams


# ----------------------------------------------------------------------------- --help


def describe_options(hparams_file):
    """The recipe's options for ``--help``: name, default (of this fold) and the yaml's comment."""
    base, fold = read_fold_file(hparams_file)
    doc = base_doc(base)
    keys = [k for k in doc if not str(k).startswith("__")]
    comments = _comments(doc, list(doc))
    chosen = matched_choice(doc, fold) if "matched_choices" in doc else {}
    lines = []
    for key in keys:
        value = fold.get(key, doc[key])
        tag = getattr(getattr(value, "tag", None), "value", None)
        if tag and not tag.startswith(("!ref", "!PLACEHOLDER")):
            continue  # objects (the student, the optimiser, ...) are built from the options
        if hasattr(value, "items") and value and key not in CHECKS:
            continue  # a mapping of settings of another hparams file (an option's own: matched_choices)
        shown = "(required)" if tag == "!PLACEHOLDER" else str(getattr(value, "value", value)) if tag else _show(value)
        if key in chosen:
            teacher_set = fold.get("teacher_set", doc.get("teacher_set"))
            shown = f"{_show(chosen[key])} (chosen for {teacher_set}; {shown} as written)"
        lines.append((key, shown, comments.get(key, "")))
    width = max(len(k) for k, _, _ in lines) + 2
    out = [
        f"Recipe options ({Path(base).name}, with the values of {Path(hparams_file).name}); give any as --KEY=VALUE:"
    ]
    for key, shown, comment in lines:
        out.append(f"  --{key:<{width}} {shown}")
        if comment:
            out.append(f"      {comment}")
    return "\n".join(out)


def _comments(doc, keys):
    """key -> its comment in the yaml: the text after it on its line and the indented comment
    lines under it (ruamel files a tagged value's comment under the next key, by its column)."""
    found = {}

    def texts(tokens):
        for token in tokens or []:
            for part in token if isinstance(token, list) else [token]:
                if part is not None and getattr(part, "value", ""):
                    yield part

    for k, key in enumerate(keys):
        item = doc.ca.items.get(key) or [None, None, None, None]
        parts = list(texts([item[2]]))
        if k + 1 < len(keys):  # indented comments filed before the next key belong to this one
            after = doc.ca.items.get(keys[k + 1]) or [None, None, None, None]
            parts += [p for p in texts([item_ for item_ in (after[1] or [])]) if p.column > 0]
        lines = []
        for part in parts:
            for line in part.value.splitlines():
                line = line.strip()
                if line.startswith("#") and not line.startswith(("# ----", "# ####")):
                    lines.append(line.lstrip("#").strip())
                elif line:
                    break
        found[key] = " ".join(lines)
    return found
