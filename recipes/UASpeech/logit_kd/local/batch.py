"""Batches of fold items, gathered from the packed store by index (no per-item tensor assembly).

The DataLoader's ``collate_fn`` receives the items of a ``DynamicItemDataset`` (ids, stream
indices, target index, word, category, microphone) and builds the padded tensors in a few
indexing operations on the packed store:

    logits      [B, S, U, V]  float32 teacher logits (zeros where padded)
    stream_mask [B, S]        which streams are present
    stream_ids  [B, S]        teacher identity of each stream (index in corpus.SPEAKERS)
    lengths     [B]           real positions U_i;  pos_mask [B, U]
    tokens      [B, U]        tokens_eos (0 where padded)
    targets     [B, U, V]     KD target distributions, or None (test)
    self_logits [B, U, V]     the audio speaker's own SA stream (test baseline ``sa_self``), or None
"""

import torch

OUTPUT_KEYS = ["id", "streams", "target_index", "self_stream", "word", "category", "mic"]


def _padded(rows, fill):
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class FoldBatch:
    """A padded batch; ``collate = functools.partial(FoldBatch, store=..., targets=...)``."""

    _TENSORS = ("logits", "stream_mask", "stream_ids", "lengths", "pos_mask", "tokens", "targets", "self_logits")

    def __init__(self, examples, store, targets=None):
        self.id = [e["id"] for e in examples]
        self.word = [e["word"] for e in examples]
        self.category = [e["category"] for e in examples]
        self.mic = [e["mic"] for e in examples]
        streams = _padded([e["streams"] for e in examples], -1)
        self.stream_mask = streams >= 0
        self.lengths = store.lengths[streams[:, 0]]
        U = int(self.lengths.max())
        self.pos_mask = torch.arange(U)[None, :] < self.lengths[:, None]
        self.logits = store.gather(streams, U)
        self.stream_ids = torch.where(self.stream_mask, store.model_ids[streams.clamp(min=0)], -1)
        self.tokens = _padded([store.tokens.tokens_eos(w) for w in self.word], 0)
        target_index = [e["target_index"] for e in examples]
        self.targets = targets.gather(target_index, U) if targets is not None and min(target_index) >= 0 else None
        self_stream = torch.tensor([e["self_stream"] for e in examples])
        self.self_logits = store.gather(self_stream, U) if bool((self_stream >= 0).all()) else None

    def to(self, device):
        for name in self._TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device, non_blocking=True))
        return self

    def pin_memory(self):
        for name in self._TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.pin_memory())
        return self

    def __len__(self):
        return len(self.id)
