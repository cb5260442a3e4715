#!/usr/bin/env python3
"""Logit-level knowledge distillation on UASpeech, leave one speaker out.

Fifteen speaker-adaptive (SA) SpeechBrain ASR models, one per dysarthric speaker, had their
decoder logits extracted to disk. This recipe reads them in place, trains a small fusion student
by knowledge distillation from the teacher speakers' ensemble (KL at temperature T, scaled by T^2,
plus cross-entropy on the reference), and tests it on one held-out speaker per intelligibility
group with the SA pipeline's own decoding and SpeechBrain's ErrorRateStats.

    python train.py hparams/fold_M01.yaml                      # the embedded synthetic demo tree
    python train.py hparams/fold_M08.yaml --logit_root=/data/logit_extraction \
        --tokenizer_file=/data/tokenizer.ckpt --output_folder=results/M08
    torchrun --standalone --nproc_per_node=4 train.py hparams/fold_M05.yaml --logit_root=...
    python train.py hparams/fold_M08.yaml --help              # every option, with its default

See README.md for the folds and docs/scoring.md for what each figure means.
"""

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from local import cpu_kernels  # first: it pins the CPU math libraries' code paths before torch loads

# isort: split
import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.distributed import ddp_all_reduce, if_main_process

from local import data_kind
from local.batch import OUTPUT_KEYS, FoldBatch, GlobalBatchSampler, StepNoise
from local.checkpoints import FINGERPRINT, CheckpointError, RunFingerprint, check_checkpoints
from local.combine import RANKING_RULE, best_single, rank_key
from local.console import closing_block
from local.corpus import SPEAKERS, intelligibility_group
from local.ctc import ctc_systems, score_ctc
from local.decode_stage import run_after_test
from local.distributed import (
    RunError,
    agree,
    is_distributed,
    leave,
    local_rank,
    release_at_exit,
    stop,
    world_size,
)
from local.files import DiskFullError, write_json
from local.fingerprint import FingerprintError, check_epochs, check_fingerprint, make_fingerprint, option_fingerprint
from local.folds import (
    FoldError,
    build_items,
    check_honesty,
    optional_pairs,
    store_pairs,
    teacher_speakers,
    validation_groups,
)
from local.fusion import MeanFusion, drop_streams
from local.kd import EnsembleTargets, kd_loss, stream_scores, teacher_quality, teacher_ranking
from local.options import (
    HparamsError,
    check_hparams,
    check_run_options,
    describe_choice,
    describe_options,
    load_fold_hparams,
)
from local.run_folder import LOG_CONFIG, OutputLock, check_writable, made_by_this_run, remove, write_hyperparams
from local.scoring import SystemScores, majority_vote, results_table, teacher_ranks, write_utterances
from local.store import LogitStore, LogitStoreError, TokenTable, load_tokenizer
from local.synthetic import DemoTreeError, ensure_demo_tree

logger = logging.getLogger(__name__)

# What stops a run before it starts, with one line.
INPUT_ERRORS = (RunError, HparamsError, LogitStoreError, FoldError, FingerprintError, CheckpointError, DiskFullError)
# The files of every checkpoint of a trained student (besides student.ckpt): a checkpoint that
# lacks one cannot be loaded.
CHECKPOINT_FILES = ("counter", "scheduler", "train_log", FINGERPRINT, "brain", "optimizer")
# How the recipe's figures were decoded: said in test_results.json, in the closing block, and read
# by compare.py. Teacher-forced: position u saw the reference's tokens before u, which a decode of
# the audio (beam search + CTC + LM) does not; the two are not comparable figures.
TEACHER_FORCED = "teacher-forced greedy (argmax of the decoder logits given the reference prefix, cut at </s>)"
CTC_DECODINGS = {
    "greedy": "free-running CTC greedy of the audio",
    "closed_list": "free-running CTC of the audio, best word of the teachers' closed word list",
}


def kept_free_running(results_file, epoch):
    """What a new test_results.json keeps of the old one: decode.py's free-running decodes
    (``free_running`` and their ``wer_test_free_*`` files) when they decoded the checkpoint tested
    now (same epoch; the fingerprint refuses a finished folder with other options). Testing a
    finished run again must not lose them; decodes of another checkpoint are dropped, said in the log."""
    path = Path(results_file)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or not old.get("free_running"):
        return {}
    if old.get("epoch_loaded") != epoch:
        logger.warning(
            "%s: the free-running decodes of epoch %s are not of the checkpoint tested now (epoch %s): "
            "dropped from test_results.json (run decode.py again)",
            path,
            old.get("epoch_loaded"),
            epoch,
        )
        return {}
    files = {k: v for k, v in old.get("wer_files", {}).items() if k.startswith("wer_test_free_")}
    return {"free_running": old["free_running"], "wer_files": files}


class FusionKD(sb.Brain):
    """Trains the fusion student on teacher logits; scores it like the SA pipeline."""

    def compute_forward(self, batch, stage):
        """The student fuses the item's streams; in training, random stream subsets teach it to
        work with however many streams the test offers (one, for ``self`` and ``matched``)."""
        batch = batch.to(self.device)
        streams, noise = batch.stream_mask, None
        if stage == sb.Stage.TRAIN:
            noise = self.step_noise(batch)
            streams = drop_streams(streams, self.hparams.stream_dropout, noise=noise)
        return self.modules.student(batch.streams, streams, batch.stream_ids, noise=noise)

    def step_noise(self, batch):
        """Every random number of this training step (stream subsets, dropout), drawn for the whole
        global batch from (seed, epoch, step) and sliced to this process's rows: a run resumed from
        any checkpoint replays the uninterrupted run's steps, and N processes draw what one does."""
        # (hashes of tuples of ints are not randomised between Python processes)
        seed = hash((self.hparams.seed, self.hparams.epoch_counter.current, self.step))
        return StepNoise(seed, batch.rows, self.device)

    def compute_objectives(self, predictions, batch, stage):
        """KD to the teacher ensemble + CE to the reference, in float32; decode and score."""
        # In training the loss is a share of the global batch's mean: DDP averages the processes'
        # gradients, which then equal the gradient of the whole global batch's mean loss.
        positions = batch.global_positions / world_size() if stage == sb.Stage.TRAIN else None
        loss, kd, ce = kd_loss(
            predictions,
            batch.targets,
            batch.tokens,
            batch.pos_mask,
            self.hparams.temperature,
            self.hparams.alpha,
            positions=positions,
        )
        if stage != sb.Stage.TRAIN:
            n_pos = float(batch.pos_mask.sum())
            self.loss_parts["ce"] += float(ce) * n_pos
            self.loss_parts["kd"] += float(kd) * n_pos if kd is not None else 0.0
            self.loss_parts["positions"] += n_pos
            self.score(batch, "student", predictions)
            self.score(batch, "mean", self.mean_fusion(batch.logits, batch.stream_mask))
            if stage == sb.Stage.TEST:
                if batch.self_logits is not None:
                    self.score(batch, "sa_self", batch.self_logits)
                if self.hparams.input_streams == "cross":  # each teacher alone, same decode
                    for k, model in enumerate(self.hparams.fold_info["teachers"]):
                        self.score(batch, f"teacher_{model}", batch.logits[:, k])
        return loss

    def score(self, batch, system, logits):
        if system not in self.scores:
            self.scores[system] = SystemScores(self.hparams.tokenizer)
        self.scores[system].append(batch.id, logits.float(), batch.lengths, batch.word, batch.category, batch.mic)

    def fit_batch(self, batch):
        """One training step; the logged loss is the global batch's (the mean over processes)."""
        loss = super().fit_batch(batch)
        if is_distributed():
            loss = ddp_all_reduce(loss.to(self.device), torch.distributed.ReduceOp.AVG).cpu()
        return loss

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.lr_scheduler(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        if stage != sb.Stage.TRAIN:
            self.scores = {}
            self.loss_parts = {"kd": 0.0, "ce": 0.0, "positions": 0.0}
            # The untrained baseline of the same streams: no parameters, always probability mean.
            self.mean_fusion = MeanFusion("prob")

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
            return
        positions = max(self.loss_parts["positions"], 1.0)
        ties = None
        if stage == sb.Stage.TEST and self.hparams.input_streams == "cross":
            info = self.hparams.fold_info
            teachers = {f"teacher_{m}": self.scores[f"teacher_{m}"] for m in info["teachers"]}
            self.scores["majority_vote"], ties = majority_vote(teachers, self.hparams.tokenizer, teacher_ranks(info))
        results = {name: s.summary() for name, s in self.scores.items()}
        if ties is not None:
            results["majority_vote"]["ties"] = ties
        stats = {"loss": stage_loss, "CE": self.loss_parts["ce"] / positions}
        if stage == sb.Stage.VALID:
            stats["KD"] = self.loss_parts["kd"] / positions
            stats.update(
                WER=results["student"]["WER"],
                WRA=results["student"]["WRA"],
                WER_mean=results["mean"]["WER"],
                WRA_mean=results["mean"]["WRA"],
            )
            self.hparams.epoch_counter.update_metric(stage_loss)  # early stopping on valid loss
            self.hparams.train_logger.log_stats(
                {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            # On every rank: the checkpointer synchronises the ranks itself.
            # The validation figures go into the checkpoint's meta: the test reports those of the
            # kept checkpoint, which is what a choice between configurations may look at (the
            # held-out speaker's figures may not choose anything).
            meta = {"loss": stage_loss, "WER": stats["WER"], "WRA": stats["WRA"], "WRA_mean": stats["WRA_mean"]}
            self.checkpointer.save_and_keep_only(meta=meta, min_keys=["loss"])
            return
        stats.update(WER=results["student"]["WER"], WRA=results["student"]["WRA"])
        self.hparams.train_logger.log_stats({"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats)
        logger.info("Test (teacher-forced greedy decoding):\n%s", results_table(results))
        if if_main_process():
            self.write_test_outputs(results)

    def write_test_outputs(self, results):
        """wer_test.txt (student), wer_test_<baseline>.txt, test_utterances.json (every system on
        every utterance), test_results.json (last: it marks a finished run); written atomically."""
        out = Path(self.hparams.output_folder)
        # How each file was decoded, beside it (compare.py reads it: it warns across decodings).
        wer_files = {Path(self.hparams.test_wer_file).name: {"system": "student", "decoding": TEACHER_FORCED}}
        self.scores["student"].write_stats(self.hparams.test_wer_file)
        for name in results:
            if name != "student":
                self.scores[name].write_stats(out / f"wer_test_{name}.txt")
                wer_files[f"wer_test_{name}.txt"] = {"system": name, "decoding": TEACHER_FORCED}
        ctc = {}
        for system, decoders in self.hparams.ctc_scores.items():
            ctc[system] = {decoder: scores.summary() for decoder, scores in decoders.items()}
            for decoder, scores in decoders.items():
                name = f"wer_test_ctc_{decoder}_{system}.txt"
                scores.write_stats(out / name)
                wer_files[name] = {"system": system, "decoding": CTC_DECODINGS[decoder]}
        write_utterances(self.hparams.test_utterances_file, self.scores)
        kept = kept_free_running(self.hparams.test_results_file, self.hparams.epoch_counter.current)
        wer_files.update(kept.get("wer_files", {}))
        partial = partial_run(self.debug, results["student"]["n"], self.hparams.n_test_items)
        if partial:
            logger.warning("PARTIAL RUN: %s: these are not the fold's figures", partial)
        write_json(
            self.hparams.test_results_file,
            {
                **self.hparams.fold_info,
                # Why these figures are not the fold's (None: they are): make_tables.py refuses them.
                "partial": partial,
                "n_test_items": self.hparams.n_test_items,
                "threads": self.hparams.threads,
                "cpu_kernels": cpu_kernels.describe(),
                "processes": world_size(),
                "n_utterances": results["student"]["n"],
                "epoch_loaded": self.hparams.epoch_counter.current,
                "decoding": TEACHER_FORCED,
                "wer_files": wer_files,
                "student": results["student"],
                # The kept checkpoint's validation figures (training audio only): what ablate.py
                # chooses configurations by. None for a fusion without parameters (no training).
                "validation": getattr(self, "kept_validation", None),
                "baselines": {name: r for name, r in results.items() if name != "student"},
                # Free-running CTC decodes of the held-out audio: they do not see the reference.
                "free_running_ctc": ctc,
                # decode.py's decodes of this same checkpoint, kept when a finished run is tested again
                **({"free_running": kept["free_running"]} if kept.get("free_running") else {}),
            },
        )
        if ctc:
            logger.info(
                "Free-running CTC decoding (not teacher-forced):\n%s",
                results_table({f"{system} ({decoder})": r for system, d in ctc.items() for decoder, r in d.items()}),
            )

    def on_evaluate_start(self, max_key=None, min_key=None):
        # Load the best checkpoint for the test, but keep train_log.txt as it is (a checkpoint
        # restores it only when training resumes from it).
        with self.hparams.train_log_state.kept():
            super().on_evaluate_start(max_key=max_key, min_key=min_key)
        self.kept_validation = kept_validation(self.checkpointer, min_key)

    def init_optimizers(self):
        # The `mean` fusion has no parameters: nothing to optimise (Adam refuses an empty list).
        if any(p.requires_grad for p in self.modules.parameters()):
            super().init_optimizers()

    def _train_loader_specifics(self, dataset, loader_kwargs):
        # The recipe's own batch sampler yields the same global batches in every process, and the
        # collate function gives each process its share (local/batch.py). SpeechBrain's version
        # would wrap it in a DistributedSamplerWrapper (whole batches per process: a global batch
        # N times larger, N times fewer steps) and, outside DDP, never call set_epoch on it.
        self.train_sampler = loader_kwargs["batch_sampler"]
        return loader_kwargs


def kept_validation(checkpointer, min_key):
    """The validation figures of the checkpoint the test loads (its loss, the student's WRA
    and the untrained mean's on the same validation items), or None when nothing was trained.
    For ``self`` and ``matched`` a validation item is one teacher speaker's own stream, so
    ``WRA_mean`` is that speaker's own model alone: ``sa_self``'s counterpart on the teachers."""
    if checkpointer is None:
        return None
    ckpt = checkpointer.find_checkpoint(min_key=min_key)
    if ckpt is None or "WRA" not in ckpt.meta:  # untrained, or saved before the meta held WRA
        return None
    meta = ckpt.meta
    return {
        "loss": float(meta["loss"]),
        "WRA": float(meta["WRA"]),
        "WRA_mean": float(meta["WRA_mean"]),
    }


def partial_run(debug, n_scored, n_items):
    """Why a test covers less than the fold (None when it covers it all): ``--debug`` stops each
    stage after a few batches."""
    if n_scored == n_items and not debug:
        return None
    why = "--debug (a few batches per stage, a few epochs)" if debug else "not every test utterance was scored"
    return f"{why}: {n_scored} of the fold's {n_items} test utterances"


def check_not_finished(results_file):
    """RunError if ``results_file`` holds a finished (not partial) run: a --debug run would replace
    its figures with those of a few batches."""
    path = Path(results_file)
    if not path.is_file():
        return
    try:
        partial = json.loads(path.read_text(encoding="utf-8")).get("partial")
    except (OSError, ValueError, AttributeError):
        partial = None
    if not partial:
        raise RunError(
            f"--debug into {path.parent}, which holds a finished run: its results would be replaced by those "
            f"of a few batches; give another --output_folder"
        )


def uses_demo_tree(hparams):
    """True when logit_root is the embedded demo tree (the default of every fold)."""
    demo = Path(hparams["demo_folder"]) / "logit_extraction"
    return Path(hparams["logit_root"]).resolve() == demo.resolve()


def prepare_fold(hparams):
    """Reads the fold's logits in place and checks everything before anything is trained or
    written: teachers, stores, validation split, honesty rules, KD targets, CTC decodes. Under
    DDP the first process of each node reads the source files and builds the packed caches; the
    others then map them (sharing the pages); a failure anywhere stops every process."""
    if uses_demo_tree(hparams):
        held_out = hparams["held_out"]
        teachers = teacher_speakers(held_out, hparams["teacher_set"], hparams["teachers"], hparams["exclude_speakers"])
        train_pairs, test_pairs = fold_pairs(hparams, teachers)
        agree(
            ensure_demo_tree,
            folder=hparams["demo_folder"],
            pairs=train_pairs + test_pairs,
            errors=(DemoTreeError,),
            on=lambda: local_rank() == 0,
        )
    first = agree(load_fold, hparams, errors=INPUT_ERRORS, on=lambda: local_rank() == 0)
    others = agree(load_fold, hparams, errors=INPUT_ERRORS, on=lambda: local_rank() != 0)
    fold = first or others
    fold.ctc_scores = agree(score_ctc_decodes, hparams, fold, errors=INPUT_ERRORS, on=if_main_process) or {}
    return fold


def score_ctc_decodes(hparams, fold):
    """The free-running CTC decodes of the test (``--ctc_decode``), or {}."""
    if hparams["ctc_decode"] is False:
        return {}
    cross = hparams["input_streams"] == "cross"
    systems = ctc_systems(hparams["logit_root"], fold.info["held_out"], fold.info["teachers"], cross)
    if hparams["ctc_decode"] is True and (not systems or (cross and "mean" not in systems)):
        raise LogitStoreError(
            f"ctc_decode: true, but the CTC files of the test are missing under "
            f"{hparams['logit_root']} (<MODEL>/{fold.info['held_out']}/{fold.info['held_out']}_ctc_logits.pt)"
        )
    # The closed word list of the block: the teacher speakers' words (never the test references).
    word_list = fold.train_store.words
    return score_ctc(
        hparams["logit_root"], fold.info["held_out"], systems, fold.splits["test"], fold.tokenizer, word_list
    )


def fold_pairs(hparams, teachers):
    """The (model, audio speaker) pairs of the fold's training and test stores."""
    return store_pairs(
        hparams["held_out"], teachers, hparams["input_streams"], hparams["cross_audio"], hparams["exclude_speakers"]
    )


def load_fold(hparams):
    tokenizer = load_tokenizer(hparams["tokenizer_file"])
    tokens = TokenTable(tokenizer)
    held_out = hparams["held_out"]
    teachers = teacher_speakers(held_out, hparams["teacher_set"], hparams["teachers"], hparams["exclude_speakers"])
    train_pairs, test_pairs = fold_pairs(hparams, teachers)
    cross = hparams["input_streams"] == "cross"
    dtype = getattr(torch, hparams["store_dtype"])
    cache = hparams["cache_folder"]
    # What the students read of the teacher streams is computed once here, when the files are packed
    # (features.py), unless precompute_features is off (then at every step, from the raw logits).
    packing = {}
    if hparams["precompute_features"]:
        packing = {
            "mix_temperature": hparams["mix_temperature"],
            "evidence_k": max(hparams["top_k"], hparams["evidence_k"]),
        }
    try:
        train_store = LogitStore(hparams["logit_root"], tokens, train_pairs, dtype, cache, **packing)
    except LogitStoreError as err:
        if cross and hparams["cross_audio"] == "all_others" and "missing folder" in str(err):
            raise LogitStoreError(
                f"{err} (cross_audio: all_others reads the teacher models on every other speaker's audio; "
                f"--cross_audio=teachers reads the teacher speakers' audio only)"
            ) from None
        raise
    test_store = LogitStore(
        hparams["logit_root"],
        tokens,
        test_pairs,
        dtype,
        cache,
        optional=optional_pairs(held_out, hparams["input_streams"]),
        **packing,
    )
    valid_groups = validation_groups(train_store, hparams["valid_fraction"], hparams["seed"])
    splits = build_items(
        train_store, test_store, held_out, teachers, hparams["input_streams"], valid_groups, hparams["matched_items"]
    )
    check_honesty(splits, train_store, test_store, held_out)
    # The ranking of the teacher models on every stream of the training audio, train and validation
    # items (never the test; combine.RANKING_RULE): the best single teacher and the vote's tie-break.
    # Their accuracy on the training items' streams alone (not validation, which selects the model):
    # the weights of the `weighted` target.
    streams = {name: [j for item in splits[name].values() for j in item["streams"]] for name in ("train", "valid")}
    scores = stream_scores(train_store, streams["train"] + streams["valid"])
    ranking = teacher_ranking(train_store, streams["train"] + streams["valid"], scores)
    quality = teacher_quality(train_store, streams["train"], scores)
    target_sets = [item["target"] for name in ("train", "valid") for item in splits[name].values()]
    weights = quality if hparams["target_aggregation"] == "weighted" else None
    targets = EnsembleTargets(
        train_store, target_sets, hparams["temperature"], hparams["target_aggregation"], weights, dtype, cache
    )
    kind = data_kind.DEMO if uses_demo_tree(hparams) else data_kind.of_folder(hparams["logit_root"])
    info = {
        "held_out": held_out,
        "group": intelligibility_group(held_out),
        "teachers": teachers,
        "teacher_set": hparams["teacher_set"] if hparams["teachers"] is None else "explicit",
        "input_streams": hparams["input_streams"],
        "matched_items": hparams["matched_items"],
        # The options the per-teacher-set choice of logit_kd.yaml gave this run ({}: none)
        "matched_choice": dict(hparams.get("matched_choice_applied") or {}),
        "fusion": hparams["fusion"],
        "target_aggregation": hparams["target_aggregation"],
        "temperature": hparams["temperature"],
        "alpha": hparams["alpha"],
        "seed": hparams["seed"],
        "logit_root": str(Path(hparams["logit_root"]).resolve()),
        "tokenizer_file": str(Path(hparams["tokenizer_file"]).resolve()),
        "synthetic_data": kind != data_kind.REAL,  # demo tree or rehearsal corpus
        "data_kind": kind,
        # The teachers' accuracy on the training audio (train + valid items), the ranking's first key
        "teacher_accuracy": {m: r["accuracy"] for m, r in ranking.items()},
        "teacher_ranking": ranking,
        "train_audio": sorted(set(train_store.stream_speaker)),
    }
    if cross:
        info["cross_audio"] = hparams["cross_audio"]
        # The baseline "best single teacher", chosen on the training audio (combine.RANKING_RULE)
        names = sorted(ranking)
        best = names[best_single([rank_key(ranking[m]["accuracy"], ranking[m]["mean_logprob"]) for m in names], names)]
        info["best_single_teacher"] = {"name": best, **ranking[best], "rule": RANKING_RULE}
    return SimpleNamespace(
        tokenizer=tokenizer, train_store=train_store, test_store=test_store, splits=splits, targets=targets, info=info
    )


def dataio_prepare(fold):
    """DynamicItemDatasets of the fold's items and their collate functions (gather by index)."""
    datasets, collate = {}, {}
    for name, store in (("train", fold.train_store), ("valid", fold.train_store), ("test", fold.test_store)):
        data = {
            item_id: {
                "streams": item["streams"],
                "target_index": fold.targets.index(item["target"]),
                "self_stream": item["self_stream"],
                "word": item["word"],
                "category": item["category"],
                "mic": item["mic"],
            }
            for item_id, item in fold.splits[name].items()
        }
        datasets[name] = DynamicItemDataset(data, output_keys=OUTPUT_KEYS)
        # Training batches are global batches shared out over the processes; validation and test
        # are not sharded: every process scores every utterance (only the main one writes).
        share = (
            {"rank": torch.distributed.get_rank(), "world_size": world_size()}
            if name == "train" and is_distributed()
            else {}
        )
        collate[name] = functools.partial(
            FoldBatch, store=store, targets=fold.targets if name != "test" else None, **share
        )
    return datasets, collate


def parse_arguments(argv):
    """SpeechBrain's command line; ``--help`` lists the recipe's options too."""
    if any(a in ("-h", "--help") for a in argv):
        try:
            sb.parse_arguments(["--help"])
        except SystemExit:
            pass
        files = [a for a in argv if a.endswith((".yaml", ".yml"))]
        try:
            print("\n" + describe_options(files[0] if files else str(Path(__file__).parent / "hparams/logit_kd.yaml")))
        except HparamsError as err:
            stop(str(err))
        sys.exit(0)
    return sb.parse_arguments(argv)


def preflight(hparams_file, run_opts, overrides):
    """Everything that can stop a run, before anything is written into its output folder: the
    options, the output folder (usable), the checkpoints already there (made with this run's
    options: checked before any input is read or cached), the folder's lock (no other run in it),
    the inputs, the checkpoints again (this run's data; every file readable; no epoch past
    number_of_epochs). Returns (base_file, fold_overrides, hparams, fold, student, lock,
    fingerprint); stops every process with one line otherwise, and removes an output folder it made."""
    hparams, fresh, lock = None, False, None
    try:
        loaded = agree(load_fold_hparams, hparams_file, overrides, check=False, errors=(HparamsError,))
        base_file, fold_overrides, hparams = loaded
        fresh = made_by_this_run(hparams["output_folder"], hparams["save_folder"])
        agree(check_hparams, hparams, errors=(HparamsError,))
        agree(check_run_options, run_opts, errors=(HparamsError,))
        if hparams["batch_size"] % world_size():
            raise RunError(
                f"--batch_size={hparams['batch_size']} is the global batch: it must be a multiple of the "
                f"{world_size()} processes"
            )
        agree(check_writable, hparams["output_folder"])
        if run_opts.get("debug"):
            agree(check_not_finished, hparams["test_results_file"])
        teachers = agree(
            teacher_speakers,
            hparams["held_out"],
            hparams["teacher_set"],
            hparams["teachers"],
            hparams["exclude_speakers"],
            errors=(FoldError,),
        )
        options = option_fingerprint(hparams, teachers, run_opts)
        chosen = hparams["matched_choice_applied"]
        agree(check_fingerprint, hparams["save_folder"], options, chosen, errors=(FingerprintError,))
        lock = agree(lambda: OutputLock(hparams["output_folder"]).acquire(), on=if_main_process)
        # Reading and packing the fold uses every core (row by row, its results do not depend on the
        # thread count: tested); training and the test use the pinned `threads`.
        torch.set_num_threads(os.cpu_count() or 1)
        fold = prepare_fold(hparams)
        torch.set_num_threads(hparams["threads"])
        fingerprint = make_fingerprint(hparams, fold, run_opts)
        agree(check_fingerprint, hparams["save_folder"], fingerprint, chosen, errors=(FingerprintError,))
        student = hparams["student"](vocab_size=fold.train_store.vocab_size, n_identities=len(SPEAKERS))
        trainable = any(p.requires_grad for p in student.parameters())
        test_only = bool(run_opts.get("test_only"))
        epochs = agree(
            check_checkpoints,
            hparams["save_folder"],
            {"student": student},
            expected=CHECKPOINT_FILES if trainable else (),
            resume=not test_only,
            errors=(CheckpointError,),
        )
        agree(check_epochs, hparams["save_folder"], epochs, hparams["number_of_epochs"], errors=(FingerprintError,))
        if test_only and trainable and not epochs:
            raise RunError(f"--test_only but no checkpoint in {hparams['save_folder']}: train this fold first.")
        return base_file, fold_overrides, hparams, fold, student, lock, fingerprint
    except INPUT_ERRORS as err:
        # Nothing in output_folder was written. A folder this run made (loading the hparams makes
        # an empty save folder; the lock file) is removed again, unless another run holds it.
        if lock is not None:
            lock.release()
        if fresh and if_main_process():
            try:
                OutputLock(hparams["output_folder"]).acquire().release()
                remove(hparams["output_folder"])
            except RunError:
                pass
        stop(str(err))


def main(argv):
    started = time.monotonic()
    hparams_file, run_opts, overrides = parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)
    release_at_exit()
    base_file, fold_overrides, hparams, fold, student, lock, fingerprint = preflight(hparams_file, run_opts, overrides)

    # SpeechBrain's experiment folder, with hyperparams.yaml written atomically and log.txt a whole
    # line at a time (a full disk then loses nothing of a finished folder: local/run_folder.py)
    # hyperparams.yaml holds the options the run resolved to (the choice per teacher set among its
    # overrides), so it is written with the choice off: loaded again, it gives this run's options
    write_hyperparams(hparams["output_folder"], base_file, {**fold_overrides, "matched_choice": False})
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"], log_config=str(LOG_CONFIG))
    if fold.info["data_kind"] == data_kind.REHEARSAL:
        logger.warning(
            "The input is the rehearsal corpus (%s): SYNTHETIC speech, real models. Not UASpeech.",
            hparams["logit_root"],
        )
    elif fold.info["synthetic_data"]:
        logger.warning(
            "The input is a SYNTHETIC logit tree (%s), not UASpeech: its figures only show that "
            "the recipe runs. Give --logit_root and --tokenizer_file for real data.",
            hparams["logit_root"],
        )
    logger.info(
        "Fold %s (%s): teachers %s, input_streams=%s, fusion=%s; %d train, %d valid, %d test items",
        fold.info["held_out"],
        fold.info["group"],
        " ".join(fold.info["teachers"]),
        fold.info["input_streams"],
        fold.info["fusion"],
        *(len(fold.splits[s]) for s in ("train", "valid", "test")),
    )
    if fold.info["matched_choice"]:
        logger.info(
            "Options chosen for %s teachers with the speaker's own model as the test input (matched_choices "
            "of %s; --matched_choice=false: the options as written): %s",
            fold.info["teacher_set"],
            Path(base_file).name,
            describe_choice(fold.info["matched_choice"]),
        )
    for name, table in (
        ("train/valid logits", fold.train_store),
        ("test logits", fold.test_store),
        ("KD targets", fold.targets),
    ):
        source = "mapped from the cache" if table.from_cache else "built from the source files"
        logger.info("Packed %s: %d rows x %d, %s; %s", name, *table.data.shape, table.data.dtype, source)
    if hparams["cache_folder"] is not None:
        cache = Path(hparams["cache_folder"])
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        logger.info("Cache folder %s: %.2f GiB (shared by the runs of this data tree)", cache.resolve(), size / 2**30)
    datasets, collate = dataio_prepare(fold)
    hparams["tokenizer"] = fold.tokenizer
    # What this run changed on top of the base hparams (fold file + command line), so that a
    # results file says how it was made (hyperparams.yaml beside it has everything).
    fold.info["overrides"] = {
        k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in fold_overrides.items()
    }
    hparams["fold_info"] = fold.info
    hparams["n_test_items"] = len(fold.splits["test"])
    hparams["ctc_scores"] = fold.ctc_scores
    if hparams["device_resident"] and not str(run_opts.get("device") or sb.utils.distributed.infer_device()).startswith(
        "cpu"
    ):
        # The packed fold on the accelerator: batches are gathered there, nothing crosses the bus per step.
        device = run_opts.get("device") or sb.utils.distributed.infer_device()
        for table in (fold.train_store, fold.test_store, fold.targets):
            table.to(device)
        logger.info("Packed fold resident on %s", device)
    hparams["checkpointer"].add_recoverable("student", student)
    hparams["checkpointer"].add_recoverable(FINGERPRINT, RunFingerprint(fingerprint))
    brain = FusionKD(
        modules={"student": student},
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )

    try:
        trainable = any(p.requires_grad for p in student.parameters())
        if not trainable:
            logger.info("The %s fusion has no parameters: nothing to train, scoring it directly.", hparams["fusion"])
        else:
            brain.fit(
                brain.hparams.epoch_counter,
                datasets["train"],
                datasets["valid"],
                train_loader_kwargs={
                    "batch_sampler": GlobalBatchSampler(
                        len(datasets["train"]), hparams["batch_size"], hparams["seed"], hparams["max_train_items"]
                    ),
                    "collate_fn": collate["train"],
                    "num_workers": hparams["num_workers"],
                },
                valid_loader_kwargs={"batch_size": hparams["batch_size"], "collate_fn": collate["valid"]},
            )
        brain.evaluate(
            datasets["test"],
            min_key="loss",
            test_loader_kwargs={"batch_size": hparams["batch_size"], "collate_fn": collate["test"]},
        )
    except DiskFullError as err:
        stop(str(err))
    finally:
        if lock is not None:
            lock.release()
    if if_main_process():
        # The answer last, where the eye lands: log.txt keeps everything above it.
        print(closing_block(hparams["test_results_file"], seconds=time.monotonic() - started), flush=True)
    # With --models: the free-running decode of the test audio (decode.py), after the test.
    run_after_test(hparams, run_opts)


if __name__ == "__main__":
    main(sys.argv[1:])
    leave(0)  # under torchrun: every process leaves together, past the interpreter's teardown
