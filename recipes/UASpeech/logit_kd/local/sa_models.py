"""The SA models and the audio they run on: a speaker's SpeechBrain CSV, and an SA model built from
its SpeechBrain hparams yaml and loaded from its checkpoint, offline, in eval mode.

An SA model is a SpeechBrain Transformer ASR model of the LibriSpeech conformer recipe family,
fine-tuned on one dysarthric speaker: ``compute_features`` (Fbank) -> ``normalize``
(InputNormalization, global) -> ``CNN`` (ConvolutionFrontEnd) -> ``Transformer`` (TransformerASR,
conformer encoder, transformer decoder) -> ``seq_lin`` / ``ctc_lin`` (Linear). Used by
``extract_logits.py`` (teacher-forced logits) and ``decode.py`` (free-running decoding).
"""

import contextlib
import inspect
import io
import logging
import pydoc
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from local.corpus import parse_utterance_id

# hparams keys the forward pass needs, and keys used when the yaml has them.
REQUIRED_KEYS = ("compute_features", "CNN", "Transformer", "seq_lin", "ctc_lin")
OPTIONAL_KEYS = ("normalize", "model", "pad_index", "bos_index", "eos_index", "sample_rate")
# The module order of the SA recipe's `model` ModuleList (its model.ckpt).
MODEL_LIST = ("CNN", "Transformer", "seq_lin", "ctc_lin")
BOS, EOS = 1, 2

logger = logging.getLogger(__name__)


class ExtractionError(RuntimeError):
    """A problem with one model, speaker or pair; the message names it."""


# --------------------------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------------------------


@dataclass
class Utterance:
    id: str
    wav: str
    word: str
    duration: float


# Most a recording's length (samples / rate) may differ from its CSV duration, in seconds. The SA
# pipeline's CSVs hold num_frames / sample_rate exactly; this only absorbs rounding when written.
DURATION_TOLERANCE = 0.1
CSV_COLUMNS = ("ID", "duration", "wav", "wrd")


def scan_speaker_csv(csv_path, speaker, text):
    """Every row of a speaker's CSV checked as text, before SpeechBrain's reader sees it (which fails
    with a TypeError on a row of too few or too many fields, and takes any duration): each row has
    the header's fields, a finite positive duration and (with a ``spk_id`` column) the CSV's
    speaker. Returns {utterance id: line number}; ExtractionError naming the file, the line and
    the utterance otherwise."""
    import csv
    import math

    reader = csv.reader(io.StringIO(text), skipinitialspace=True)  # as SpeechBrain's DictReader
    header = next(reader, [])
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ExtractionError(
            f"speaker {speaker}: CSV {csv_path} lacks the column(s) {missing} (expected ID,duration,wav,spk_id,wrd)"
        )
    column = {name: header.index(name) for name in header}
    line_of = {}
    while True:
        line = reader.line_num + 1  # where the row starts (an unclosed quote runs on to later lines)
        row = next(reader, None)
        if row is None:
            break
        if not row:
            continue
        utt_id = row[column["ID"]] if column["ID"] < len(row) else "?"
        where = f"speaker {speaker}: CSV {csv_path}, line {line}, utterance {utt_id}"
        if len(row) != len(header):
            runs_on = f" (an unclosed quote runs on to line {reader.line_num})" if reader.line_num > line else ""
            raise ExtractionError(
                f"{where}: {len(row)} field(s), the header has {len(header)} ({','.join(header)}){runs_on}"
            )
        text_value = row[column["duration"]]
        try:
            duration = float(text_value)
        except ValueError:
            duration = math.nan
        if not (math.isfinite(duration) and duration > 0):
            raise ExtractionError(f"{where}: duration {text_value!r} is not a finite positive number of seconds")
        if "spk_id" in column and row[column["spk_id"]] != speaker:
            raise ExtractionError(f"{where}: spk_id {row[column['spk_id']]!r} is not the CSV's speaker {speaker}")
        line_of.setdefault(utt_id, line)
    return line_of


def check_wav_name(wav, utt_id, where):
    """A recording named as a UASpeech utterance (``<SPK>_B<n>_<WORD>_M<k>.wav``, as the SA
    pipeline's CSVs name them: the id is the file's name) must be that utterance's: a row that
    points at another speaker's (or another utterance's) recording is refused. Files named
    otherwise are not checked."""
    stem = Path(str(wav)).stem
    try:
        spk = parse_utterance_id(stem)["speaker"]
    except ValueError:
        return
    if stem != utt_id:
        whose = f"speaker {spk}'s" if spk != parse_utterance_id(utt_id)["speaker"] else "another utterance's"
        raise ExtractionError(f"{where}, utterance {utt_id}: its wav {wav} is {whose} recording {stem}")


def read_speaker_csv(csv_path, speaker, data_root=None):
    """The utterances of one speaker's SpeechBrain CSV, in ascending-duration order (ties in CSV
    order), exactly as the SA pipeline's ``filtered_sorted(sort_key="duration")`` ordered them."""
    from speechbrain.dataio.dataset import DynamicItemDataset

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ExtractionError(f"speaker {speaker}: CSV file {csv_path} does not exist")
    try:
        text = csv_path.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ExtractionError(f"speaker {speaker}: unreadable CSV {csv_path}: {err}") from None
    if len(lines) < 2:  # SpeechBrain's reader fails on it with an IndexError
        what = "is empty" if not lines else "has a header but no utterances"
        raise ExtractionError(f"speaker {speaker}: CSV {csv_path} {what}")
    line_of = scan_speaker_csv(csv_path, speaker, text)
    replacements = {"data_root": str(data_root)} if data_root is not None else {}
    try:
        data = DynamicItemDataset.from_csv(str(csv_path), replacements=replacements)
    except KeyError as err:
        raise ExtractionError(
            f"speaker {speaker}: CSV {csv_path}: {err.args[0]} (give --data_root for $data_root)"
        ) from None
    except (ValueError, OSError) as err:
        raise ExtractionError(f"speaker {speaker}: unreadable CSV {csv_path}: {err}") from None
    first = next(iter(data.data.values()), None)
    if first is None:
        raise ExtractionError(f"speaker {speaker}: CSV {csv_path} has no utterances")
    missing = [c for c in ("duration", "wav", "wrd") if c not in first]
    if missing:
        raise ExtractionError(
            f"speaker {speaker}: CSV {csv_path} lacks the column(s) {missing} (expected ID,duration,wav,spk_id,wrd)"
        )
    data = data.filtered_sorted(sort_key="duration")
    data.set_output_keys(["id", "wav", "wrd", "duration"])
    utts = []
    for item in data:
        utt_id, word = item["id"], item["wrd"]
        where = f"speaker {speaker}: CSV {csv_path}, utterance {utt_id}"
        try:
            spk = parse_utterance_id(utt_id)["speaker"]
        except ValueError as err:
            raise ExtractionError(f"{where}: {err}") from None
        if spk != speaker:
            raise ExtractionError(f"{where}: the utterance belongs to speaker {spk}, not {speaker}")
        check_wav_name(item["wav"], utt_id, f"speaker {speaker}: CSV {csv_path}, line {line_of[utt_id]}")
        if not word.strip():
            raise ExtractionError(f"{where}: no target word")
        if word != word.upper():
            raise ExtractionError(
                f"{where}: the word {word!r} is not upper case; the SA tokenizer "
                f"is upper-case only (lower case maps to <unk>)"
            )
        utts.append(Utterance(utt_id, item["wav"], word, float(item["duration"])))
    return utts


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """An SA model as the user gives it: its hparams file, a checkpoint (a ``CKPT+`` folder, or a
    ``save`` folder to choose in), and hparams overrides."""

    hparams: Path
    checkpoint: Path
    overrides: dict = field(default_factory=dict)


def parse_model_arg(text):
    """``NAME=HPARAMS.yaml:CHECKPOINT`` -> (name, ModelSpec)."""
    match = re.fullmatch(r"([^=]+)=(.+?\.ya?ml):(.+)", text)
    if match is None:
        raise ExtractionError(f"--models item {text!r} is not NAME=HPARAMS.yaml:CHECKPOINT_FOLDER")
    return match[1], ModelSpec(Path(match[2]), Path(match[3]))


def _tag(node):
    tag = getattr(node, "tag", None)
    tag = getattr(tag, "value", tag)
    return tag if isinstance(tag, str) else ""


def _references(node, found):
    """Top-level keys referenced (!ref / !copy) anywhere inside a round-trip yaml node."""
    from ruamel.yaml.comments import TaggedScalar

    if isinstance(node, dict):
        for value in node.values():
            _references(value, found)
    elif isinstance(node, list):
        for value in node:
            _references(value, found)
    elif isinstance(node, TaggedScalar) and _tag(node).startswith(("!ref", "!copy")):
        for name in re.findall(r"<([^<>]+)>", str(node.value)):
            found.add(re.split(r"[\[.]", name.strip())[0])
    return found


def _accepted(cls):
    """The keyword arguments ``cls`` accepts (None: any, it takes **kwargs; or it is unknown)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def drop_unaccepted_arguments(doc, hparams_file):
    """Removes, from the round-trip yaml ``doc`` (never from the user's file), the arguments of its
    ``!new:`` objects that the installed SpeechBrain does not accept, and logs one line for each.

    The SA models were trained with the SA project's fork of SpeechBrain 1.0.0, whose
    ``TransformerASR`` takes ``freeze_encoder_layers`` / ``freeze_decoder_layers`` (which layers to
    freeze while fine-tuning: nothing that changes the forward pass). SpeechBrain 1.1.2 refuses
    them, so an experiment folder's ``hyperparams.yaml`` would not build as written."""
    dropped = []

    def visit(node, where):
        if isinstance(node, dict):
            tag = _tag(node)
            if tag.startswith("!new:"):
                cls = pydoc.locate(tag[len("!new:") :])
                accepted = _accepted(cls) if cls is not None else None
                if accepted is not None:
                    for key in [k for k in node if k not in accepted]:
                        del node[key]
                        dropped.append(f"{where}.{key}")
                        logger.warning(
                            "%s: dropped the argument %s of %s (%s): not an argument of it in "
                            "SpeechBrain 1.1.2 (the SA project's fork only)",
                            hparams_file,
                            key,
                            where,
                            tag[len("!new:") :],
                        )
            for key, value in node.items():
                visit(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                visit(value, f"{where}[{i}]")

    for key in list(doc):
        visit(doc[key], key)
    return dropped


def load_model_hparams(
    hparams_file, overrides=None, extra_keys=(), required=REQUIRED_KEYS, optional=OPTIONAL_KEYS, what=None
):
    """Builds only the objects of ``hparams_file`` that the forward pass needs (``required``,
    ``optional`` when present, ``extra_keys``, the override keys, and everything they reference).
    ``what`` names the file's kind in errors (default: an SA model's hparams)."""
    import ruamel.yaml
    from hyperpyyaml import load_hyperpyyaml

    hparams_file = Path(hparams_file)
    if not hparams_file.is_file():
        raise ExtractionError(f"hparams file {hparams_file} does not exist")
    overrides = dict(overrides or {})
    yaml = ruamel.yaml.YAML()
    with open(hparams_file, encoding="utf-8") as handle:
        doc = yaml.load(handle)
    if not isinstance(doc, dict):
        raise ExtractionError(f"hparams file {hparams_file} is not a yaml mapping")
    missing = [k for k in (*required, *extra_keys) if k not in doc]
    if missing:
        raise ExtractionError(
            f"hparams file {hparams_file} lacks {missing}: not "
            f"{what or 'an SA model of the LibriSpeech transformer/conformer recipe family'}"
        )
    unknown = [k for k in overrides if k not in doc]
    if unknown:
        raise ExtractionError(f"overrides {unknown} are not keys of {hparams_file}")
    wanted = set(required) | set(extra_keys) | {k for k in optional if k in doc} | set(overrides)
    todo = list(wanted)
    while todo:
        key = todo.pop()
        for ref in _references(doc[key], set()):
            if ref not in doc:
                raise ExtractionError(f"hparams file {hparams_file}: {key} refers to <{ref}>, which is not defined")
            if ref not in wanted:
                wanted.add(ref)
                todo.append(ref)
    subset = type(doc)()
    for key in doc:
        if key in wanted:
            subset[key] = doc[key]
    drop_unaccepted_arguments(subset, hparams_file)
    text = io.StringIO()
    yaml.dump(subset, text)
    try:
        return load_hyperpyyaml(text.getvalue(), overrides or None)
    except Exception as err:  # noqa: BLE001 - report which file failed to build
        raise ExtractionError(
            f"hparams file {hparams_file}: cannot build the model: {type(err).__name__}: {err}"
        ) from err


def resolve_checkpoint(path, select="auto"):
    """The ``CKPT+...`` folder to load: ``path`` itself, or the one ``select`` picks in a save
    folder. Returns (folder, meta of its CKPT.yaml, how it was chosen).

    A save folder of the SA pipeline also holds the Pretrainer's ``lm.ckpt`` / ``tokenizer.ckpt``
    symlinks (not checkpoints: ignored) and may hold a symlink to the control model's ``CKPT+``
    folder it started from; that one competes like the others, as it did when the SA pipeline
    chose its checkpoint (highest WRA, ties to the most recent), and a warning says when it wins."""
    folder, meta, how = _resolve_checkpoint(path, select)
    if Path(path).is_dir() and folder != Path(path):
        target = folder.resolve()
        if folder.is_symlink() and Path(path).resolve() not in target.parents:
            logger.warning(
                "the checkpoint chosen in %s (%s) is a symlink to %s, outside that folder "
                "(the control model the SA model started from?)",
                path,
                how,
                target,
            )
    return folder, meta, how


def _resolve_checkpoint(path, select):
    import ruamel.yaml
    from speechbrain.utils.checkpoints import Checkpointer

    path = Path(path)
    if not path.is_dir():
        raise ExtractionError(f"checkpoint folder {path} does not exist")
    if (path / "CKPT.yaml").is_file():
        try:
            meta = ruamel.yaml.YAML(typ="safe").load((path / "CKPT.yaml").read_text(encoding="utf-8"))
        except Exception as err:  # noqa: BLE001
            raise ExtractionError(f"unreadable {path / 'CKPT.yaml'}: {err}") from None
        return path, dict(meta or {}), "given"
    ckpts = Checkpointer(path).list_checkpoints()
    if not ckpts:
        raise ExtractionError(f"{path} is neither a CKPT+ folder nor a save folder with CKPT+ folders")

    def recency(ckpt):
        return ckpt.meta.get("unixtime", 0.0)

    if select == "auto":
        for key, sign in (("WRA", 1.0), ("WER", -1.0)):
            with_key = [c for c in ckpts if key in c.meta]
            if with_key:
                best = max(with_key, key=lambda c: (sign * float(c.meta[key]), recency(c)))
                return Path(best.path), dict(best.meta), f"{'max' if sign > 0 else 'min'}:{key}"
        select = "latest"
    if select == "latest":
        best = max(ckpts, key=recency)
        return Path(best.path), dict(best.meta), "latest"
    match = re.fullmatch(r"(max|min):(.+)", select)
    if match is None:
        raise ExtractionError(f"--ckpt_select must be auto, latest, max:KEY or min:KEY, not {select!r}")
    sign, key = (1.0 if match[1] == "max" else -1.0), match[2]
    with_key = [c for c in ckpts if key in c.meta]
    if not with_key:
        raise ExtractionError(f"no checkpoint in {path} has {key!r} in its CKPT.yaml")
    best = max(with_key, key=lambda c: (sign * float(c.meta[key]), recency(c)))
    return Path(best.path), dict(best.meta), select


class SAModel:
    """An SA model built from its hparams and loaded from a checkpoint, in eval mode."""

    def __init__(
        self, name, hparams_file, checkpoint, overrides=None, ckpt_select="auto", device="cpu", precision="fp32"
    ):
        from speechbrain.utils.checkpoints import DEFAULT_LOAD_HOOKS, get_default_hook

        self.name, self.device, self.precision = name, torch.device(device), precision
        hp = load_model_hparams(hparams_file, overrides)
        for key, expected in (("bos_index", BOS), ("eos_index", EOS)):
            if key in hp and hp[key] != expected:
                raise ExtractionError(f"{hparams_file}: {key} is {hp[key]}, but the SA models use <s>=1, </s>=2")
        self.pad_index = hp.get("pad_index", 0)
        self.sample_rate = hp.get("sample_rate")
        self.modules = {k: hp[k] for k in REQUIRED_KEYS}
        self.normalize = hp.get("normalize")
        self.ckpt_dir, self.ckpt_meta, self.ckpt_how = resolve_checkpoint(checkpoint, ckpt_select)

        # The recoverables of the SA recipe's checkpointer that matter for inference.
        if (self.ckpt_dir / "model.ckpt").is_file():
            model = hp.get("model")
            if model is None:
                model = torch.nn.ModuleList([hp[k] for k in MODEL_LIST])
            recoverables = {"model": model}
        elif all((self.ckpt_dir / f"{k}.ckpt").is_file() for k in MODEL_LIST):
            recoverables = {k: hp[k] for k in MODEL_LIST}
        else:
            raise ExtractionError(
                f"model {name}: checkpoint {self.ckpt_dir} has neither model.ckpt nor "
                f"{', '.join(k + '.ckpt' for k in MODEL_LIST)} (it holds "
                f"{sorted(p.name for p in self.ckpt_dir.iterdir())})"
            )
        if self.normalize is not None:
            if not (self.ckpt_dir / "normalizer.ckpt").is_file():
                raise ExtractionError(
                    f"model {name}: checkpoint {self.ckpt_dir} has no normalizer.ckpt "
                    f"(the statistics of the feature normalisation)"
                )
            recoverables["normalizer"] = self.normalize
        end_of_epoch = bool(self.ckpt_meta.get("end-of-epoch", True))
        for key, obj in recoverables.items():
            hook = get_default_hook(obj, DEFAULT_LOAD_HOOKS)
            try:
                hook(obj, self.ckpt_dir / f"{key}.ckpt", end_of_epoch)
            except Exception as err:  # noqa: BLE001 - name the file and the model
                raise ExtractionError(
                    f"model {name}: cannot load {self.ckpt_dir / (key + '.ckpt')} "
                    f"into the modules of {hparams_file}: {err}"
                ) from err

        for module in list(self.modules.values()) + [self.normalize]:
            if module is not None:
                module.to(self.device)
                module.eval()
        self.vocab_size = int(self.modules["seq_lin"].w.out_features)
        self.vocab_size_ctc = int(self.modules["ctc_lin"].w.out_features)

    @torch.no_grad()
    def encode(self, wav):
        """[1, T, D]: the encoder output on one waveform ``[samples]``, as the SA pipeline's test
        computed it before its search (a batch of one)."""
        m = self.modules
        wavs = wav.to(self.device).unsqueeze(0)
        wav_lens = torch.ones(1, device=self.device)
        with self._autocast():
            feats = m["compute_features"](wavs)
            if self.normalize is not None:
                feats = self.normalize(feats, wav_lens)
            return m["Transformer"].encode(m["CNN"](feats), wav_lens, pad_idx=self.pad_index).float()

    @torch.no_grad()
    def front_end(self, wav):
        """[T, ...]: the CNN front end's output on one waveform ``[samples]`` (its encoder frames)."""
        m = self.modules
        wavs = wav.to(self.device).unsqueeze(0)
        with self._autocast():
            feats = m["compute_features"](wavs)
            if self.normalize is not None:
                feats = self.normalize(feats, torch.ones(1, device=self.device))
            return m["CNN"](feats)[0]

    @torch.no_grad()
    def encode_batch(self, wavs):
        """([B, T, D], frames [B]): the encoder outputs of several waveforms at once, each equal (to
        float rounding) to ``encode`` of that waveform alone; ``frames[b]`` of its T are real.

        What a padded batch would change is kept out. The front end (Fbank, normalisation, CNN) runs
        per waveform: its convolutions pad each utterance's edges by reflection, which padding the
        batch would replace with the padding's values. The encoder runs on the padded batch with
        the relative lengths (its attention ignores the padded frames), and the depthwise
        convolution of each conformer layer reads zeros past an utterance's end, as it does on a
        batch of one: SpeechBrain 1.1.2's ``ConvolutionModule`` masks the padded frames only after
        that convolution, so the padding would leak into the last ``kernel_size // 2`` frames."""
        m = self.modules
        srcs = [self.front_end(w) for w in wavs]
        frames = torch.tensor([s.shape[0] for s in srcs])
        longest = int(frames.max())
        src = srcs[0].new_zeros((len(srcs), longest, *srcs[0].shape[1:]))
        for i, s in enumerate(srcs):
            src[i, : s.shape[0]] = s
        wav_lens = (frames.double() / longest).to(self.device)
        padded = torch.arange(longest)[None, :] >= frames[:, None]
        with self._autocast(), zero_padded_frames_before_convolutions(m["Transformer"], padded.to(self.device)):
            enc = m["Transformer"].encode(src, wav_lens, pad_idx=self.pad_index).float()
        return enc, frames

    @torch.no_grad()
    def logits_batch(self, wavs, token_lists):
        """[(decoder [U_i, V], ctc [T_i, V])]: ``logits`` of several waveforms at once, each equal
        to that of the waveform alone up to float rounding. The encoder outputs are
        ``encode_batch``'s; the decoder reads the padded ``[<s>] + tokens`` of the batch with a
        look-ahead mask (a position never sees the positions after it, so the padding after an
        utterance's last token changes none of its positions) and the encoder frames' padding mask."""
        m = self.modules
        enc, frames = self.encode_batch(wavs)
        lengths = [len(t) + 1 for t in token_lists]
        tgt = torch.zeros(len(token_lists), max(lengths), dtype=torch.long, device=self.device)
        for i, tokens in enumerate(token_lists):
            tgt[i, : lengths[i]] = torch.tensor([BOS] + list(tokens), dtype=torch.long)
        with self._autocast():
            pred, _ = m["Transformer"].decode(tgt, enc, frames.to(self.device))
            decoder_logits = m["seq_lin"](pred).float().cpu()
            ctc_logits = m["ctc_lin"](enc).float().cpu()
        return [
            (decoder_logits[i, : lengths[i]].clone(), ctc_logits[i, : int(frames[i])].clone())
            for i in range(len(token_lists))
        ]

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, wav, tokens):
        """(decoder [U, V], ctc [T, V]) float32 CPU logits of one waveform ``[samples]``,
        teacher-forced on ``[<s>] + tokens``."""
        m = self.modules
        wavs = wav.to(self.device).unsqueeze(0)
        wav_lens = torch.ones(1, device=self.device)
        tokens_bos = torch.tensor([[BOS] + list(tokens)], dtype=torch.long, device=self.device)
        with self._autocast():
            feats = m["compute_features"](wavs)
            if self.normalize is not None:
                feats = self.normalize(feats, wav_lens)
            src = m["CNN"](feats)
            enc_out, pred = m["Transformer"](src, tokens_bos, wav_lens, pad_idx=self.pad_index)
            ctc_logits = m["ctc_lin"](enc_out)
            decoder_logits = m["seq_lin"](pred)
        return decoder_logits[0].float().cpu().clone(), ctc_logits[0].float().cpu().clone()


@contextlib.contextmanager
def zero_padded_frames_before_convolutions(transformer, padded):
    """While inside, the depthwise time convolution of every conformer ``ConvolutionModule`` of
    ``transformer`` reads zeros at the padded frames (``padded`` [B, T], True where padded), as its
    own zero padding gives past the end of an utterance that is alone in its batch."""
    from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule

    def zero(module, args):
        x = args[0]  # [B, C, T]
        if x.shape[0] == padded.shape[0] and x.shape[-1] == padded.shape[1]:
            return (x.masked_fill(padded[:, None, :], 0.0), *args[1:])
        return None

    hooks = [
        module.conv.register_forward_pre_hook(zero)
        for module in transformer.modules()
        if isinstance(module, ConvolutionModule)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def load_language_model(hparams_file, lm_file, device="cpu"):
    """The TransformerLM of an SA model's hparams (its ``lm_model``), loaded from ``lm_file`` (the
    Pretrainer's ``save/lm.ckpt``, or any path the user gives; never fetched from a hub) with
    SpeechBrain's state-dict loader (its key renames included), strictly: a file of another LM is
    an error, not a warning per missing key. Eval mode."""
    from speechbrain.utils.checkpoints import torch_patched_state_dict_load

    lm_file = Path(lm_file)
    if not lm_file.is_file():
        raise ExtractionError(f"language model file {lm_file} does not exist (give --lm_file, or --lm_file=none)")
    # only the LM (and what it references) is built, not the ASR model a second time
    lm = load_model_hparams(
        hparams_file, required=("lm_model",), optional=(), what="an SA model's hparams with an lm_model"
    )["lm_model"]
    try:
        lm.load_state_dict(torch_patched_state_dict_load(lm_file, "cpu"), strict=True)
    except Exception as err:  # noqa: BLE001 - name the files
        raise ExtractionError(f"cannot load {lm_file} into the lm_model of {hparams_file}: {err}") from err
    return lm.to(device).eval()


def set_tf32(allow):
    """TensorFloat-32 matmuls and convolutions on or off; returns the setting.

    Importing SpeechBrain 1.1.2 turns TF32 on for CUDA matmuls (its ``allow_tf32`` quirk); the SA
    project's fork (1.0.0) did not, so on an Ampere or newer GPU the logits would differ from the
    SA pipeline's by more than float rounding. Off by default here (after SpeechBrain is imported,
    which is when the quirk is applied); ``SB_DISABLE_QUIRKS=allow_tf32`` has the same effect."""
    import speechbrain  # noqa: F401  (applies SpeechBrain's quirks first)

    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    torch.backends.cudnn.allow_tf32 = bool(allow)
    return bool(allow)


def audio_info(utt, sample_rate=None):
    """(samples, sample rate) of an utterance's audio file, from its header; ExtractionError naming
    the utterance and the file when it is missing, unreadable, empty, not mono or (with
    ``sample_rate``) sampled at another rate."""
    import soundfile

    if not Path(utt.wav).is_file():
        raise ExtractionError(f"utterance {utt.id}: audio file {utt.wav} does not exist")
    try:
        info = soundfile.info(utt.wav)
    except (RuntimeError, OSError) as err:  # soundfile's LibsndfileError is a RuntimeError
        raise ExtractionError(f"utterance {utt.id}: unreadable audio file {utt.wav} ({err})") from None
    if info.frames <= 0:
        raise ExtractionError(f"utterance {utt.id}: audio file {utt.wav} holds no samples")
    declared, held = _wav_data_bytes(utt.wav)
    if declared is not None and held < declared:
        raise ExtractionError(
            f"utterance {utt.id}: audio file {utt.wav} is truncated: its header declares {declared} bytes "
            f"of samples, the file holds {held}"
        )
    duration = getattr(utt, "duration", None)
    if duration is not None and abs(info.frames / info.samplerate - duration) > DURATION_TOLERANCE:
        raise ExtractionError(
            f"utterance {utt.id}: audio file {utt.wav} lasts {info.frames / info.samplerate:.3f} s, "
            f"its CSV duration is {duration:g} s (more than {DURATION_TOLERANCE:g} s apart)"
        )
    if info.channels != 1:
        raise ExtractionError(f"utterance {utt.id}: {utt.wav} has {info.channels} channels, expected mono")
    if sample_rate is not None and info.samplerate != sample_rate:
        raise ExtractionError(
            f"utterance {utt.id}: {utt.wav} is sampled at {info.samplerate} Hz, the model expects {sample_rate} Hz"
        )
    return int(info.frames), int(info.samplerate)


def _wav_data_bytes(path):
    """(bytes of samples its header declares, bytes the file holds after the header) of a RIFF WAVE
    file; (None, None) for any other file, or a header that declares no size (a streamed wav).
    libsndfile silently shortens a truncated wav to what is there, so this reads the header."""
    import struct

    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None, None
            size = Path(path).stat().st_size
            while True:
                chunk = handle.read(8)
                if len(chunk) < 8:
                    return None, None
                name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"data":
                    if length in (0, 0xFFFFFFFF):
                        return None, None
                    return length, size - handle.tell()
                handle.seek(length + (length & 1), 1)
    except OSError:
        return None, None


def check_audio(utts, sample_rate=None):
    """Every utterance's audio header, before anything is written: {utterance id: samples}."""
    return {utt.id: audio_info(utt, sample_rate)[0] for utt in utts}


def check_device(device):
    """ExtractionError (one line naming --device) when ``device`` is not one torch can use here."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ExtractionError(f"--device={device} is not allowed: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ExtractionError(f"--device={device} is not allowed: no CUDA GPU is available here (use --device=cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ExtractionError(
                f"--device={device} is not allowed: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif device.type != "cpu":
        raise ExtractionError(f"--device={device} is not allowed: cpu or cuda[:N]")
    return device


def read_wav(utt, model):
    import speechbrain as sb

    audio_info(utt, model.sample_rate)
    try:
        wav = sb.dataio.dataio.read_audio(utt.wav)
    except (RuntimeError, OSError) as err:
        raise ExtractionError(f"utterance {utt.id}: unreadable audio file {utt.wav} ({err})") from None
    if wav.dim() != 1:
        raise ExtractionError(f"utterance {utt.id}: {utt.wav} has {wav.shape[1]} channels, expected mono")
    return wav
