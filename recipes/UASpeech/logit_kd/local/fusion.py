"""Fusion students: from S >= 1 streams of teacher logits ``[B, S, U, V]`` to one ``[B, U, V]``.

All of them take any number of streams (``stream_mask`` [B, S] says which are present), as
``features.Streams`` (the tempered logits and the evidence the students read, precomputed once per
fold) or as raw logits, and return log-probability-like logits. With a single stream, ``mean``,
``weights`` and ``attention`` are the identity (the student then equals the stream's own SA
model); they earn their keep with several streams (``input_streams: cross``). ``transformer`` can
also correct a single stream.

No student looks at a later position than the one it predicts: decoder logits are teacher-forced,
so position u+1 was computed from the reference token at u, and looking ahead would leak the
reference into the hypothesis.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from local.features import Streams

FUSIONS = ("mean", "weights", "attention", "transformer")
MEAN_MODES = ("logit", "prob", "logprob")


def stream_log_weights(scores, stream_mask):
    """Log-softmax over streams (dim 1) of ``scores`` [B, S, U]; absent streams get -inf (weight 0).
    Working in log space keeps the gradient finite where a weight is exactly zero."""
    scores = scores.float().masked_fill(~stream_mask[:, :, None], float("-inf"))
    return torch.log_softmax(scores, dim=1)


def mix_probabilities(logp, log_weights):
    """log sum_s w_s p_s from log-probs [B, S, U, V] and log-weights [B, S, U]."""
    return torch.logsumexp(logp + log_weights.unsqueeze(-1), dim=1)


def mix_at_temperature(streams, log_weights, temperature):
    """Logits whose softmax at ``temperature`` is the weighted mixture of the streams' softmax at
    that temperature: T * log sum_s w_s softmax(z_s / T).

    The KD term compares distributions at T. A student that mixed the streams at T = 1 and was
    then tempered would be compared with a mixture of tempered teachers, a different family: on
    the demo tree that mismatch drove a trained attention mix onto a single stream. Mixing at T
    makes the student's tempered output the same kind of object as the target. With one stream
    the result is that stream's logits minus a constant (the identity for decoding).

    This is the one step of a student that reads every [B, S, U, V] value (``TemperedMix``)."""
    if not isinstance(streams, Streams):
        streams = Streams.from_logits(streams, 1)
    tempered = streams.temperature is not None and abs(streams.temperature - temperature) < 1e-12
    return TemperedMix.apply(streams.logits, log_weights.float(), float(temperature), tempered)


class TemperedMix(torch.autograd.Function):
    """``T * log sum_s w_s softmax(z_s / T)`` over the streams, in probability space: one pass
    makes ``w_s p_s`` (an exp of the stream's log-probabilities plus its log-weight, never above 1,
    so it cannot overflow), a sum over the streams gives the mixture, and the backward is one
    product of those ``w_s p_s`` with the incoming gradient (the teacher logits are constants:
    only the weights get one, ``sum_v grad * w_s p_s / mixture``). The autograd version of the
    same logsumexp kept and re-read four [B, S, U, V] tensors per step and took 2.5x the time.
    With ``tempered`` the logits are already ``T * log_softmax(z / T)`` (the packed store): no
    softmax per step at all. Where every stream's ``w_s p_s`` underflows to 0 (a mixture below
    float32's smallest number) the batch is redone with a max-shifted logsumexp: the same value."""

    @staticmethod
    def _log_shares(x, log_weights, temperature, tempered):
        """log(w_s p_s) [B, S, U, V]: one pass over the tempered logits."""
        if tempered:
            return torch.add(log_weights, x, alpha=1.0 / temperature)
        return F.log_softmax(x / temperature, -1) + log_weights

    @staticmethod
    def forward(ctx, logits, log_weights, temperature, tempered):
        x, log_weights = logits.float(), log_weights[..., None]
        share = TemperedMix._log_shares(x, log_weights, temperature, tempered).exp_()  # w_s p_s, in place
        mixture = share.sum(1)
        if bool((mixture > 0).all()):
            out = torch.log(mixture)
        else:  # underflow somewhere: shift by the maximum; share becomes the posterior, mixture 1
            y = TemperedMix._log_shares(x, log_weights, temperature, tempered)
            out = torch.logsumexp(y, 1)
            finite = torch.where(torch.isfinite(out), out, torch.zeros_like(out))
            share = (y - finite[:, None]).exp_()
            mixture = torch.ones_like(out)
        ctx.save_for_backward(share, mixture)
        ctx.temperature = temperature
        return temperature * out

    @staticmethod
    def backward(ctx, grad):
        share, mixture = ctx.saved_tensors
        B, S, U, V = share.shape
        scaled = grad * ctx.temperature / mixture  # [B, U, V]
        # sum_v share[b, s, u, v] * scaled[b, u, v] as one batched product over (s, u) x u' (the
        # diagonal u = u' kept): it reads share in its own layout, where an einsum copied it first.
        pairs = torch.bmm(share.reshape(B, S * U, V), scaled.transpose(1, 2))
        grad_weights = pairs.view(B, S, U, U).diagonal(dim1=2, dim2=3)
        return None, grad_weights, None, None


class MeanFusion(nn.Module):
    """No parameters: the mean of the streams' logits, probabilities or log-probabilities."""

    def __init__(self, mode="prob"):
        super().__init__()
        if mode not in MEAN_MODES:
            raise ValueError(f"mean fusion mode must be one of {MEAN_MODES}, not {mode!r}")
        self.mode = mode

    def forward(self, streams, stream_mask, stream_ids=None):
        logits = streams.logits if isinstance(streams, Streams) else streams
        mask = stream_mask[:, :, None, None].to(logits.dtype)
        count = mask.sum(1).clamp(min=1.0)
        if self.mode == "logit":
            return (logits * mask).sum(1) / count
        logp = F.log_softmax(logits.float(), -1)
        if self.mode == "logprob":
            return (logp * mask).sum(1) / count
        equal = torch.zeros(stream_mask.shape + (logits.shape[2],), device=logits.device)
        return mix_probabilities(logp, stream_log_weights(equal, stream_mask))


class WeightsFusion(nn.Module):
    """One learned weight per teacher identity (an unknown identity shares one extra weight)."""

    def __init__(self, n_identities, mix_temperature=1.0):
        super().__init__()
        self.n_identities = n_identities
        self.mix_temperature = mix_temperature
        self.weight = nn.Parameter(torch.zeros(n_identities + 1))

    def forward(self, streams, stream_mask, stream_ids):
        ids = stream_ids.clamp(min=0, max=self.n_identities)
        scores = self.weight[ids].unsqueeze(-1).expand(-1, -1, streams.logits.shape[2])
        return mix_at_temperature(streams, stream_log_weights(scores, stream_mask), self.mix_temperature)


class AttentionFusion(nn.Module):
    """Per-position weights over streams, scored from each stream's own evidence (its confidence
    profile: the top log-probabilities and the entropy), then a probability mix."""

    def __init__(self, evidence_k=5, hidden=32, mix_temperature=1.0):
        super().__init__()
        self.evidence_k = evidence_k
        self.mix_temperature = mix_temperature
        self.score = nn.Sequential(nn.Linear(evidence_k + 1, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, streams, stream_mask, stream_ids=None):
        feats = torch.cat([streams.top_logp(self.evidence_k), streams.entropy()], -1)
        scores = self.score(feats.to(self.score[0].weight.dtype)).squeeze(-1)
        return mix_at_temperature(streams, stream_log_weights(scores, stream_mask), self.mix_temperature)


def dropout(x, p, training, noise=None):
    """Dropout whose mask comes from ``noise`` (``batch.StepNoise``: the numbers of the whole
    global batch, so that N processes drop what one process drops), else from torch's generator."""
    if not training or p <= 0:
        return x
    if noise is None:
        return F.dropout(x, p, True)
    return x * noise.keep(p, *x.shape[1:]).to(x.dtype)


class EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer (the math of ``nn.TransformerEncoderLayer`` with
    ``norm_first=True``, ReLU), written out so that its four dropouts take their masks from the
    step's noise rather than from torch's global generator."""

    def __init__(self, d_model, n_heads, d_ffn, p):
        super().__init__()
        self.n_heads, self.p = n_heads, p
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ffn1, self.ffn2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)

    def forward(self, x, blocked, noise=None):
        """x [B, L, d]; blocked [B, L, L]: True where a query may not see a key."""
        B, L, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / (d // self.n_heads) ** 0.5
        weights = torch.softmax(scores.masked_fill(blocked[:, None], float("-inf")), -1)
        weights = dropout(weights, self.p, self.training, noise)
        attended = (weights @ v).transpose(1, 2).reshape(B, L, d)
        x = x + dropout(self.out(attended), self.p, self.training, noise)
        hidden = dropout(F.relu(self.ffn1(self.norm2(x))), self.p, self.training, noise)
        return x + dropout(self.ffn2(hidden), self.p, self.training, noise)


class TransformerFusion(nn.Module):
    """Stream encoder + a small transformer over positions and streams + a residual correction.

    Each stream position is encoded from its top-k (token id, log-probability) pairs only, so the
    cost does not grow as S x V dense products: an embedding look-up of k ids, a linear map of k
    numbers. A transformer attends over all (stream, position) cells at the same or earlier
    positions. Its output scores the streams per position (an attention mix of their
    probabilities) and, pooled over streams, adds a low-rank correction (d -> r -> V) to the mix.
    The correction's last layer starts at zero, so the untrained student is the attention mix.
    """

    def __init__(
        self,
        vocab_size,
        top_k=8,
        d_model=64,
        n_heads=4,
        n_layers=2,
        d_ffn=128,
        correction_rank=16,
        dropout=0.1,
        max_positions=64,
        mix_temperature=1.0,
    ):
        super().__init__()
        self.top_k = top_k
        self.mix_temperature = mix_temperature
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.evidence = nn.Linear(top_k + 1, d_model)
        self.position = nn.Embedding(max_positions, d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ffn, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)  # LayerNorm, not BatchNorm: SyncBatchNorm breaks CPU DDP
        self.stream_score = nn.Linear(d_model, 1)
        self.correction = nn.Sequential(nn.Linear(d_model, correction_rank), nn.Linear(correction_rank, vocab_size))
        nn.init.zeros_(self.correction[1].weight)
        nn.init.zeros_(self.correction[1].bias)

    def forward(self, streams, stream_mask, stream_ids=None, noise=None):
        B, S, U, V = streams.logits.shape
        device = streams.logits.device
        top_logp, top_ids = streams.top_logp(self.top_k), streams.top_ids(self.top_k)
        dtype = self.evidence.weight.dtype
        # Encode each (stream, position) from its top-k pairs: ids weighted by their probability.
        share = torch.softmax(top_logp, -1).unsqueeze(-1).to(dtype)
        h = (share * self.token_embedding(top_ids)).sum(-2)
        h = h + self.evidence(torch.cat([top_logp, streams.entropy()], -1).to(dtype))
        h = h + self.position(torch.arange(U, device=device))
        # Attend over all cells (s', u') with u' <= u of present streams (each cell sees itself).
        pos = torch.arange(U, device=device).repeat(S)
        causal = pos[None, :] > pos[:, None]  # [SU, SU]
        absent = ~stream_mask.repeat_interleave(U, dim=1)  # [B, SU]
        blocked = causal[None] | absent[:, None, :]  # [B, SU, SU]
        blocked = blocked & ~torch.eye(S * U, dtype=torch.bool, device=device)[None]
        h = h.reshape(B, S * U, -1)
        for layer in self.layers:
            h = layer(h, blocked, noise)
        h = self.norm(h).reshape(B, S, U, -1)
        mixed = mix_at_temperature(
            streams, stream_log_weights(self.stream_score(h).squeeze(-1), stream_mask), self.mix_temperature
        )
        present = stream_mask[:, :, None, None].to(h.dtype)
        pooled = (h * present).sum(1) / present.sum(1).clamp(min=1.0)
        return mixed + self.correction(pooled).float()


class FusionStudent(nn.Module):
    """The student of the recipe: one of FUSIONS, built from the hparams' knobs."""

    def __init__(
        self,
        fusion,
        vocab_size,
        n_identities,
        mean_mode="prob",
        evidence_k=5,
        attention_hidden=32,
        top_k=8,
        d_model=64,
        n_heads=4,
        n_layers=2,
        d_ffn=128,
        correction_rank=16,
        dropout=0.1,
        mix_temperature=1.0,
    ):
        super().__init__()
        self.fusion_name = fusion
        # the evidence the students read: the top-k of each stream position (the store packs it)
        self.evidence_k = min(max(top_k, evidence_k), vocab_size)
        if fusion == "mean":
            self.fusion = MeanFusion(mean_mode)
        elif fusion == "weights":
            self.fusion = WeightsFusion(n_identities, mix_temperature)
        elif fusion == "attention":
            self.fusion = AttentionFusion(min(evidence_k, vocab_size), attention_hidden, mix_temperature)
        elif fusion == "transformer":
            self.fusion = TransformerFusion(
                vocab_size,
                min(top_k, vocab_size),
                d_model,
                n_heads,
                n_layers,
                d_ffn,
                correction_rank,
                dropout,
                mix_temperature=mix_temperature,
            )
        else:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {fusion!r}")

    def forward(self, streams, stream_mask, stream_ids, noise=None):
        """``streams``: ``features.Streams`` or raw logits [B, S, U, V]; ``noise``: the training
        step's random numbers (``batch.StepNoise``), or None."""
        if not isinstance(streams, Streams):
            streams = Streams.from_logits(streams, self.evidence_k)
        if isinstance(self.fusion, TransformerFusion):
            return self.fusion(streams, stream_mask, stream_ids, noise)
        return self.fusion(streams, stream_mask, stream_ids)


def drop_streams(stream_mask, p, generator=None, noise=None):
    """Random stream subsets for training: with probability p an item keeps a uniformly drawn
    number (1..S_i) of its S_i streams, so a student trained on many streams also works on one.
    The numbers come from ``noise`` (``batch.StepNoise``) when given, else from ``generator``."""
    B, S = stream_mask.shape
    if S == 1 or p <= 0:
        return stream_mask
    device = stream_mask.device

    def uniform(*shape):
        return noise.uniform(*shape) if noise is not None else torch.rand(B, *shape, generator=generator)

    order = uniform(S).to(device).masked_fill(~stream_mask, 2.0)
    rank = order.argsort(1).argsort(1)
    n = stream_mask.sum(1)
    keep_n = (uniform().to(device) * n).floor().long() + 1
    apply = uniform().to(device) < p
    keep_n = torch.where(apply, keep_n, n)
    return stream_mask & (rank < keep_n[:, None])
