"""What the fusion students read of a teacher stream, computed once per fold when the store is packed
(or per step from raw logits: in free-running decoding, or with ``precompute_features: false``).

A stream position's logits ``z`` [V] give:

- the *tempered logits* ``T * log_softmax(z / T)`` at the mixing temperature T: their softmax at T
  is the stream's tempered distribution, so mixing the streams needs no softmax per step (it is
  ``z`` up to a constant, so every softmax, argmax and KD target of them equals ``z``'s);
- the *evidence*: the top-k pieces of ``log_softmax(z)`` (ids and log-probabilities, descending)
  and its entropy, from which the attention and transformer students score and encode a stream.

``Streams`` carries a batch of them, ``[B, S, U, ...]``. The packed store holds the tempered logits
and the evidence side by side (``store.LogitStore``), so that a training step touches the V-sized
rows only where its output needs them: the probability mix of the streams, which reads every
``[B, S, U, V]`` value once (its floor: the bytes of the batch's streams).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def evidence_width(k):
    """Columns of the packed evidence: k ids, k log-probabilities, the entropy."""
    return 2 * k + 1


def tempered(logits, temperature):
    """``T * log_softmax(z / T)`` in float32: logits normalised at T (the same distribution, argmax
    and softmax at any temperature as ``z``)."""
    return temperature * F.log_softmax(logits.float() / temperature, -1)


def evidence(logits, k):
    """[..., 2k + 1]: the top-k piece ids (as floats: exact below 2^24) and log-probabilities of
    ``log_softmax(z)``, descending, and its entropy."""
    logp = F.log_softmax(logits.float(), -1)
    top = logp.topk(k, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
    return torch.cat([top.indices.float(), top.values, entropy], -1)


@dataclass
class Streams:
    """A batch of streams as the students read them: ``logits`` [B, S, U, V] (tempered at
    ``temperature``, or raw when it is None) and their evidence [B, S, U, 2k + 1]."""

    logits: torch.Tensor
    evidence: torch.Tensor
    temperature: float = None

    @classmethod
    def from_logits(cls, logits, k):
        """From raw logits, computed now (free-running decoding; ``precompute_features: false``)."""
        return cls(logits, evidence(logits, k), None)

    @property
    def k(self):
        return (self.evidence.shape[-1] - 1) // 2

    def top_ids(self, k=None):
        return self.evidence[..., : (k or self.k)].long()

    def top_logp(self, k=None):
        return self.evidence[..., self.k : self.k + (k or self.k)]

    def entropy(self):
        return self.evidence[..., -1:]

    def to(self, device):
        return Streams(self.logits.to(device), self.evidence.to(device), self.temperature)
