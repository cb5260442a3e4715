"""The rehearsal corpus's ASR models and language model, trained with SpeechBrain's own machinery.

``ASRBrain`` trains a TransformerASR (conformer encoder, transformer decoder, CNN front end,
Fbank + global InputNormalization) with the joint CTC/attention loss of the SA pipeline:
``ctc_weight * CTC + (1 - ctc_weight) * seq2seq NLL`` (label smoothing), Adam with the Noam
schedule, gradient clipping; on the validation set (the SA protocol: the speaker's B2) it decodes
free-running with ``valid_search`` and keeps the checkpoint with the highest word recognition
accuracy (WRA, the share of utterances whose words are all right, a fraction as in the SA
pipeline's ``CKPT.yaml``). ``LMBrain`` trains the TransformerLM on the word list's text, one word
a sentence. The data pipelines are SpeechBrain ``DynamicItemDataset`` pipelines on the corpus's
CSVs (``ID,duration,wav,spk_id,wrd``).

Randomness: each training batch reseeds torch from (seed, epoch, step) and the sampler is
SpeechBrain's ``ReproducibleRandomSampler`` (seed + epoch), so that a run resumed from any
checkpoint (end of epoch or intra-epoch) continues exactly as the uninterrupted run would have.
"""

import time
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.dataio.dataio import load_data_csv
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.sampler import ReproducibleRandomSampler

SEED_MIX = (1_000_003, 10_007)


def batch_seed(seed, epoch, step):
    """The torch seed of one training batch (dropout, augmentation)."""
    return (int(seed) * SEED_MIX[0] + int(epoch) * SEED_MIX[1] + int(step)) % (2**63 - 1)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_csvs(csv_files, data_root):
    """{utterance id: row} of SpeechBrain CSVs, ``$data_root`` replaced."""
    data = {}
    for csv_file in csv_files:
        data.update(load_data_csv(str(csv_file), replacements={"data_root": str(data_root)}))
    return data


def asr_dataset(csv_files, data_root, tokenizer, hparams, train=False):
    """A DynamicItemDataset of the CSVs with the SA pipeline's audio and text pipelines
    (``sig``; ``tokens_bos`` = <s> + pieces, ``tokens_eos`` = pieces + </s>, ``tokens``).
    Not for training: sorted by duration, as the SA pipeline's validation and test sets."""
    data = DynamicItemDataset(read_csvs(csv_files, data_root))
    if not train:
        data = data.filtered_sorted(sort_key="duration")
    elif hparams["sorting"] in ("ascending", "descending"):
        data = data.filtered_sorted(sort_key="duration", reverse=hparams["sorting"] == "descending")

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens_list", "tokens_bos", "tokens_eos", "tokens")
    def text_pipeline(wrd):
        yield wrd
        tokens_list = tokenizer.encode_as_ids(wrd)
        yield tokens_list
        yield torch.LongTensor([hparams["bos_index"]] + tokens_list)
        yield torch.LongTensor(tokens_list + [hparams["eos_index"]])
        yield torch.LongTensor(tokens_list)

    data.add_dynamic_item(audio_pipeline)
    data.add_dynamic_item(text_pipeline)
    data.set_output_keys(["id", "sig", "wrd", "tokens_bos", "tokens_eos", "tokens"])
    return data


def train_loader_kwargs(dataset, hparams):
    """The training loader's options: SpeechBrain's DynamicBatchSampler when the hparams ask for
    dynamic batching (as the SA yaml), else ``batch_size`` utterances shuffled by
    ReproducibleRandomSampler (``sorting: random``); both seeded by the hparams' seed, their epoch
    set by the Brain."""
    if hparams.get("dynamic_batching"):
        from speechbrain.dataio.sampler import DynamicBatchSampler

        sampler = DynamicBatchSampler(
            dataset,
            length_func=lambda x: float(x["duration"]),
            seed=int(hparams["seed"]),
            **hparams["dynamic_batch_sampler_train"],
        )
        return {"batch_sampler": sampler, "num_workers": hparams["num_workers"]}
    kwargs = dict(hparams["train_dataloader_opts"])
    if hparams["sorting"] == "random":
        kwargs["sampler"] = ReproducibleRandomSampler(dataset, seed=int(hparams["seed"]))
    return kwargs


def lm_dataset(words, tokenizer, hparams):
    """One sentence per word of the list (ids ``w0000``...), the LM's text pipeline."""
    data = DynamicItemDataset({f"w{i:04d}": {"wrd": w} for i, w in enumerate(sorted(words))})

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens_bos", "tokens_eos")
    def text_pipeline(wrd):
        tokens_list = tokenizer.encode_as_ids(wrd)
        yield torch.LongTensor([hparams["bos_index"]] + tokens_list)
        yield torch.LongTensor(tokens_list + [hparams["eos_index"]])

    data.add_dynamic_item(text_pipeline)
    data.set_output_keys(["id", "tokens_bos", "tokens_eos"])
    return data


# --------------------------------------------------------------------------------------------
# Brains
# --------------------------------------------------------------------------------------------


class SeededBrain(sb.Brain):
    """A Brain whose training batches draw their randomness from (seed, epoch, step), and whose
    sampler follows the epoch (Brain only moves the samplers it made itself)."""

    def on_stage_start(self, stage, epoch=None):
        self.stage_start = time.time()
        self.stage_cpu = time.process_time()  # CPU seconds of every thread: the cost on shared cores
        if stage == sb.Stage.TRAIN:
            self.epoch = epoch
            sampler = getattr(self, "sampler", None)
            if sampler is not None:
                sampler.set_epoch(epoch)

    def on_fit_batch_start(self, batch, should_step):
        torch.manual_seed(batch_seed(self.hparams.seed, self.epoch, self.step))

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.noam_annealing(self.optimizer)

    def fit_with_sampler(self, epoch_counter, train_set, valid_set, train_kwargs, valid_kwargs, progressbar):
        self.sampler = train_kwargs.get("sampler", train_kwargs.get("batch_sampler"))
        self.validates = valid_set is not None
        self.fit(
            epoch_counter,
            train_set,
            valid_set,
            progressbar=progressbar,
            train_loader_kwargs=train_kwargs,
            valid_loader_kwargs=valid_kwargs,
        )


class ASRBrain(SeededBrain):
    """Joint CTC/attention training of an SA-architecture TransformerASR (see the module doc)."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos
        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        if stage == sb.Stage.TRAIN and self.hparams.augment:
            # time and frequency drops only: the batch and its labels stay as they are
            feats, _ = self.hparams.fea_augment(feats, wav_lens)
        src = self.modules.CNN(feats)
        enc_out, pred = self.modules.Transformer(src, tokens_bos, wav_lens, pad_idx=self.hparams.pad_index)
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc_out))
        p_seq = self.hparams.log_softmax(self.modules.seq_lin(pred))
        hyps = None
        if stage != sb.Stage.TRAIN:
            hyps, _, _, _ = self.hparams.valid_search(enc_out.detach(), wav_lens)
        return p_ctc, p_seq, wav_lens, hyps

    def compute_objectives(self, predictions, batch, stage):
        p_ctc, p_seq, wav_lens, hyps = predictions
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        tokens, tokens_lens = batch.tokens
        loss_seq = self.hparams.seq_cost(p_seq, tokens_eos, length=tokens_eos_lens).sum()
        loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens).sum()
        loss = self.hparams.ctc_weight * loss_ctc + (1 - self.hparams.ctc_weight) * loss_seq
        if stage != sb.Stage.TRAIN:
            tokenizer = self.hparams.tokenizer
            predicted = [tokenizer.decode_ids([int(t) for t in h]).split(" ") for h in hyps]
            targets = [w.split(" ") for w in batch.wrd]
            self.wer_metric.append(batch.id, predicted, targets)
            self.cer_metric.append(batch.id, predicted, targets)
            self.acc_metric.append(p_seq, tokens_eos, tokens_eos_lens)
            self.words_right += sum(p == t for p, t in zip(predicted, targets))
            self.words_total += len(targets)
        return loss

    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        if stage != sb.Stage.TRAIN:
            self.acc_metric = self.hparams.acc_computer()
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()
            self.words_right, self.words_total = 0, 0

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            stats["train_time"] = round(time.time() - self.stage_start, 1)
            stats["train_cpu"] = round(time.process_time() - self.stage_cpu, 1)
            self.train_stats = stats
            if not self.validates:
                # The SI model has no validation set (it trains on every B1 and B2): it keeps its
                # latest epoch.
                self.hparams.train_logger.log_stats(
                    stats_meta={
                        "epoch": epoch,
                        "lr": self.hparams.noam_annealing.current_lr,
                        "steps": self.optimizer_step,
                    },
                    train_stats=stats,
                )
                self.checkpointer.save_and_keep_only(meta={"loss": stage_loss, "epoch": epoch}, num_to_keep=1)
            return
        stats["ACC"] = self.acc_metric.summarize()
        stats["WER"] = self.wer_metric.summarize("error_rate")
        stats["CER"] = self.cer_metric.summarize("error_rate")
        stats["WRA"] = self.words_right / max(self.words_total, 1)
        stats["inference_time"] = round(time.time() - self.stage_start, 1)
        stats["inference_cpu"] = round(time.process_time() - self.stage_cpu, 1)
        self.last_stats = stats
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": self.hparams.noam_annealing.current_lr, "steps": self.optimizer_step},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            # The SA pipeline's CKPT.yaml keys; the best by WRA is kept (and the latest, to resume).
            self.checkpointer.save_and_keep_only(
                meta={"ACC": stats["ACC"], "WER": stats["WER"], "WRA": stats["WRA"], "epoch": epoch},
                max_keys=[self.hparams.max_metric_key],
                num_to_keep=self.hparams.num_checkpoints_to_keep,
            )
        else:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
            )
            with open(self.test_wer_file, "w", encoding="utf-8") as handle:
                self.wer_metric.write_stats(handle)
            # WRA per audio speaker (the SI model is tested on every speaker's B3 at once)
            right, total = {}, {}
            for score in self.wer_metric.scores:
                spk = score["key"].split("_")[0]
                total[spk] = total.get(spk, 0) + 1
                right[spk] = right.get(spk, 0) + int(score["num_edits"] == 0)
            self.wra_by_speaker = {spk: right[spk] / total[spk] for spk in sorted(total)}

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Loads the checkpoint the SA pipeline tested (and extract_logits.py and decode.py load):
        the highest WRA on validation, ties to the most recent; without validation, the latest."""
        from local.sa_models import resolve_checkpoint

        path, meta, how = resolve_checkpoint(self.checkpointer.checkpoints_dir)
        self.checkpointer.load_checkpoint(next(c for c in self.checkpointer.list_checkpoints() if c.path == path))
        self.chosen = (path, meta, how)


class LMBrain(SeededBrain):
    """Trains the TransformerLM: next-piece NLL on <s> + pieces -> pieces + </s>."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        tokens_bos, _ = batch.tokens_bos
        return self.hparams.log_softmax(self.modules.lm_model(tokens_bos))

    def compute_objectives(self, predictions, batch, stage):
        tokens_eos, tokens_len = batch.tokens_eos
        return self.hparams.compute_cost(predictions, tokens_eos, length=tokens_len)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            stats = {
                "loss": stage_loss,
                "train_time": round(time.time() - self.stage_start, 1),
                "train_cpu": round(time.process_time() - self.stage_cpu, 1),
            }
            self.hparams.train_logger.log_stats(stats_meta={"epoch": epoch}, train_stats=stats)
            self.checkpointer.save_and_keep_only(meta={"loss": stage_loss, "epoch": epoch}, num_to_keep=1)
            self.last_loss = stage_loss


def folder_size(path):
    """Bytes under ``path`` (symlinks not followed)."""
    path = Path(path)
    if not path.exists():
        return 0
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
