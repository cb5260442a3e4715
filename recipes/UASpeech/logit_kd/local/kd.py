"""The distillation objective: the teacher-ensemble target and the KD + CE loss.

    loss = alpha * T^2 * KL(softmax(target / T) || softmax(student / T)) + (1 - alpha) * CE(student, tokens_eos)

Both terms are averaged over the real (unpadded) positions of the batch and computed in float32,
whatever the autocast precision of the forward pass.
"""

import hashlib
import json

import torch
import torch.nn.functional as F

from local.packed import PackedRows, build_packed, cache_key

AGGREGATIONS = ("prob_mean", "logprob_mean", "logit_mean", "weighted", "best")


def ensemble_target(logits, temperature, aggregation="prob_mean", weights=None, tokens=None, stream_mask=None):
    """Teacher-ensemble distribution ``[..., U, V]`` at temperature T from ``[..., S, U, V]`` logits.

    - ``prob_mean``: mean of the teachers' softmax(z / T);
    - ``logprob_mean``: normalised geometric mean, softmax(mean log_softmax(z / T));
    - ``logit_mean``: softmax(mean z / T);
    - ``weighted``: sum_s w_s softmax(z_s / T), ``weights`` [..., S] (teacher quality);
    - ``best``: the teacher that gives the reference ``tokens`` [..., U] the highest likelihood.

    ``stream_mask`` [..., S] marks the streams present (a batch of target sets of different sizes).
    """
    logits = logits.float()
    present = torch.ones(logits.shape[:-2], dtype=torch.bool) if stream_mask is None else stream_mask
    if aggregation == "weighted":
        if weights is None:
            raise ValueError("the weighted aggregation needs teacher weights")
        w = torch.as_tensor(weights, dtype=torch.float32) * present
    else:
        w = present.float()
    w = (w / w.sum(-1, keepdim=True))[..., None, None]  # [..., S, 1, 1], sums to 1
    if aggregation in ("prob_mean", "weighted"):  # sum_s w_s p_s, one product over the streams
        return torch.einsum("...s,...suv->...uv", w[..., 0, 0], F.softmax(logits / temperature, -1))
    if aggregation == "logprob_mean":
        return F.softmax((w * F.log_softmax(logits / temperature, -1)).sum(-3), -1)
    if aggregation == "logit_mean":
        return F.softmax((w * logits).sum(-3) / temperature, -1)
    if aggregation == "best":
        if tokens is None:
            raise ValueError("the best aggregation needs the reference tokens")
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        index = tokens.unsqueeze(-2).expand(*logits.shape[:-1]).unsqueeze(-1)
        likelihood = F.log_softmax(logits, -1).gather(-1, index).squeeze(-1).sum(-1)  # [..., S]
        best = likelihood.masked_fill(~present, float("-inf")).argmax(-1)
        chosen = logits.gather(-3, best[..., None, None, None].expand(*logits.shape[:-3], 1, *logits.shape[-2:]))
        return F.softmax(chosen.squeeze(-3) / temperature, -1)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")


def kd_loss(student_logits, target_probs, tokens, mask, temperature, alpha, positions=None):
    """KD + CE loss of a batch and its two parts.

    student_logits: [B, U, V]; target_probs: [B, U, V] ensemble distribution at temperature T, or
    None (then only the CE term is computed: the test, where no teacher target exists);
    tokens: [B, U] tokens_eos; mask: [B, U] real positions. Returns (loss, kd, ce), each a scalar:
    a sum over the real positions divided by ``positions`` (default: their number, i.e. the mean;
    in training, a share of the global batch's positions, see ``batch.py``). kd is None without
    a target.
    """
    student_logits = student_logits.float()
    mask = mask.float()
    n_pos = mask.sum().clamp(min=1.0) if positions is None else positions
    ce = F.cross_entropy(student_logits.transpose(1, 2), tokens, reduction="none")
    ce = (ce * mask).sum() / n_pos
    if target_probs is None:
        return ce, None, ce
    target_probs = target_probs.float()
    student_logp = F.log_softmax(student_logits / temperature, -1)
    # KL(p || q) = sum p (log p - log q), with 0 log 0 = 0 for the pieces the target rules out.
    kl = (torch.xlogy(target_probs, target_probs) - target_probs * student_logp).sum(-1)
    kd = (kl * mask).sum() / n_pos * temperature**2
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


class EnsembleTargets(PackedRows):
    """The KD targets of a fold, computed once: one packed ``[positions + 1, V]`` table (the last
    row is the zero padding row) with one entry per distinct set of target streams; cached on disk
    with ``cache_dir`` (keyed by the store, the target sets, T, the aggregation and the weights)."""

    def __init__(
        self, store, target_sets, temperature, aggregation, teacher_weights=None, dtype=torch.float32, cache_dir=None
    ):
        self.temperature, self.aggregation = temperature, aggregation
        self.key_of = {}
        lengths = []
        for streams in target_sets:
            key = tuple(streams)
            if key and key not in self.key_of:
                self.key_of[key] = len(lengths)
                lengths.append(int(store.lengths[key[0]]))
        sets = list(self.key_of)
        cache = cache_key(
            "targets",
            store.key,
            str(dtype),
            temperature,
            aggregation,
            teacher_weights,
            hashlib.sha256(json.dumps(sets).encode()).hexdigest(),
        )
        offsets = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0) - torch.tensor(lengths, dtype=torch.long)

        def fill(tensors, chunk=16):
            # Sets of similar size together, a chunk at a time: a few large tensor operations
            # instead of one small one per target set.
            data = tensors["data"]
            order = sorted(range(len(sets)), key=lambda k: (len(sets[k]), lengths[k]))
            for c in range(0, len(order), chunk):
                ks = order[c : c + chunk]
                streams = torch.full((len(ks), max(len(sets[k]) for k in ks)), -1, dtype=torch.long)
                for row, k in enumerate(ks):
                    streams[row, : len(sets[k])] = torch.tensor(sets[k])
                U = max(lengths[k] for k in ks)
                weights = tokens = None
                if aggregation == "weighted":
                    weights = torch.tensor(
                        [
                            [teacher_weights[store.stream_model[j]] if j >= 0 else 0.0 for j in row]
                            for row in streams.tolist()
                        ]
                    ).clamp(min=1e-3)
                if aggregation == "best":
                    tokens = torch.zeros(len(ks), U, dtype=torch.long)
                    for row, k in enumerate(ks):
                        tokens[row, : lengths[k]] = torch.tensor(store.tokens.tokens_eos(store.words[sets[k][0]]))
                target = ensemble_target(
                    store.gather(streams, U),
                    temperature,
                    aggregation,
                    weights=weights,
                    tokens=tokens,
                    stream_mask=streams >= 0,
                )
                for row, k in enumerate(ks):
                    start = int(offsets[k])
                    data[start : start + lengths[k]] = target[row, : lengths[k]]

        arrays = {"data": ((sum(lengths) + 1, store.vocab_size), dtype)}
        tensors, self.from_cache = build_packed(cache_dir, "targets", cache, arrays, fill)
        super().__init__(tensors["data"], lengths)

    def index(self, streams):
        """Index of the target of a set of streams (-1 for none)."""
        return self.key_of.get(tuple(streams), -1) if streams else -1


def stream_scores(store, streams, chunk=4096):
    """{stream: (exactly right, summed log-probability of the reference pieces, positions)} of
    ``streams``. Exactly right: the stream's greedy teacher-forced decode (its argmax sequence) is
    the reference's ``tokens_eos`` (the right pieces, then ``</s>`` at the last position). A chunk of
    rows at a time: a row is V floats (5000 on real data)."""
    streams = torch.tensor(sorted(set(streams)), dtype=torch.long)
    lengths = store.lengths[streams]
    owner = torch.repeat_interleave(torch.arange(len(streams)), lengths)
    rows = torch.repeat_interleave(store.offsets[streams], lengths) + (
        torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    )
    target = torch.tensor([t for j in streams.tolist() for t in store.tokens.tokens_eos(store.words[j])])
    wrong, logp = torch.zeros(len(rows)), torch.zeros(len(rows), dtype=torch.float64)
    for c in range(0, len(rows), chunk):
        # (the packed rows may be tempered, features.tempered: log_softmax and argmax are z's own)
        z = store.data[rows[c : c + chunk].to(store.data.device)].float().cpu()
        t = target[c : c + chunk]
        wrong[c : c + chunk] = (z.argmax(-1) != t).float()
        logp[c : c + chunk] = F.log_softmax(z, -1).gather(-1, t[:, None])[:, 0].double()
    n = len(streams)
    right = (torch.zeros(n).index_add_(0, owner, wrong) == 0).tolist()
    summed = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, logp).tolist()
    return {j: (r, lp, u) for j, r, lp, u in zip(streams.tolist(), right, summed, lengths.tolist())}


def teacher_ranking(store, streams, scores=None):
    """Per teacher model, on ``streams`` (the fold's training audio: never the held-out speaker's):
    ``accuracy`` (exact-match share of its streams), ``mean_logprob`` (the mean log-probability it
    gives the reference pieces, over every position: the continuous statistic that breaks an exact
    tie of accuracies, ``combine.RANKING_RULE``), ``utterances`` and ``positions``. ``scores``:
    ``stream_scores`` of these streams or more, when already computed."""
    streams = sorted(set(streams))
    scores = stream_scores(store, streams) if scores is None else scores
    out = {}
    for j in streams:
        right, logp, positions = scores[j]
        model = out.setdefault(store.stream_model[j], {"right": 0, "utterances": 0, "logp": 0.0, "positions": 0})
        model["right"] += int(right)
        model["utterances"] += 1
        model["logp"] += logp
        model["positions"] += positions
    return {
        m: {
            "accuracy": v["right"] / v["utterances"],
            "mean_logprob": v["logp"] / v["positions"],
            "utterances": v["utterances"],
            "positions": v["positions"],
        }
        for m, v in sorted(out.items())
    }


def teacher_quality(store, streams, scores=None):
    """Per teacher model: the exact-match accuracy of its greedy teacher-forced decode on ``streams``
    (the training items' streams: validation, which selects the model, must not shape its targets),
    the weights of the ``weighted`` target. Never computed on held-out data."""
    return {m: r["accuracy"] for m, r in teacher_ranking(store, streams, scores).items()}
