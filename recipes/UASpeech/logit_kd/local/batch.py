"""Batches of fold items, gathered from the packed store by index, and the same training steps for
one process or N.

``batch_size`` is the *global* batch. ``GlobalBatchSampler`` yields the same sequence of global
batches (a seeded permutation per epoch, cut into ``batch_size`` items) in every process; the
collate function (``FoldBatch``) gives each process its share of the global batch (rank r of N
takes the r-th contiguous slice), padded to the *global* batch's longest item and largest stream
count, so that every item is computed on tensors of the same shape whatever N is. The loss is
normalised by the global batch's positions (``global_positions``), and every random number of a
step is drawn for the whole global batch from a generator seeded by (seed, epoch, step)
(``StepNoise``) and sliced to the process's rows. N processes therefore take the same steps, with
the same learning-rate schedule and the same randomness, as one process: the same model up to
float summation order. When the last global batch has fewer items than processes, a process with
no item runs one padding item of weight 0.

A batch holds:

    logits      [B, S, U, V]  float32 teacher logits (zeros where padded), tempered at the store's
                              mixing temperature when it packs the evidence
    evidence    [B, S, U, 2k+1]  what the students read of each stream (features.py), or None
    stream_mask [B, S]        which streams are present
    stream_ids  [B, S]        teacher identity of each stream (index in corpus.SPEAKERS)
    lengths     [B]           real positions U_i;  pos_mask [B, U] (all False for a padding item)
    tokens      [B, U]        tokens_eos (0 where padded)
    targets     [B, U, V]     KD target distributions, or None (test)
    self_logits [B, U, V]     the audio speaker's own SA stream (test baseline ``sa_self``), or None
    rows                      (first, end, global batch size): this process's rows of the global batch
    global_positions          real positions of the whole global batch
"""

import torch

from local.features import Streams

OUTPUT_KEYS = ["id", "streams", "target_index", "self_stream", "word", "category", "mic"]


def _padded(rows, fill, width=None):
    width = max(len(r) for r in rows) if width is None else width
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def share(n_items, rank, world_size):
    """(first, end): the contiguous slice of a global batch of ``n_items`` that process ``rank`` of
    ``world_size`` takes (as equal as possible; empty when there are fewer items than processes)."""
    return rank * n_items // world_size, (rank + 1) * n_items // world_size


class GlobalBatchSampler:
    """The global batches of an epoch, the same in every process: a permutation of the items drawn
    from (seed + epoch), cut into ``batch_size`` items. SpeechBrain calls ``set_epoch``; its
    checkpoints fast-forward the sampler by the number of batches done (mid-epoch resume)."""

    def __init__(self, n_items, batch_size, seed, max_items=None):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        # at most max_items of the permutation per epoch: another draw each epoch
        self.n_drawn = n_items if max_items is None else min(n_items, int(max_items))
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(int(self.seed) + int(self.epoch))
        order = torch.randperm(self.n_items, generator=generator).tolist()[: self.n_drawn]
        for start in range(0, self.n_drawn, self.batch_size):
            yield order[start : start + self.batch_size]

    def __len__(self):
        return (self.n_drawn + self.batch_size - 1) // self.batch_size


class FoldBatch:
    """A padded batch; ``collate = functools.partial(FoldBatch, store=..., targets=..., rank=..., world_size=...)``.

    ``examples`` are the items of the whole global batch; this process keeps its share."""

    _TENSORS = (
        "logits", "evidence", "stream_mask", "stream_ids", "lengths", "pos_mask", "tokens", "targets", "self_logits"
    )  # fmt: skip

    def __init__(self, examples, store, targets=None, rank=0, world_size=1):
        streams_all = [e["streams"] for e in examples]
        S = max(len(s) for s in streams_all)
        U = int(max(store.lengths[s[0]] for s in streams_all))
        first, end = share(len(examples), rank, world_size)
        self.rows = (first, end, len(examples))
        self.global_positions = float(sum(int(store.lengths[s[0]]) for s in streams_all))
        weight = [1.0] * (end - first)
        if end == first:  # fewer items than processes: one padding item, weight 0
            examples, weight = examples[:1], [0.0]
        else:
            examples = examples[first:end]
        self.id = [e["id"] for e in examples]
        self.word = [e["word"] for e in examples]
        self.category = [e["category"] for e in examples]
        self.mic = [e["mic"] for e in examples]
        streams = _padded([e["streams"] for e in examples], -1, S)
        self.stream_mask = streams >= 0
        self.lengths = store.lengths[streams[:, 0]]
        self.pos_mask = (torch.arange(U)[None, :] < self.lengths[:, None]) & (torch.tensor(weight)[:, None] > 0)
        self.logits = store.gather(streams, U)
        self.evidence = store.gather_evidence(streams, U) if store.evidence is not None else None
        self.temperature = store.temperature
        self.stream_ids = torch.where(self.stream_mask, store.model_ids[streams.clamp(min=0)], -1)
        self.tokens = _padded([store.tokens.tokens_eos(w) for w in self.word], 0, U)
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

    @property
    def streams(self):
        """The batch's streams as the students read them: precomputed evidence when the store
        packs it, else raw logits (the students then compute their evidence)."""
        if self.evidence is None:
            return self.logits
        return Streams(self.logits, self.evidence, self.temperature)


class StepNoise:
    """The random numbers of one training step, drawn for the whole global batch and sliced to this
    process's rows, so that N processes use the numbers one process would use.

    Draws come from a CPU generator seeded by ``seed`` (the recipe's (seed, epoch, step)) in the
    order the student asks for them, each ``[global batch, *shape]``; ``rows`` = (first, end,
    global batch size). A process that holds only a padding item (weight 0) uses row ``first``."""

    def __init__(self, seed, rows, device="cpu"):
        self.generator = torch.Generator().manual_seed(int(seed) % 2**63)
        self.first, self.end, self.size = rows
        self.device = device

    def uniform(self, *shape):
        draw = torch.rand((self.size, *shape), generator=self.generator)
        end = max(self.end, self.first + 1)
        return draw[self.first : end].to(self.device)

    def keep(self, p, *shape):
        """A dropout mask: 1 / (1 - p) where kept, 0 where dropped (p < 1)."""
        return (self.uniform(*shape) >= p).float() / (1.0 - p)
