"""The SA models and the audio they run on: a speaker's SpeechBrain CSV, and an SA model built from
its SpeechBrain hparams yaml and loaded from its checkpoint, offline, in eval mode.

An SA model is a SpeechBrain Transformer ASR model of the LibriSpeech conformer recipe family,
fine-tuned on one dysarthric speaker: ``compute_features`` (Fbank) -> ``normalize``
(InputNormalization, global) -> ``CNN`` (ConvolutionFrontEnd) -> ``Transformer`` (TransformerASR,
conformer encoder, transformer decoder) -> ``seq_lin`` / ``ctc_lin`` (Linear). Used by
``extract_logits.py`` (teacher-forced logits) and ``decode.py`` (free-running decoding).
"""

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from local.corpus import parse_utterance_id

# hparams keys the forward pass needs, and keys used when the yaml has them.
REQUIRED_KEYS = ("compute_features", "CNN", "Transformer", "seq_lin", "ctc_lin")
OPTIONAL_KEYS = ("normalize", "model", "pad_index", "bos_index", "eos_index", "sample_rate")
# The module order of the SA recipe's `model` ModuleList (its model.ckpt).
MODEL_LIST = ("CNN", "Transformer", "seq_lin", "ctc_lin")
BOS, EOS = 1, 2


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


def read_speaker_csv(csv_path, speaker, data_root=None):
    """The utterances of one speaker's SpeechBrain CSV, in ascending-duration order (ties in CSV
    order), exactly as the SA pipeline's ``filtered_sorted(sort_key="duration")`` ordered them."""
    from speechbrain.dataio.dataset import DynamicItemDataset

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ExtractionError(f"speaker {speaker}: CSV file {csv_path} does not exist")
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


def load_model_hparams(hparams_file, overrides=None):
    """Builds only the objects of ``hparams_file`` that the forward pass needs (REQUIRED_KEYS,
    OPTIONAL_KEYS when present, the override keys, and everything they reference)."""
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
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ExtractionError(
            f"hparams file {hparams_file} lacks {missing}: not an SA model of the "
            f"LibriSpeech transformer/conformer recipe family"
        )
    unknown = [k for k in overrides if k not in doc]
    if unknown:
        raise ExtractionError(f"overrides {unknown} are not keys of {hparams_file}")
    wanted = set(REQUIRED_KEYS) | {k for k in OPTIONAL_KEYS if k in doc} | set(overrides)
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
    folder. Returns (folder, meta of its CKPT.yaml, how it was chosen)."""
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

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
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


def read_wav(utt, model):
    import speechbrain as sb

    if not Path(utt.wav).is_file():
        raise ExtractionError(f"utterance {utt.id}: audio file {utt.wav} does not exist")
    if model.sample_rate is not None:
        import soundfile

        rate = soundfile.info(utt.wav).samplerate
        if rate != model.sample_rate:
            raise ExtractionError(
                f"utterance {utt.id}: {utt.wav} is sampled at {rate} Hz, the model expects {model.sample_rate} Hz"
            )
    wav = sb.dataio.dataio.read_audio(utt.wav)
    if wav.dim() != 1:
        raise ExtractionError(f"utterance {utt.id}: {utt.wav} has {wav.shape[1]} channels, expected mono")
    return wav
