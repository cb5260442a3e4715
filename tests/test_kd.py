"""The KD loss against a direct formula (padding included) and the ensemble targets."""

import math

import pytest
import torch

from local.kd import EnsembleTargets, ensemble_target, kd_loss


def _direct_loss(student, target, tokens, lengths, T, alpha):
    """Position by position, in float64, with explicit loops: the loss formula of the recipe (local/kd.py)."""
    kl_sum, ce_sum, n = 0.0, 0.0, 0
    for b, U in enumerate(lengths):
        for u in range(U):
            s = student[b, u].double()
            p = target[b, u].double()
            q = torch.softmax(s / T, -1)
            kl_sum += sum(float(p[v] * (math.log(p[v]) - math.log(q[v]))) for v in range(len(p)) if p[v] > 0)
            ce_sum += -float(torch.log_softmax(s, -1)[tokens[b][u]])
            n += 1
    kd, ce = T * T * kl_sum / n, ce_sum / n
    return alpha * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("T,alpha", [(3.0, 0.7), (1.0, 0.5), (2.0, 1.0), (3.0, 0.0)])
def test_loss_matches_direct_formula_with_padding(T, alpha):
    torch.manual_seed(0)
    B, U, V = 3, 5, 7
    lengths = [5, 2, 3]
    student = torch.randn(B, U, V) * 3
    target = torch.softmax(torch.randn(B, U, V) * 2, -1)
    target[0, 1, 3] = 0.0  # a piece the target rules out entirely (0 log 0 = 0)
    target[0, 1] /= target[0, 1].sum()
    tokens = torch.randint(0, V, (B, U))
    mask = torch.arange(U)[None] < torch.tensor(lengths)[:, None]
    # garbage in the padding must not matter
    student_pad = student.clone()
    student_pad[~mask] = 1e4
    target_pad = target.clone()
    target_pad[~mask] = 0.3
    loss, kd, ce = kd_loss(student_pad, target_pad, tokens, mask, T, alpha)
    ref_loss, ref_kd, ref_ce = _direct_loss(student, target, tokens.tolist(), lengths, T, alpha)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert float(kd) == pytest.approx(ref_kd, rel=1e-5)
    assert float(ce) == pytest.approx(ref_ce, rel=1e-5)


def test_loss_is_float32_under_bf16_inputs():
    torch.manual_seed(1)
    student = torch.randn(2, 3, 11).bfloat16()
    target = torch.softmax(torch.randn(2, 3, 11), -1).bfloat16()
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, kd, ce = kd_loss(student, target, torch.zeros(2, 3, dtype=torch.long), mask, 3.0, 0.7)
    assert loss.dtype == torch.float32 and kd.dtype == torch.float32


def test_kd_is_zero_when_the_student_equals_the_target():
    logits = torch.randn(2, 4, 9)
    T = 3.0
    target = torch.softmax(logits / T, -1)
    _, kd, _ = kd_loss(logits, target, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), T, 0.5)
    assert float(kd) == pytest.approx(0.0, abs=1e-5)


def test_test_stage_loss_is_ce_only():
    logits = torch.randn(1, 3, 5)
    tokens = torch.tensor([[1, 2, 3]])
    loss, kd, ce = kd_loss(logits, None, tokens, torch.ones(1, 3, dtype=torch.bool), 3.0, 0.7)
    assert kd is None and float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(logits[0], tokens[0])))


def test_ensemble_aggregations():
    torch.manual_seed(2)
    S, U, V, T = 3, 4, 6, 2.0
    z = torch.randn(S, U, V) * 3
    p = torch.softmax(z / T, -1)
    assert torch.allclose(ensemble_target(z, T, "prob_mean"), p.mean(0), atol=1e-6)
    geo = torch.exp(torch.log_softmax(z / T, -1).mean(0))
    assert torch.allclose(ensemble_target(z, T, "logprob_mean"), geo / geo.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(ensemble_target(z, T, "logit_mean"), torch.softmax(z.mean(0) / T, -1), atol=1e-6)
    w = torch.tensor([0.5, 0.3, 0.2])
    assert torch.allclose(ensemble_target(z, T, "weighted", weights=w), (w[:, None, None] * p).sum(0), atol=1e-6)
    tokens = torch.tensor([1, 4, 0, 2])
    z_best = z.clone()
    z_best[1, torch.arange(U), tokens] += 20  # teacher 1 is sure of the reference
    assert torch.allclose(ensemble_target(z_best, T, "best", tokens=tokens), torch.softmax(z_best[1] / T, -1))
    for agg in ("prob_mean", "logprob_mean", "logit_mean"):
        assert torch.allclose(ensemble_target(z, T, agg).sum(-1), torch.ones(U), atol=1e-5)
    with pytest.raises(ValueError):
        ensemble_target(z, T, "median")


def test_ensemble_targets_table(demo_tree):
    from local.store import LogitStore, TokenTable, load_tokenizer

    tokens = TokenTable(load_tokenizer(demo_tree / "tokenizer.model"))
    store = LogitStore(demo_tree / "logit_extraction", tokens, [("F02", "F02"), ("M07", "M07")])
    a = store.stream("F02", "F02_B3_D3_M4")
    b = store.stream("M07", "M07_B3_D3_M4")
    c = store.stream("M07", "M07_B3_LB_M2")
    table = EnsembleTargets(store, [[a, b], [c], [a, b], []], 3.0, "prob_mean")
    assert table.index([]) == -1 and table.index([a, b]) == 0 and table.index([c]) == 1
    U = int(store.lengths[a])
    expected = ensemble_target(torch.stack([store.logits(a), store.logits(b)]), 3.0, "prob_mean")
    got = table.gather([0, -1, 1], U + 2)
    assert torch.allclose(got[0, :U], expected, atol=1e-6)
    assert not got[0, U:].any() and not got[1].any()
    Uc = int(store.lengths[c])
    assert torch.allclose(got[2, :Uc], torch.softmax(store.logits(c) / 3.0, -1), atol=1e-6)


@pytest.mark.parametrize("aggregation", ["prob_mean", "logprob_mean", "logit_mean", "weighted", "best"])
def test_batched_targets_equal_one_set_at_a_time(demo_tree, aggregation):
    """EnsembleTargets computes sets of different sizes together (masked): each must equal the
    direct computation on its own streams."""
    from local.store import LogitStore, TokenTable, load_tokenizer

    tokens = TokenTable(load_tokenizer(demo_tree / "tokenizer.model"))
    store = LogitStore(demo_tree / "logit_extraction", tokens, [("F02", "F02"), ("M07", "M07"), ("M16", "M16")])
    quality = {"F02": 0.9, "M07": 0.5, "M16": 0.2}
    sets = []
    for key in ("D3_M4", "LB_M5", "CW7_M3", "UW2_M6"):
        streams = [store.stream(s, f"{s}_B3_{key}") for s in ("F02", "M07", "M16")]
        sets += [streams, streams[:2], streams[1:2]]
    table = EnsembleTargets(store, sets, 2.0, aggregation, teacher_weights=quality)
    for streams in sets:
        U = int(store.lengths[streams[0]])
        w = torch.tensor([quality[store.stream_model[j]] for j in streams])
        direct = ensemble_target(
            torch.stack([store.logits(j) for j in streams]),
            2.0,
            aggregation,
            weights=w / w.sum(),
            tokens=tokens.tokens_eos(store.words[streams[0]]),
        )
        got = table.gather([table.index(streams)], U)[0]
        assert torch.allclose(got, direct, atol=1e-6), (aggregation, streams)


def _store(streams):
    """A packed store of (model, [U, V] logits) streams whose reference is tokens_eos [3, 2]."""
    from types import SimpleNamespace

    from local.packed import PackedRows

    blocks = [z for _, z in streams]
    store = PackedRows(torch.cat(blocks + [torch.zeros(1, blocks[0].shape[1])]), [len(z) for z in blocks])
    store.tokens = SimpleNamespace(tokens_eos=lambda word: [3, 2])
    store.words = ["THREE"] * len(streams)
    store.stream_model = [m for m, _ in streams]
    return store


def test_the_teacher_ranking_breaks_an_accuracy_tie_by_the_reference_log_probability():
    """Two teachers right on one utterance of two: equal accuracy. The continuous statistic (mean
    log-probability of the reference pieces) decides, before the name; equal on both: the name."""
    from local.combine import best_single, rank_key
    from local.kd import teacher_quality, teacher_ranking

    def logits(right, margin):
        z = torch.zeros(2, 5)
        z[0, 3 if right else 4], z[1, 2] = margin, margin
        return z

    streams = [("F02", logits(True, 1.0)), ("F02", logits(False, 1.0)), ("M07", logits(True, 4.0))]
    streams.append(("M07", logits(False, 4.0)))
    store = _store(streams)
    ranking = teacher_ranking(store, range(4))
    assert ranking["F02"]["accuracy"] == ranking["M07"]["accuracy"] == 0.5
    assert teacher_quality(store, range(4)) == {"F02": 0.5, "M07": 0.5}
    for model, first in (("F02", 0), ("M07", 2)):  # the mean over the model's 4 positions, directly
        direct = sum(
            float(torch.log_softmax(store.data[store.offsets[j] + u], -1)[[3, 2][u]])
            for j in (first, first + 1)
            for u in (0, 1)
        )
        assert ranking[model]["mean_logprob"] == pytest.approx(direct / 4) and ranking[model]["positions"] == 4
    names = sorted(ranking)
    keys = [rank_key(ranking[m]["accuracy"], ranking[m]["mean_logprob"]) for m in names]
    assert names[best_single(keys, names)] == "M07"  # not the first name: the statistic decides
    assert names[best_single([rank_key(0.5, -1.0)] * 2, names)] == "F02"  # equal on both: the name
    # accuracy comes first: F02 always right (stream 0), M07 half the time but more confident in the
    # reference (stream 2, and a near miss: the reference's piece a close second)
    near = logits(True, 4.0)
    near[0, 4] = 4.1
    store = _store(streams + [("M07", near)])
    fewer = teacher_ranking(store, [0, 2, 4])
    assert fewer["F02"]["accuracy"] == 1.0 and fewer["M07"]["accuracy"] == 0.5
    assert fewer["F02"]["mean_logprob"] < fewer["M07"]["mean_logprob"]
    keys = [rank_key(fewer[m]["accuracy"], fewer[m]["mean_logprob"]) for m in names]
    assert names[best_single(keys, names)] == "F02"
