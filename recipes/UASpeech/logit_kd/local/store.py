"""The SA logit extraction, read in place, validated, and packed for training.

    <logit_root>/<MODEL>/<SPK>/<SPK>_decoder_logits.pt   # SA model MODEL on speaker SPK's audio
    <logit_root>/<MODEL>/<SPK>/<SPK>_metadata.json

A *stream* is one model's decoder logits on one utterance, ``[U, V]``, teacher-forced on
``[<s>] + encode_as_ids(word)``, so ``U = len(encode_as_ids(word)) + 1`` and position u predicts
``tokens_eos[u]``. Token ids are not stored on disk: they are derived from ``target_words`` with
the SA tokenizer, and every ``U`` is checked against them (a mismatch means the wrong tokenizer
or a corrupt file).

Every problem stops the run before training with one ``LogitStoreError`` that names the file, the
speaker and the utterance. CTC files are never opened here.
"""

import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from local.corpus import SPEAKERS, parse_utterance_id
from local.features import evidence, evidence_width, tempered
from local.layout import REQUIRED_METADATA_KEYS, describe_pair, pair_files, pair_folder
from local.packed import PackedRows, build_packed, cache_key, file_signature

SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2}
EOS = SPECIAL_IDS["</s>"]


class LogitStoreError(ValueError):
    """Bad input: the message names the file, the speaker and the utterance."""


def load_tokenizer(path):
    """The SA SentencePiece model, loaded from a file (never fetched from a hub)."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise LogitStoreError(f"tokenizer file {path} does not exist (give --tokenizer_file=...)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise LogitStoreError(f"tokenizer file {path} is not a SentencePiece model: {err}") from None
    for piece, expected in SPECIAL_IDS.items():
        if sp.piece_to_id(piece) != expected:
            raise LogitStoreError(
                f"tokenizer {path}: {piece} has id {sp.piece_to_id(piece)}, but the SA models use "
                f"<unk>=0, <s>=1, </s>=2 (no offset): this is not the SA tokenizer"
            )
    return sp


class TokenTable:
    """``tokens_eos`` of each word, derived once with the SA tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size()
        # What the derived lengths depend on (part of the cache keys): the tokenizer's content.
        self.signature = hashlib.sha256(tokenizer.serialized_model_proto()).hexdigest()
        self._cache = {}

    def tokens_eos(self, word):
        if word not in self._cache:
            self._cache[word] = self.tokenizer.encode_as_ids(word) + [EOS]
        return self._cache[word]


@dataclass
class PairInfo:
    """The metadata of one (model, audio speaker) pair, validated."""

    model: str
    speaker: str
    files: dict  # layout.pair_files
    utt_ids: list
    words: list
    lengths: list  # U_i = len(tokens) + 1, from the tokenizer

    @property
    def decoder_file(self):
        return self.files["decoder"]

    @property
    def metadata_file(self):
        return self.files["metadata"]


def _symlink_loop(path):
    """ "symlink loop at" when ``path`` cannot be resolved because its links form a loop, else ""."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop at"
    return ""


def read_metadata(logit_root, model, speaker, tokens):
    """Reads and checks ``<logit_root>/<model>/<speaker>/<speaker>_metadata.json``."""
    folder = pair_folder(logit_root, model, speaker)
    where = describe_pair(model, speaker)
    if not folder.is_dir():
        looped = _symlink_loop(folder)
        raise LogitStoreError(f"{looped or 'missing folder'} {folder} ({where}): is --logit_root right?")
    files = pair_files(logit_root, model, speaker)
    path = files["metadata"]
    try:
        if not path.is_file():
            raise LogitStoreError(f"{_symlink_loop(path) or 'missing metadata file'} {path} ({where})")
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise LogitStoreError(f"cannot read metadata file {path} ({where}): {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LogitStoreError(f"unreadable metadata file {path} ({where}): {err}") from None
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_METADATA_KEYS):
        raise LogitStoreError(f"metadata file {path} ({where}) lacks one of the keys {REQUIRED_METADATA_KEYS}")
    utt_ids, words = meta["utterance_ids"], meta["target_words"]
    if not (isinstance(utt_ids, list) and isinstance(words, list)):
        raise LogitStoreError(f"metadata file {path}: utterance_ids and target_words must be lists")
    count = meta["num_utterances"]
    if not isinstance(count, int) or isinstance(count, bool):
        raise LogitStoreError(
            f"metadata file {path} ({where}): num_utterances is {count!r} ({type(count).__name__}): "
            f"it must be an integer"
        )
    bad = next((u for u in utt_ids if not isinstance(u, str)), None)
    if bad is not None:
        raise LogitStoreError(
            f"metadata file {path} ({where}): utterance id {bad!r} is a {type(bad).__name__}, not a string "
            f"of the form SPK_B3_<WORD>_<MIC>"
        )
    if not (len(utt_ids) == len(words) == meta["num_utterances"]):
        raise LogitStoreError(
            f"metadata file {path} ({where}): {len(utt_ids)} utterance_ids, {len(words)} target_words, "
            f"num_utterances {meta['num_utterances']}: they must agree"
        )
    if not utt_ids:
        raise LogitStoreError(
            f"metadata file {path} ({where}) lists no utterance: speaker {speaker} has nothing to read"
        )
    declared = meta.get("vocab_size_decoder")
    if declared is not None and declared != tokens.vocab_size:
        raise LogitStoreError(
            f"metadata file {path} ({where}): vocab_size_decoder is {declared} but the tokenizer "
            f"has {tokens.vocab_size} pieces: wrong tokenizer?"
        )
    seen = set()
    lengths = []
    for utt_id, word in zip(utt_ids, words):
        if utt_id in seen:
            raise LogitStoreError(f"metadata file {path} ({where}): duplicate utterance id {utt_id}")
        seen.add(utt_id)
        try:
            spk = parse_utterance_id(utt_id)["speaker"]
        except ValueError as err:
            raise LogitStoreError(f"metadata file {path} ({where}): {err}") from None
        if spk != speaker:
            raise LogitStoreError(
                f"metadata file {path} ({where}): utterance {utt_id} belongs to speaker {spk}, not {speaker}"
            )
        if not isinstance(word, str) or not word.strip():
            raise LogitStoreError(f"metadata file {path}: utterance {utt_id} has no target word ({word!r})")
        if word != word.upper():
            raise LogitStoreError(
                f"metadata file {path}: utterance {utt_id} has the word {word!r} in lower case; the SA "
                f"tokenizer is upper-case only (lower case maps to <unk>)"
            )
        lengths.append(len(tokens.tokens_eos(word)))
    return PairInfo(model, speaker, files, list(utt_ids), list(words), lengths)


def load_tensors(path, where):
    """``torch.load`` with weights_only (never unpickle arbitrary objects) and mmap when possible."""
    try:
        if not path.is_file():
            raise LogitStoreError(f"{_symlink_loop(path) or 'missing logit file'} {path} ({where})")
        try:
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files written with the legacy (non-zip) serialisation cannot be memory-mapped.
            return torch.load(path, weights_only=True, map_location="cpu")
    except LogitStoreError:
        raise
    except OSError as err:
        raise LogitStoreError(f"cannot read logit file {path} ({where}): {err.strerror or err}") from None
    except Exception:  # noqa: BLE001 - torch's own message would suggest unpickling the file
        raise LogitStoreError(
            f"logit file {path} ({where}) is not a tensor file: refused, for safety (a file that holds "
            f"other Python objects is never unpickled)"
        ) from None


def read_decoder_logits(info, vocab_size):
    """The ``[U_i, V]`` tensors of a pair's decoder file (memory-mapped), their number, type and
    shape checked; values are checked by ``copy_decoder_logits``."""
    path = info.decoder_file
    where = describe_pair(info.model, info.speaker)
    data = load_tensors(path, where)
    if isinstance(data, torch.Tensor):
        if data.dim() != 3:
            raise LogitStoreError(
                f"logit file {path} ({where}): a tensor of shape {tuple(data.shape)}, "
                f"expected a list of [U, V] tensors or one [N, U, V] tensor"
            )
        items = data.unbind(0)
    elif isinstance(data, (list, tuple)):
        items = data
    else:
        raise LogitStoreError(
            f"logit file {path} ({where}) holds a {type(data).__name__}, not a list of tensors or a tensor"
        )
    if len(items) != len(info.utt_ids):
        raise LogitStoreError(
            f"logit file {path} ({where}) holds {len(items)} utterances but its metadata lists "
            f"{len(info.utt_ids)} utterance_ids"
        )
    for logits, utt_id, word, U in zip(items, info.utt_ids, info.words, info.lengths):
        at = f"logit file {path} ({where}), utterance {utt_id}"
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
            kind = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise LogitStoreError(f"{at}: expected a float [U, V] tensor, found {kind}")
        if logits.shape[1] != vocab_size:
            raise LogitStoreError(
                f"{at}: vocab size {logits.shape[1]}, but the tokenizer (and the other teachers) have "
                f"{vocab_size}: wrong tokenizer or a model of another vocabulary"
            )
        if logits.shape[0] != U:
            raise LogitStoreError(
                f"{at}: {logits.shape[0]} positions, but the tokenizer gives {U - 1} tokens + </s> for "
                f"{word!r}: wrong tokenizer or a corrupt file"
            )
    return items


def pack_pair(info, items, dest, evidence_dest=None, temperature=None, chunk=1024):
    """Packs a pair's tensors into ``dest`` (its rows of the packed store, in order), some
    utterances at a time so that each value is read from the file once and then worked on while in
    cache: the logits (tempered at ``temperature`` when given, ``features.tempered``) are written,
    every written value checked finite (a NaN or Inf logit stays one when tempered), and, with
    ``evidence_dest``, each row's evidence (``features.evidence``)."""
    k = None if evidence_dest is None else (evidence_dest.shape[1] - 1) // 2
    row, n = 0, 0
    while n < len(items):
        end, rows = n, 0
        while end < len(items) and rows < chunk:
            rows, end = rows + items[end].shape[0], end + 1
        group = items[n:end]
        block = torch.cat(group).float() if len(group) > 1 else group[0].float()
        out = block if temperature is None else tempered(block, temperature)
        _check_finite(info, row, out, "NaN or Inf logits")
        if out.dtype != dest.dtype:  # a value the store's dtype cannot hold
            out = out.to(dest.dtype)
            _check_finite(info, row, out, f"logits too large for the store's {dest.dtype}")
        dest[row : row + block.shape[0]] = out
        if evidence_dest is not None:
            evidence_dest[row : row + block.shape[0]] = evidence(block, k)
        row, n = row + block.shape[0], end


def _check_finite(info, row, values, what):
    # A row with a NaN or an Inf has a sum that is not finite: one fast reduction checks the block;
    # the element-wise test runs only where a sum is not finite (or overflowed: then it passes).
    sums = values.sum(-1, dtype=torch.float32)
    if bool(torch.isfinite(sums).all()):
        return
    finite = torch.isfinite(values).all(-1)
    if not bool(finite.all()):
        _not_finite(info, row + int(torch.nonzero(~finite)[0, 0]), what)


def _not_finite(info, row, what):
    ends = torch.cumsum(torch.tensor(info.lengths), 0)
    i = int(torch.searchsorted(ends, torch.tensor(row), right=True))
    pos = row - (int(ends[i]) - info.lengths[i])
    raise LogitStoreError(
        f"logit file {info.decoder_file} ({describe_pair(info.model, info.speaker)}), "
        f"utterance {info.utt_ids[i]}: {what} at position {pos}"
    )


class LogitStore(PackedRows):
    """The decoder logits of several (model, audio speaker) pairs, packed into one contiguous
    ``[positions + 1, V]`` tensor (the last row is zeros, the padding row) with a stream index.

    All metadata is read and checked first (cheap), which gives every length, so the packed tensor
    is allocated once; then each decoder file is read once (memory-mapped) and packed, every
    utterance checked. With ``mix_temperature``, the packed logits are tempered at it and each
    row's evidence (``features.py``: top-``evidence_k`` pieces and entropy) is packed beside them in
    ``self.evidence``: what the students read of a stream is then computed once per fold, not at
    every step. With ``cache_dir``, both are kept on disk (see ``packed.py``), keyed by the source
    files' size, mtime and inode change time and by these settings: the next run maps them.
    """

    def __init__(
        self,
        logit_root,
        tokens,
        pairs,
        store_dtype=torch.float32,
        cache_dir=None,
        optional=(),
        mix_temperature=None,
        evidence_k=None,
    ):
        self.logit_root = Path(logit_root)
        self.tokens = tokens
        self.vocab_size = tokens.vocab_size
        self.temperature = mix_temperature
        # ``optional`` pairs are read when their folder exists (e.g. the held-out speaker's own SA
        # model, a baseline only, which a truly new speaker does not have).
        optional = {tuple(p) for p in optional}
        self.pairs = [tuple(p) for p in pairs if tuple(p) not in optional or pair_folder(self.logit_root, *p).is_dir()]
        infos = [read_metadata(logit_root, m, s, tokens) for m, s in self.pairs]
        self.infos = infos
        self.stream_model, self.stream_speaker, self.utt_ids, self.words = [], [], [], []
        self.pair_streams = {}  # (model, speaker) -> range of stream indices, in file order
        lengths = []
        for info in infos:
            self.pair_streams[(info.model, info.speaker)] = range(
                len(self.utt_ids), len(self.utt_ids) + len(info.utt_ids)
            )
            self.stream_model += [info.model] * len(info.utt_ids)
            self.stream_speaker += [info.speaker] * len(info.utt_ids)
            self.utt_ids += info.utt_ids
            self.words += info.words
            lengths += info.lengths
        self.index = {(m, u): i for i, (m, u) in enumerate(zip(self.stream_model, self.utt_ids))}
        # Teacher identity of each stream (its model's index in SPEAKERS; unknown models share one),
        # for the per-teacher `weights` fusion.
        identity = {m: i for i, m in enumerate(SPEAKERS)}
        self.model_ids = torch.tensor([identity.get(m, len(SPEAKERS)) for m in self.stream_model], dtype=torch.long)
        positions = sum(lengths) + 1
        arrays = {"data": ((positions, self.vocab_size), store_dtype)}
        k = None
        if mix_temperature is not None:
            k = min(evidence_k or 1, self.vocab_size)
            arrays["evidence"] = ((positions, evidence_width(k)), torch.float32)
        self.key = cache_key(
            "store",
            str(store_dtype),
            tokens.signature,
            mix_temperature,
            k,
            [
                [m, s, file_signature(i.decoder_file), file_signature(i.metadata_file)]
                for (m, s), i in zip(self.pairs, infos)
            ],
        )

        def fill(tensors):
            # Each file is read once, straight into its rows of the packed tensors. The next file is
            # opened (unpickled: Python-bound) in a thread while this one is packed and checked
            # (tensor operations, which release the GIL).
            data, ev = tensors["data"], tensors.get("evidence")
            with ThreadPoolExecutor(max_workers=1) as reader:
                pending = reader.submit(read_decoder_logits, infos[0], self.vocab_size) if infos else None
                row = 0
                for n, info in enumerate(infos):
                    items = pending.result()
                    if n + 1 < len(infos):
                        pending = reader.submit(read_decoder_logits, infos[n + 1], self.vocab_size)
                    rows = sum(info.lengths)
                    pack_pair(
                        info,
                        items,
                        data[row : row + rows],
                        None if ev is None else ev[row : row + rows],
                        mix_temperature,
                    )
                    del items  # unmap this file before the next one is packed
                    row += rows

        tensors, self.from_cache = build_packed(cache_dir, "store", self.key, arrays, fill)
        self.evidence = tensors.get("evidence")
        super().__init__(tensors["data"], lengths)

    def __len__(self):
        return len(self.utt_ids)

    def source_files(self):
        """The decoder logit and metadata files the store was read from."""
        return [path for info in self.infos for path in (info.decoder_file, info.metadata_file)]

    def stream(self, model, utt_id):
        """Index of the stream of ``model`` on utterance ``utt_id`` (KeyError if absent)."""
        return self.index[(model, utt_id)]

    def logits(self, stream):
        """``[U, V]`` float32 logits of one stream (tempered at ``self.temperature`` when set)."""
        return self.block(stream)

    def gather_evidence(self, index, max_len):
        """``[..., max_len, 2k + 1]`` evidence rows of blocks ``index`` (-1 = none), like ``gather``."""
        return self.evidence[self.rows(index, max_len).to(self.evidence.device)]

    def to(self, device):
        super().to(device)
        if self.evidence is not None:
            self.evidence = self.evidence.to(device)
        return self
