#!/usr/bin/env python3
"""Extract the teacher logits of SA models on any speaker's audio: the input of this recipe.

An SA model is a SpeechBrain Transformer ASR model of the LibriSpeech conformer recipe family,
fine-tuned on one dysarthric speaker: ``compute_features`` (Fbank) -> ``normalize``
(InputNormalization, global) -> ``CNN`` (ConvolutionFrontEnd) -> ``Transformer`` (TransformerASR,
conformer encoder, transformer decoder) -> ``seq_lin`` / ``ctc_lin`` (Linear). For every (SA model
MODEL, audio speaker SPK) pair this script runs MODEL, in eval mode with batch size 1, on SPK's
utterances and writes

    <logit_root>/<MODEL>/<SPK>/<SPK>_decoder_logits.pt  # list of [U_i, V] float32: raw seq_lin
                                                        # outputs, teacher-forced on [<s>] + tokens
    <logit_root>/<MODEL>/<SPK>/<SPK>_ctc_logits.pt      # list of [T_i, V] float32: raw ctc_lin
                                                        # outputs on the encoder output
    <logit_root>/<MODEL>/<SPK>/<SPK>_metadata.json      # the keys of the real files (METADATA_KEYS)
    <logit_root>/extraction_summary.json                # one entry per pair, updated after each

``U_i = len(encode_as_ids(word)) + 1``: position u predicts ``tokens_eos[u]``, the last one ``</s>``
(id 2). Ids: ``<unk>`` = CTC blank = pad = 0, ``<s>`` = 1, ``</s>`` = 2, model ids = SentencePiece
ids (no offset). Utterances are in ascending-duration order (SpeechBrain's
``filtered_sorted(sort_key="duration")``, ties in CSV order), as in the real files.
``token_lens`` is ``[1.0]`` per utterance (the relative length the original extraction stored) and
``ctc_frame_lens`` the absolute number of CTC frames.

The forward pass is the one of the SA recipe's ``compute_forward`` (and of the original extraction,
``extract_sa_logits.py`` of the upstream project):

    feats = normalize(compute_features(wavs), wav_lens)        # eval mode: stored global stats
    enc_out, pred = Transformer(CNN(feats), tokens_bos, wav_lens, pad_idx=pad_index)
    ctc_logits, decoder_logits = ctc_lin(enc_out), seq_lin(pred)

Models
    An SA model is given by its SpeechBrain hparams yaml (the one it was trained with) and its
    checkpoint: a ``CKPT+...`` folder, or a ``save`` folder whose checkpoint is chosen by
    ``--ckpt_select`` (default ``auto``: the highest ``WRA`` in ``CKPT.yaml``, as the SA pipeline's
    ``on_evaluate_start`` picked it; else the lowest ``WER``; else the most recent). Only the keys
    that the forward pass needs (and the keys they reference) are built from the yaml, so loggers,
    the language model, the Pretrainer and the Checkpointer of the training yaml are never built
    and nothing is fetched from a hub. The recoverables are loaded offline with SpeechBrain's own
    load hooks: ``model.ckpt`` (the ``torch.nn.ModuleList`` [CNN, Transformer, seq_lin, ctc_lin],
    the ``model`` key of the yaml when it has one) and ``normalizer.ckpt``; a checkpoint saved per
    module (``CNN.ckpt``, ``Transformer.ckpt``, ...) works too.

Usage (from recipes/UASpeech/logit_kd):

    python extract_logits.py --logit_root=/data/logit_extraction \\
        --tokenizer_file=/data/sa_tokenizer.model --data_root=/data/UASpeech \\
        --models F02=/exp/F02/hyperparams.yaml:/exp/F02/save \\
                 M05=/exp/M05/hyperparams.yaml:/exp/M05/save/CKPT+2024-07-12+11-58-04+00 \\
        --speakers F02=/data/csv/F02.csv M05=/data/csv/M05.csv M08=/data/csv/M08.csv \\
        --pairs all                     # every model on every speaker (default); or `diagonal`,
                                        # or MODEL:SPK items, e.g. --pairs F02:M08 M05:M08

    python extract_logits.py --jobs jobs.yaml [--logit_root=...] [--precision=bf16]

A job file (YAML or JSON; relative paths are relative to the job file's folder; command-line
options win, and --models / --speakers entries are added to the file's):

    logit_root: logit_extraction
    tokenizer_file: sa_tokenizer.model
    data_root: /data/UASpeech            # replaces $data_root in the CSVs' wav column
    models:
      F02: {hparams: exp/F02/hyperparams.yaml, checkpoint: exp/F02/save}
      M05: {hparams: exp/M05/hyperparams.yaml, checkpoint: exp/M05/save,
            overrides: {output_neurons: 5000}}       # optional, per model
    speakers: {F02: csv/F02.csv, M08: csv/M08.csv}
    pairs: all                            # or diagonal, or [[F02, M08], [M05, M08]]
    overrides: {}                         # optional, applied to every model's hparams

Speaker CSVs are SpeechBrain CSVs (``ID,duration,wav,spk_id,wrd``), one speaker each, with
upper-case words (the SA tokenizer maps lower case to ``<unk>``).

Other options: ``--batch_size N`` (utterances of similar length per forward pass; default 1, the
original extraction's batch of one; with more, each utterance's logits equal its batch-of-one logits
up to float rounding, tested), ``--ctc all|none`` (``none``: no CTC logit files, for a tree no job
reads them from: they are about ten times the size of the decoder files; the metadata still has
``ctc_frame_lens``), ``--precision fp32|bf16`` (autocast of the forward pass; logits are saved as
float32), ``--device`` (default cuda when available, else cpu), ``--overrides "{key: value}"``
(applied to every model's hparams), ``--ckpt_select auto|latest|max:KEY|min:KEY``, ``--force``
(redo finished pairs).

Existing output is never overwritten without ``--force``. A pair whose three files are present and
consistent (the metadata lists the CSV's utterances in order, the logit files hold one tensor per
utterance, or one stacked ``[N, U, V]`` tensor, with the expected lengths and vocabulary) is
finished and skipped: this script's files and the SA project's ``extract_sa_logits.py``'s (no
legacy ``vocab_size`` key, another key order) alike. A pair with logits but no metadata is an
interrupted extraction of this script when its ``.extraction_in_progress`` marker is there (it is
written before a pair is touched and removed after its metadata, written last): then it is
redone, so a crashed run is resumed by running it again; without the marker it is refused. A
pair with metadata that does not match (another CSV, tokenizer or model) is refused with one
line, and counts as failed. Every file is written to a temporary name and
renamed into place. ``extraction_summary.json`` is merged, never replaced (the SA script's keys
are kept); an unreadable one stops the run before anything is extracted. A failed pair is
reported (and recorded in the summary) and the other pairs still run; the exit status is 1 if any
pair failed. What can be checked before extracting is, before anything is written: every audio file
of the CSVs (there, readable, mono, not empty), an empty CSV, a ``--device`` this machine does not
have, a mistyped option: one ``ERROR:`` line naming the file, the utterance or the option, exit
status 2. (Its one numeric option, ``--batch_size``, must be an integer >= 1; ``--overrides``
values are checked by the model's hparams when it is built.)

SA experiment folders as they are: the ``hyperparams.yaml`` of the SA project's fork passes
``freeze_encoder_layers`` / ``freeze_decoder_layers`` to ``TransformerASR``, which SpeechBrain 1.1.2
does not accept: such arguments are dropped from the in-memory copy (never from the file), one
log line each. Checkpoint keys spelt ``mutihead_attn`` (SpeechBrain 1.0) are renamed by
SpeechBrain's own load hooks. In ``save/``, the Pretrainer's ``lm.ckpt`` / ``tokenizer.ckpt``
symlinks are ignored, and a symlink to the control model's ``CKPT+`` folder competes with the
others (highest WRA, ties to the most recent, as the SA pipeline chose); the log says which
checkpoint was loaded and warns when it is a symlink out of the folder.

Numerics: TF32 is off unless ``--allow_tf32`` (SpeechBrain 1.1.2 turns it on at import; the fork
did not). One difference remains: the fork computes Swish as ``x * sigmoid(x)``, SpeechBrain 1.1.2
as ``nn.SiLU``; the logits differ by about 1e-5.

Memory: the logits of one pair are kept in memory until they are saved (for a full UASpeech
speaker and a 5000-piece vocabulary, about 0.1 GB of decoder and a few GB of CTC logits).
"""

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from local import cpu_kernels  # noqa: F401  first: it pins the CPU math libraries' code paths before torch loads

# isort: split
import torch

from local.console import OneLineParser
from local.files import atomic_file
from local.layout import METADATA_KEYS, SUMMARY_FILE, pair_files
from local.sa_models import (
    ExtractionError,
    ModelSpec,
    SAModel,
    check_audio,
    check_device,
    parse_model_arg,
    read_speaker_csv,
    read_wav,
    set_tf32,
)
from local.store import LogitStoreError, load_tokenizer

logger = logging.getLogger("extract_logits")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_tensors(obj, path):
    with atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


def save_json(obj, path, indent=None):
    with atomic_file(path, "w") as handle:
        json.dump(obj, handle, indent=indent)


def _load_mmap(path):
    return torch.load(path, weights_only=True, mmap=True, map_location="cpu")


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


# The metadata keys a finished pair must have. ``vocab_size`` (the legacy key of the first
# extraction) is optional: the SA project's current script no longer writes it, and writes the keys
# in another order; both are finished pairs.
FINISHED_KEYS = tuple(k for k in METADATA_KEYS if k != "vocab_size")
# Left in a pair's folder while this script writes the pair (removed with the metadata written
# last): logit files without metadata are an interrupted extraction only when it is there.
IN_PROGRESS = ".extraction_in_progress"


def pair_status(logit_root, model, speaker, utts, tokenizer, ctc=True):
    """``(state, why)`` of a pair's files: ``("absent", ...)`` nothing there or an interrupted
    extraction (logits without metadata: the metadata is written last, here and by the SA project's
    script); ``("finished", None)`` three consistent files; ``("different", why)`` a finished-looking
    pair that does not match the CSV, the tokenizer or its own files: never overwritten without
    ``--force``."""
    files = pair_files(logit_root, model, speaker)
    if not files["metadata"].is_file():
        present = [p.name for p in files.values() if p.is_file()]
        if not present:
            return "absent", "no files"
        if (files["metadata"].parent / IN_PROGRESS).is_file():
            return "absent", f"interrupted extraction of this script ({', '.join(present)} without metadata)"
        return "different", f"{', '.join(present)} without metadata, not left by an interrupted run of this script"
    try:
        why = _pair_difference(files, model, utts, tokenizer, ctc)
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as err:
        why = f"inconsistent files ({type(err).__name__}: {err})"
    return ("finished", None) if why is None else ("different", why)


def _pair_difference(files, model, utts, tokenizer, ctc=True):
    """Why a pair's files are not a finished extraction of ``utts`` (None when they are). Without
    ``ctc`` (an extraction that wrote no CTC file) the CTC file is not required, nor read."""
    if not ctc:
        files = {k: v for k, v in files.items() if k != "ctc"}
    absent = [p.name for p in files.values() if not p.is_file()]
    if absent:
        return f"missing {', '.join(absent)}"
    try:
        meta = json.loads(files["metadata"].read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"unreadable metadata ({err})"
    if not isinstance(meta, dict) or any(k not in meta for k in FINISHED_KEYS):
        return f"metadata lacks {[k for k in FINISHED_KEYS if k not in meta] if isinstance(meta, dict) else 'keys'}"
    if meta["model_name"] != model:
        return f"metadata model_name is {meta['model_name']!r}"
    if meta["utterance_ids"] != [u.id for u in utts] or meta["target_words"] != [u.word for u in utts]:
        return "metadata utterances differ from the CSV's"
    if (
        meta["num_utterances"] != len(utts)
        or len(meta["ctc_frame_lens"]) != len(utts)
        or meta["vocab_size_decoder"] != tokenizer.vocab_size()
        or meta.get("vocab_size", meta["vocab_size_decoder"]) != meta["vocab_size_decoder"]
    ):
        return "metadata counts differ"
    try:
        decoder = _load_mmap(files["decoder"])
        ctc_logits = _load_mmap(files["ctc"]) if ctc else [None] * len(utts)
    except Exception as err:  # noqa: BLE001 - any unreadable file means "not finished"
        return f"unreadable logit file ({type(err).__name__})"
    if isinstance(decoder, torch.Tensor) and decoder.dim() == 3:
        decoder = list(decoder)  # the SA script stacks [N, U, V] when every word has U positions
    if not (
        isinstance(decoder, list) and isinstance(ctc_logits, list) and len(decoder) == len(ctc_logits) == len(utts)
    ):
        return "logit files do not hold one tensor per utterance"
    for u, dec, frames, c in zip(utts, decoder, meta["ctc_frame_lens"], ctc_logits):
        U = len(tokenizer.encode_as_ids(u.word)) + 1
        if tuple(dec.shape) != (U, meta["vocab_size_decoder"]):
            return f"decoder logits of {u.id} have shape {tuple(dec.shape)}"
        if c is not None and tuple(c.shape) != (frames, meta["vocab_size_ctc"]):
            return f"CTC logits of {u.id} have shape {tuple(c.shape)}"
    return None


def extract_pair(model, speaker, utts, tokenizer, logit_root, batch_size=1, ctc=True):
    """Runs ``model`` on ``utts`` and writes the pair's files (metadata last; the CTC file only with
    ``ctc``). ``batch_size`` > 1 runs batches of utterances of similar length
    (``SAModel.logits_batch``: each utterance's logits equal its batch-of-one logits up to float
    rounding); the files list the utterances in the CSV's order either way."""
    files = pair_files(logit_root, model.name, speaker)
    marker = files["metadata"].parent / IN_PROGRESS
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"pid {os.getpid()}\n")  # before anything of the pair changes
    files["metadata"].unlink(missing_ok=True)  # the pair is unfinished until its metadata is back
    decoder, ctc_logits, frames = [None] * len(utts), [None] * len(utts), [0] * len(utts)
    start = time.time()
    tokens = [tokenizer.encode_as_ids(u.word) for u in utts]
    order = sorted(range(len(utts)), key=lambda i: (utts[i].duration, i))
    done = 0
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        wavs = [read_wav(utts[i], model) for i in batch]
        if batch_size == 1:  # exactly the original extraction's forward pass
            outputs = [model.logits(wavs[0], tokens[batch[0]])]
        else:
            outputs = model.logits_batch(wavs, [tokens[i] for i in batch])
        for i, (dec, c) in zip(batch, outputs):
            utt = utts[i]
            if dec.shape[0] != len(tokens[i]) + 1:
                raise ExtractionError(
                    f"utterance {utt.id}: {dec.shape[0]} decoder positions for {len(tokens[i])} tokens + </s>"
                )
            if not (torch.isfinite(dec).all() and torch.isfinite(c).all()):
                raise ExtractionError(f"model {model.name}, utterance {utt.id}: NaN or Inf logits")
            decoder[i], ctc_logits[i], frames[i] = dec, c if ctc else None, int(c.shape[0])
        done += len(batch)
        if done // 200 != (done - len(batch)) // 200:
            logger.info(
                "%s on %s: %d/%d utterances (%.1f s)", model.name, speaker, done, len(utts), time.time() - start
            )
    save_tensors(decoder, files["decoder"])
    if ctc:
        save_tensors(ctc_logits, files["ctc"])
    else:
        files["ctc"].unlink(missing_ok=True)  # (an earlier extraction's, now stale)
    meta = {
        "model_name": model.name,
        "num_utterances": len(utts),
        "vocab_size": model.vocab_size,  # legacy key of the real files: the decoder's vocabulary
        "utterance_ids": [u.id for u in utts],
        "token_lens": [[1.0] for _ in utts],  # the relative length of a batch of one, as stored
        "target_words": [u.word for u in utts],
        "vocab_size_decoder": model.vocab_size,
        "vocab_size_ctc": model.vocab_size_ctc,
        "ctc_frame_lens": frames,
    }
    assert list(meta) == list(METADATA_KEYS)
    save_json(meta, files["metadata"], indent=2)
    marker.unlink()
    return time.time() - start


def read_summary(logit_root):
    """``<logit_root>/extraction_summary.json`` as a dict ({} when absent). Its keys are kept as
    they are when it is updated, those of the SA project's script too (``successful_extractions``,
    ``failed_extractions``, ``total_models``, ``output_directory``); an unreadable one stops the run
    before anything is extracted, rather than being replaced."""
    path = Path(logit_root) / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExtractionError(f"{path} is unreadable ({err}): not replaced; move it away to start a new one") from None
    if not isinstance(summary, dict):
        raise ExtractionError(f"{path} is not a JSON object: not replaced; move it away to start a new one")
    return summary


def update_summary(logit_root, records, tokenizer_info, keep_existing=False):
    """Merges ``records`` ({"MODEL/SPK": entry}) into ``<logit_root>/extraction_summary.json``
    (with ``keep_existing``, only the pairs it does not describe yet)."""
    path = Path(logit_root) / SUMMARY_FILE
    summary = read_summary(logit_root)
    extractions = summary.get("extractions")
    if not isinstance(extractions, dict):
        extractions = {}
    for key, record in records.items():
        if not (keep_existing and key in extractions):
            extractions[key] = record
    summary.update(
        {
            "tool": "recipes/UASpeech/logit_kd/extract_logits.py",
            "format": "<MODEL>/<SPK>/<SPK>_{decoder_logits.pt,ctc_logits.pt,metadata.json}",
            "tokenizer": tokenizer_info,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "extractions": dict(sorted(extractions.items())),
        }
    )
    save_json(summary, path, indent=1)


# --------------------------------------------------------------------------------------------
# Jobs and command line
# --------------------------------------------------------------------------------------------


def parse_speaker_arg(text):
    name, sep, csv = text.partition("=")
    if not sep or not csv:
        raise ExtractionError(f"--speakers item {text!r} is not SPK=CSV")
    return name, Path(csv)


def _parse_mapping(text, what):
    import ruamel.yaml

    if not text:
        return {}
    value = ruamel.yaml.YAML(typ="safe").load(text)
    if not isinstance(value, dict):
        raise ExtractionError(f'{what} must be a yaml mapping, e.g. "{{output_neurons: 5000}}"')
    return dict(value)


def load_jobs(path):
    """Reads a YAML/JSON job file; relative paths are made relative to its folder."""
    import ruamel.yaml

    path = Path(path)
    try:
        jobs = ruamel.yaml.YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001
        raise ExtractionError(f"unreadable job file {path}: {err}") from None
    if not isinstance(jobs, dict):
        raise ExtractionError(f"job file {path} must be a mapping")
    known = {"logit_root", "tokenizer_file", "data_root", "models", "speakers", "pairs", "overrides"}
    if set(jobs) - known:
        raise ExtractionError(f"job file {path}: unknown keys {sorted(set(jobs) - known)}")
    base = path.parent

    def rel(p):
        return p if p is None else base / Path(str(p))

    models = {}
    for name, spec in (jobs.get("models") or {}).items():
        if not isinstance(spec, dict) or "hparams" not in spec or "checkpoint" not in spec:
            raise ExtractionError(f"job file {path}: model {name} needs hparams and checkpoint")
        models[str(name)] = ModelSpec(rel(spec["hparams"]), rel(spec["checkpoint"]), dict(spec.get("overrides") or {}))
    return {
        "logit_root": rel(jobs.get("logit_root")),
        "tokenizer_file": rel(jobs.get("tokenizer_file")),
        "data_root": rel(jobs.get("data_root")),
        "models": models,
        "speakers": {str(k): rel(v) for k, v in (jobs.get("speakers") or {}).items()},
        "pairs": jobs.get("pairs"),
        "overrides": dict(jobs.get("overrides") or {}),
    }


def expand_pairs(pairs, models, speakers):
    if pairs is None or pairs == "all" or pairs == ["all"]:
        return [(m, s) for m in models for s in speakers]
    if pairs == "diagonal" or pairs == ["diagonal"]:
        out = [(s, s) for s in speakers if s in models]
        if not out:
            raise ExtractionError("--pairs diagonal: no speaker has a model of the same name")
        return out
    out = []
    for item in pairs:
        pair = tuple(item.split(":")) if isinstance(item, str) else tuple(item)
        if len(pair) != 2:
            raise ExtractionError(f"pair {item!r} is not MODEL:SPK")
        if pair[0] not in models:
            raise ExtractionError(f"pair {item!r}: no model {pair[0]} (give it with --models)")
        if pair[1] not in speakers:
            raise ExtractionError(f"pair {item!r}: no speaker {pair[1]} (give it with --speakers)")
        out.append((str(pair[0]), str(pair[1])))
    return out


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", help="YAML/JSON job file (see above)")
    parser.add_argument("--logit_root", help="output folder (the recipe's --logit_root)")
    parser.add_argument("--tokenizer_file", help="the SA SentencePiece model (a file path)")
    parser.add_argument("--data_root", help="replaces $data_root in the CSVs' wav column")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME=HPARAMS.yaml:CKPT")
    parser.add_argument("--speakers", nargs="+", default=[], metavar="SPK=CSV")
    parser.add_argument(
        "--pairs",
        nargs="+",
        metavar="all|diagonal|MODEL:SPK",
        help="which (model, speaker) pairs to extract (default: all)",
    )
    parser.add_argument("--overrides", default="", help="yaml mapping applied to every model's hparams")
    parser.add_argument("--ckpt_select", default="auto", help="auto (default), latest, max:KEY or min:KEY")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=1,
        help="utterances per forward pass (default 1, the original extraction's; more: each utterance's "
        "logits equal its batch-of-one logits up to float rounding)",
    )
    parser.add_argument(
        "--ctc",
        choices=("all", "none"),
        default="all",
        help="write the CTC logit files (all: as the real extraction; none: decoder logits and metadata only, "
        "for trees whose CTC files no job reads: they are ~10x the decoder files)",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--force", action="store_true", help="re-extract pairs that are finished, or that hold another extraction"
    )
    parser.add_argument(
        "--allow_tf32",
        action="store_true",
        help="keep TensorFloat-32 matmuls on (SpeechBrain 1.1.2 turns them on; the SA models' fork did not)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return run(args)
    except (ExtractionError, LogitStoreError) as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        return 2


def run(args):
    jobs = {"models": {}, "speakers": {}, "pairs": None, "overrides": {}}
    if args.jobs:
        jobs = load_jobs(args.jobs)
    models = dict(jobs["models"])
    models.update(parse_model_arg(m) for m in args.models)
    speakers = dict(jobs["speakers"])
    speakers.update(parse_speaker_arg(s) for s in args.speakers)
    logit_root = Path(args.logit_root) if args.logit_root else jobs.get("logit_root")
    tokenizer_file = Path(args.tokenizer_file) if args.tokenizer_file else jobs.get("tokenizer_file")
    data_root = args.data_root or jobs.get("data_root")
    if logit_root is None or tokenizer_file is None:
        raise ExtractionError("give --logit_root and --tokenizer_file (or put them in the job file)")
    if not models or not speakers:
        raise ExtractionError("give at least one model (--models) and one speaker (--speakers)")
    pairs = expand_pairs(args.pairs if args.pairs is not None else jobs["pairs"], models, speakers)
    common = {**jobs["overrides"], **_parse_mapping(args.overrides, "--overrides")}
    device = str(check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if args.batch_size < 1:
        raise ExtractionError(f"--batch_size={args.batch_size} is not allowed: it must be an integer >= 1")

    summary = read_summary(logit_root)  # an unreadable summary stops the run here, not midway
    if "successful_extractions" in summary:
        logger.info(
            "%s was written by the SA project's script (%d models listed as extracted): its keys are kept",
            Path(logit_root) / SUMMARY_FILE,
            len(summary["successful_extractions"] or []),
        )
    tf32 = set_tf32(args.allow_tf32)
    tokenizer = load_tokenizer(tokenizer_file)  # checks <unk>=0, <s>=1, </s>=2
    tokenizer_info = {
        "file": str(tokenizer_file),
        "vocab_size": tokenizer.vocab_size(),
        "sha256": hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest(),
    }
    utts = {}
    for spk in dict.fromkeys(s for _, s in pairs):
        utts[spk] = read_speaker_csv(speakers[spk], spk, data_root)
        check_audio(utts[spk])  # every audio file there and readable, before anything is written
        logger.info("speaker %s: %d utterances from %s", spk, len(utts[spk]), speakers[spk])

    failed = 0
    for name in dict.fromkeys(m for m, _ in pairs):
        todo, skipped, refused = [], {}, []
        for _, spk in [p for p in pairs if p[0] == name]:
            state, why = pair_status(logit_root, name, spk, utts[spk], tokenizer, ctc=args.ctc == "all")
            if state == "finished" and not args.force:
                logger.info("%s on %s: finished, skipped", name, spk)
                skipped[f"{name}/{spk}"] = {
                    "model": name,
                    "speaker": spk,
                    "status": "found finished",
                    "num_utterances": len(utts[spk]),
                }
                continue
            if state == "different" and not args.force:
                # Someone's extraction (perhaps another tokenizer or CSV): never replaced silently.
                logger.error(
                    "%s on %s: %s holds an extraction that differs (%s): not overwritten; --force re-extracts it",
                    name,
                    spk,
                    pair_files(logit_root, name, spk)["metadata"].parent,
                    why,
                )
                refused.append(spk)
                continue
            logger.info("%s on %s: to extract (%s)", name, spk, "--force" if args.force else why)
            todo.append(spk)
        if skipped:
            update_summary(logit_root, skipped, tokenizer_info, keep_existing=True)
        failed += len(refused)
        if not todo:
            continue
        spec = models[name]
        record_base = {
            "model": name,
            "hparams": str(spec.hparams),
            "precision": args.precision,
            "device": device,
            "tf32": tf32,
        }
        try:
            model = SAModel(
                name,
                spec.hparams,
                spec.checkpoint,
                {**common, **spec.overrides},
                args.ckpt_select,
                device,
                args.precision,
            )
            if model.vocab_size != tokenizer.vocab_size():
                raise ExtractionError(
                    f"model {name} has {model.vocab_size} outputs but the tokenizer "
                    f"{tokenizer_file} has {tokenizer.vocab_size()} pieces: "
                    f"wrong tokenizer?"
                )
            logger.info("model %s: %s (%s)", name, model.ckpt_dir, model.ckpt_how)
        except ExtractionError as err:
            logger.error("%s", err)
            failed += len(todo)
            update_summary(
                logit_root,
                {
                    f"{name}/{spk}": {**record_base, "speaker": spk, "status": "failed", "error": str(err)}
                    for spk in todo
                },
                tokenizer_info,
            )
            continue
        record_base.update(
            {
                "checkpoint": str(model.ckpt_dir),
                "checkpoint_meta": model.ckpt_meta,
                "checkpoint_selected_by": model.ckpt_how,
            }
        )
        for spk in todo:
            record = {**record_base, "speaker": spk, "csv": str(speakers[spk]), "num_utterances": len(utts[spk])}
            try:
                seconds = extract_pair(
                    model, spk, utts[spk], tokenizer, logit_root, args.batch_size, ctc=args.ctc == "all"
                )
                record.update(
                    {
                        "status": "extracted",
                        "seconds": round(seconds, 2),
                        "vocab_size": model.vocab_size,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                )
                logger.info("%s on %s: %d utterances in %.1f s", name, spk, len(utts[spk]), seconds)
            except Exception as err:  # noqa: BLE001 - record the failure, go on with the other pairs
                if isinstance(err, ExtractionError):
                    logger.error("%s on %s: %s", name, spk, err)
                else:
                    logger.exception("%s on %s failed", name, spk)
                record.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
                failed += 1
            update_summary(logit_root, {f"{name}/{spk}": record}, tokenizer_info)
        del model
    if failed:
        logger.error("%d pair(s) failed; see %s", failed, Path(logit_root) / SUMMARY_FILE)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
