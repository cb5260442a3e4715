"""Fusion students: any number of streams, identity on one stream, no look-ahead, finite gradients."""

import pytest
import torch

from local.fusion import FUSIONS, FusionStudent, MeanFusion, drop_streams

V = 13


def _student(fusion, seed=0):
    torch.manual_seed(seed)
    model = FusionStudent(
        fusion, V, n_identities=15, top_k=4, d_model=16, n_heads=2, n_layers=1, d_ffn=32, correction_rank=4, dropout=0.0
    )
    return model.eval()


def _batch(B=3, S=4, U=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, U, V, generator=g) * 3
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, 1:] = False
    ids = torch.arange(S).repeat(B, 1)
    return logits, mask, ids


@pytest.mark.parametrize("fusion", ["mean", "weights", "attention"])
def test_single_stream_is_the_identity(fusion):
    logits, mask, ids = _batch(S=1)
    out = _student(fusion)(logits, mask, ids)
    assert torch.allclose(torch.log_softmax(out, -1), torch.log_softmax(logits[:, 0], -1), atol=1e-5)


def test_untrained_transformer_is_the_attention_mix():
    logits, mask, ids = _batch(S=1)
    out = _student("transformer")(logits, mask, ids)  # zero-initialised correction
    assert torch.allclose(torch.log_softmax(out, -1), torch.log_softmax(logits[:, 0], -1), atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_absent_streams_do_not_matter(fusion):
    model = _student(fusion)
    logits, mask, ids = _batch()
    out = model(logits, mask, ids)
    changed = logits.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    assert torch.allclose(model(changed, mask, ids), out, atol=1e-5)
    assert out.shape == (3, 5, V)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_no_look_ahead(fusion):
    """Position u must not depend on positions > u: their teacher-forced logits saw the reference
    token at u."""
    model = _student(fusion)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # leave the zero initialisation
    logits, mask, ids = _batch()
    out = model(logits, mask, ids)
    for u in range(4):
        later = logits.clone()
        later[:, :, u + 1 :] = torch.randn_like(later[:, :, u + 1 :]) * 5
        assert torch.allclose(model(later, mask, ids)[:, : u + 1], out[:, : u + 1], atol=1e-5)


def test_mean_modes():
    logits, mask, _ = _batch()
    p = torch.softmax(logits, -1)
    m = mask[:, :, None, None].float()
    expected = torch.log((p * m).sum(1) / m.sum(1))
    assert torch.allclose(MeanFusion("prob")(logits, mask), expected, atol=1e-5)
    assert torch.allclose(MeanFusion("logit")(logits, mask), (logits * m).sum(1) / m.sum(1), atol=1e-5)


@pytest.mark.parametrize("fusion", ["weights", "attention", "transformer"])
def test_gradients_are_finite_with_masked_streams(fusion):
    model = _student(fusion).train()
    logits, mask, ids = _batch()
    model(logits, mask, ids).logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_weights_fusion_learns_per_identity():
    model = _student("weights")
    with torch.no_grad():
        model.fusion.weight[2] = 50.0  # trust teacher identity 2 entirely
    logits, mask, ids = _batch()
    out = model(logits, torch.ones_like(mask), ids)
    assert torch.allclose(torch.log_softmax(out, -1), torch.log_softmax(logits[:, 2], -1), atol=1e-4)


def test_drop_streams_keeps_a_random_nonempty_subset():
    mask = torch.ones(2000, 6, dtype=torch.bool)
    mask[:, 4:] = False
    g = torch.Generator().manual_seed(0)
    kept = drop_streams(mask, 1.0, generator=g)
    assert not (kept & ~mask).any()
    counts = kept.sum(1)
    assert counts.min() == 1 and counts.max() == 4
    assert set(counts.tolist()) == {1, 2, 3, 4}
    assert torch.equal(drop_streams(mask, 0.0), mask)
    single = torch.ones(5, 1, dtype=torch.bool)
    assert torch.equal(drop_streams(single, 1.0), single)


@pytest.mark.parametrize("fusion", ["weights", "attention", "transformer"])
def test_mixing_at_the_kd_temperature(fusion):
    """softmax(student / T) is the weighted mixture of the streams' softmax at T, so the student's
    tempered output is the same kind of distribution as the prob_mean KD target; one stream stays
    the identity for decoding."""
    T = 3.0
    torch.manual_seed(0)
    model = FusionStudent(
        fusion,
        V,
        n_identities=15,
        top_k=4,
        d_model=16,
        n_heads=2,
        n_layers=1,
        d_ffn=32,
        correction_rank=4,
        dropout=0.0,
        mix_temperature=T,
    ).eval()
    logits, mask, ids = _batch()
    out = model(logits, torch.ones_like(mask), ids)
    if fusion == "weights":  # untrained: equal weights, so the tempered output is the KD target
        target = torch.softmax(logits / T, -1).mean(1)
        assert torch.allclose(torch.softmax(out / T, -1), target, atol=1e-5)
    single = model(logits[:, :1], mask[:, :1], ids[:, :1])
    assert torch.equal(single.argmax(-1), logits[:, 0].argmax(-1))
    assert torch.allclose(torch.log_softmax(single, -1), torch.log_softmax(logits[:, 0], -1), atol=1e-4)


def _reference_mix(logits, log_weights, T):
    """The mixture written with autograd: T * logsumexp_s(log_softmax(z_s / T) + log w_s)."""
    return T * torch.logsumexp(torch.log_softmax(logits / T, -1) + log_weights[..., None], 1)


@pytest.mark.parametrize("tempered", [False, True])
@pytest.mark.parametrize("scale", [3.0, 400.0])  # 400: every stream's w_s p_s underflows somewhere
def test_tempered_mix_matches_autograd(tempered, scale):
    """The hand-written forward and backward of the mix equal autograd's, with absent streams, on
    the raw logits and on the store's tempered ones, and where the probabilities underflow."""
    from local.features import tempered as temper
    from local.fusion import TemperedMix, stream_log_weights

    T = 3.0
    logits, mask, _ = _batch()
    logits = logits * scale / 3
    scores = torch.randn(mask.shape + (logits.shape[2],), generator=torch.Generator().manual_seed(5))
    grad = torch.randn(logits.shape[0], logits.shape[2], V, generator=torch.Generator().manual_seed(6))
    ref_scores = scores.clone().requires_grad_()
    ref = _reference_mix(logits, stream_log_weights(ref_scores, mask), T)
    ref.backward(grad)
    ours_scores = scores.clone().requires_grad_()
    inputs = temper(logits, T) if tempered else logits
    ours = TemperedMix.apply(inputs, stream_log_weights(ours_scores, mask), T, tempered)
    ours.backward(grad)
    if scale > 100:  # the case the fallback exists for
        share = torch.exp(torch.log_softmax(logits / T, -1) + stream_log_weights(scores, mask)[..., None])
        assert (share.sum(1) == 0).any()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(ours_scores.grad, ref_scores.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_precomputed_streams_give_the_raw_logits_output(fusion):
    """What the store packs (tempered logits and evidence, once per fold) gives the student the
    output, and the gradients, it computes from the raw logits."""
    from local.features import Streams, evidence, tempered

    T = 3.0
    torch.manual_seed(0)
    outputs, grads = [], []
    logits, mask, ids = _batch()
    for packed in (False, True):
        torch.manual_seed(0)
        model = FusionStudent(
            fusion, V, n_identities=15, top_k=4, d_model=16, n_heads=2, n_layers=1, d_ffn=32, correction_rank=4,
            dropout=0.0, mix_temperature=T,
        )  # fmt: skip
        if fusion != "mean":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))  # a trained-looking student, not the zero correction
        streams = Streams(tempered(logits, T), evidence(logits, model.evidence_k), T) if packed else logits
        out = model(streams, mask, ids)
        outputs.append(out.detach())
        if fusion != "mean":
            out.logsumexp(-1).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    shift = outputs[0] - outputs[1]  # a per-position constant at most (the same softmax)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-4)
    assert torch.allclose(torch.log_softmax(outputs[0], -1), torch.log_softmax(outputs[1], -1), atol=1e-4)
    if grads:
        assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)
