"""Free-running decoding of the held-out speaker's audio with the trained student in the loop.

The fold's test-stream SA models (``matched`` / ``self``: the held-out speaker's own model;
``cross``: the teachers' models) encode the audio once per batch of utterances; then, at each step
of the search, each model's decoder reads the hypothesis prefix, the student (causal: its output
at a position sees only the positions before it) fuses their step logits, and SpeechBrain's own
searcher extends the hypotheses. The searchers are SpeechBrain's ``S2STransformerGreedySearcher``
and ``S2STransformerBeamSearcher``: ``StreamDecoder`` stands where their ``TransformerASR`` stands
(it has its ``decode(memory, enc_states, enc_lens)``) and the output layer is the identity (the
student's output is already over the vocabulary). The encoder states of the models are
concatenated on the feature axis (same audio, same front end: the same frames), so that the
searcher's batch and beam bookkeeping carries them unchanged; ``StreamCTC`` gives the CTC scorer
the frame mean of the CTC posteriors of the system's CTC models.

Batches of utterances. SpeechBrain's searchers run a batch x beam at once, but take the step limits
of the whole batch from its longest utterance (``max_decode_ratio`` x the padded frames): a short
utterance decoded beside a long one would be searched for more steps than alone. ``GreedySearcher``
and ``BeamSearcher`` keep SpeechBrain's search and give each utterance its own limits, ending it
where it would end alone (for the beam search: its beams filled from the alive hypotheses at its
own last step, as SpeechBrain does after its loop). With the encoder outputs of
``SAModel.encode_batch`` (equal to each utterance's own) and the relative lengths, an utterance's
hypothesis is the one it gets in a batch of one, token for token (tested).

What a step computes. SpeechBrain's searchers call the decoder and the language model on the whole
prefix at every step, with the encoder states copied once per beam. Here the decoders' and the
LM's layers run on the new position only, reading what they kept of the earlier ones
(``local/incremental.py``), the cross-attention projects the encoder frames once per utterance and
search (``EncoderAttentionCache``), and only the last position is projected onto the vocabulary:
the same outputs (tested), most of a search's cost on short words saved.

CTC scoring. SpeechBrain's ``CTCPrefixScore`` updates the prefix probabilities with Python loops over
the batch x beam rows; ``CTCScorer`` here computes the same numbers without them (tested equal). It
scores every vocabulary entry (``ctc_scoring: full``, the SA pipeline's setting) or, as
SpeechBrain's partial scorers do, only the ``scorer_beam_scale x beam`` best candidates of the
attention (and LM) scores of each hypothesis (``partial``): memory and time then scale with that
number instead of the vocabulary; the one change is that a token outside those candidates can no
longer win on its CTC score alone.

With one stream and a student that returns its stream (or the ``mean`` fusion), these searches are
SpeechBrain's searches of that SA model, token for token (tested).
"""

import contextlib
import math
from types import SimpleNamespace

import torch
from speechbrain.decoders import S2STransformerBeamSearcher, S2STransformerGreedySearcher
from speechbrain.decoders import scorer as sb_scorer
from speechbrain.decoders.ctc import CTCPrefixScore
from torch import nn
from torch.nn import functional as F

from local.corpus import SPEAKERS

EOS = 2  # </s> of the SA models
SEARCHES = ("greedy", "beam")
CTC_SCORING = ("full", "partial")

# The SA pipeline's test search (its yaml's test_search, scorers and decoding keys): used where the
# held-out speaker's hparams file does not say otherwise.
SA_TEST_SEARCH = {
    "beam_size": 66,
    "ctc_weight": 0.4,
    "lm_weight": 0.6,
    "temperature": 1.15,
    "lm_temperature": 1.15,
    "min_decode_ratio": 0.0,
    "max_decode_ratio": 1.0,
    "using_eos_threshold": False,
    "length_normalization": True,
    "blank_index": 0,
}
# hparams key (or key.argument) of the SA yaml -> SA_TEST_SEARCH key
SA_SEARCH_KEYS = {
    "test_beam_size": "beam_size",
    "ctc_weight_decode": "ctc_weight",
    "lm_weight": "lm_weight",
    "min_decode_ratio": "min_decode_ratio",
    "max_decode_ratio": "max_decode_ratio",
    "test_search.temperature": "temperature",
    "test_search.using_eos_threshold": "using_eos_threshold",
    "test_search.length_normalization": "length_normalization",
    "transformerlm_scorer.temperature": "lm_temperature",
    "blank_index": "blank_index",
}


def search_settings(hparams_file):
    """The test-search settings of an SA model's hparams file (SA_TEST_SEARCH where it is silent),
    read without building anything; returns (settings, {key: where it came from})."""
    import ruamel.yaml

    with open(hparams_file, encoding="utf-8") as handle:
        doc = ruamel.yaml.YAML().load(handle)
    settings, source = dict(SA_TEST_SEARCH), {}
    for path, key in SA_SEARCH_KEYS.items():
        node = doc
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        same_kind = isinstance(settings[key], bool) == isinstance(node, bool)  # a flag, or a number
        if isinstance(node, (bool, int, float)) and same_kind:
            settings[key] = type(settings[key])(node)
            source[key] = path
    return settings, source


# ------------------------------------------------------------------------------------------------
# The fused decoder and its CTC
# ------------------------------------------------------------------------------------------------


class StreamDecoder(nn.Module):
    """``decode(memory, enc_states, enc_lens)`` of S SA models' decoders fused by the student.

    ``models``: objects with ``name``, ``modules["Transformer"]``, ``modules["seq_lin"]`` and
    ``modules["ctc_lin"]`` (``SAModel``); ``ctc_models``: the models whose CTC posteriors the beam
    search's CTC scorer averages (default: ``models``). ``enc_states`` [N, T, sum of D] holds the
    encoder outputs of ``layout`` (``models``, then the CTC models that are not among them);
    returns the student's output at the last prefix position [N, 1, V] (the searcher reads the
    last one) and the first model's cross-attention."""

    def __init__(self, models, student, ctc_models=None):
        super().__init__()
        self.models = list(models)
        self.student = student
        self.ctc_models = list(ctc_models) if ctc_models is not None else list(self.models)
        names = [m.name for m in self.models]
        self.layout = self.models + [m for m in self.ctc_models if m.name not in names]
        self.d_model = [int(m.modules["seq_lin"].w.in_features) for m in self.layout]
        identity = {m: i for i, m in enumerate(SPEAKERS)}
        # as the store gives them: the model's index in SPEAKERS, unknown models share one
        self.stream_ids = torch.tensor([identity.get(m.name, len(SPEAKERS)) for m in self.models])
        # A student whose output at a position reads that position only (the mean fusions, a
        # pass-through) needs the models' logits at the last position only: the searcher reads no
        # other. The transformer student attends over every earlier position.
        fusion = getattr(student, "fusion", student)
        self.reads_prefix = hasattr(fusion, "position")
        self.vocab_size = int(self.models[0].modules["seq_lin"].w.out_features)
        self.steps = None  # during a search: each model's LastPositionDecoder (or None)

    @contextlib.contextmanager
    def search(self, group):
        """While inside (one search): the encoder side of the cross-attention projected once per
        utterance (``group`` rows each), and the decoders run on the new position only
        (``incremental.LastPositionDecoder``) where SpeechBrain's modules allow it."""
        from local.incremental import LastPositionDecoder, decoder_supported

        self.steps = {
            m.name: LastPositionDecoder(m.modules["Transformer"])
            if decoder_supported(m.modules["Transformer"])
            else None
            for m in self.models
        }
        self.kept_logits = None
        try:
            with cached_encoder_attention(self.models, group):
                yield
        finally:
            self.steps, self.kept_logits = None, None

    def permute(self, index):
        """Reorders what a search keeps per hypothesis as the beam search reorders its hypotheses."""
        if self.steps is not None:
            for step in self.steps.values():
                if step is not None:
                    step.permute(index)
            if self.kept_logits is not None:
                self.kept_logits = self.kept_logits.index_select(0, index)

    def encodings(self, encoded):
        """[B, T, sum of D]: this decoder's encoder states from ``encoded`` {model name: [B, T, D]}."""
        return torch.cat([encoded[m.name] for m in self.layout], -1)

    def split(self, enc_states):
        """{model name: [N, T, D]} of ``enc_states``."""
        return dict(zip((m.name for m in self.layout), torch.split(enc_states, self.d_model, dim=-1)))

    def stream_logits(self, memory, enc_states, enc_lens, last_only=False):
        """[N, S, t, V] (or [N, S, 1, V]): each model's decoder logits on the prefix ``memory`` [N, t].
        During a search, the models that run on the new position only give it, and the logits of the
        earlier positions are those kept from the earlier steps."""
        logits, attn = [], None
        parts = self.split(enc_states)
        steps = self.steps or {}
        incremental = all(steps.get(m.name) is not None for m in self.models) and bool(steps)
        for model in self.models:
            if incremental:
                pred, a = steps[model.name](memory, parts[model.name], enc_lens)
            else:
                pred, a = model.modules["Transformer"].decode(memory, parts[model.name], enc_lens)
            attn = a if attn is None else attn
            logits.append(model.modules["seq_lin"](pred[:, -1:] if last_only or incremental else pred))
        logits = torch.stack(logits, 1)
        if incremental and not last_only:
            if self.kept_logits is not None:
                logits = torch.cat([self.kept_logits, logits], 2)
            self.kept_logits = logits
        return logits, attn

    def max_positions(self):
        """Prefix positions the student can read (its position table), or None."""
        position = getattr(getattr(self.student, "fusion", None), "position", None)
        return position.num_embeddings if isinstance(position, nn.Embedding) else None

    def decode(self, memory, enc_states, enc_lens=None):
        limit = self.max_positions()
        if limit is not None and memory.shape[1] > limit:
            # Only a hypothesis that no model ends runs this long (UASpeech words are a few
            # pieces); past the student's position table it is ended with </s>.
            ended = torch.full((memory.shape[0], 1, self.vocab_size), float("-inf"), device=enc_states.device)
            ended[..., EOS] = 0.0
            return ended, None
        streams, attn = self.stream_logits(memory, enc_states, enc_lens, last_only=not self.reads_prefix)
        n, s = streams.shape[:2]
        mask = torch.ones(n, s, dtype=torch.bool, device=streams.device)
        ids = self.stream_ids.to(streams.device).expand(n, s)
        return self.student(streams.float(), mask, ids)[:, -1:], attn


class StreamCTC(nn.Module):
    """The CTC scorer's ``ctc_fc``: log of the frame-by-frame mean of the CTC posteriors of the
    decoder's ``ctc_models`` (the scorer's log-softmax leaves a normalised log-distribution as it is)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, enc_states):
        parts = self.decoder.split(enc_states)
        logp = [torch.log_softmax(m.modules["ctc_lin"](parts[m.name]).float(), -1) for m in self.decoder.ctc_models]
        if len(logp) == 1:
            return logp[0]
        return torch.logsumexp(torch.stack(logp), 0) - math.log(len(logp))


class OutputIdentity(nn.Module):
    """The searcher's output layer: the student's output is already over the vocabulary.
    (SpeechBrain's searchers read the vocabulary size from ``fc.w.out_features``.)"""

    def __init__(self, vocab_size):
        super().__init__()
        self.w = SimpleNamespace(out_features=int(vocab_size))

    def forward(self, x):
        return x


class StreamIdentity(nn.Module):
    """A student that returns its one stream: the parity reference (SpeechBrain's own search)."""

    def forward(self, streams, stream_mask, stream_ids, noise=None):
        return streams[:, 0]


def same_frames(encodings, where):
    """Raises ValueError unless the encoder outputs ``encodings`` ({model: [B, T, D]}) have one T:
    the models' CTC posteriors are averaged frame by frame and the search runs over those frames."""
    frames = {name: int(e.shape[1]) for name, e in encodings.items()}
    if len(set(frames.values())) > 1:
        raise ValueError(
            f"{where}: the models give different numbers of encoder frames {frames} on the same audio: "
            f"their front ends differ, so their decoders cannot share one search"
        )


@torch.no_grad()
def encode(models, wav):
    """[1, T, S * D]: the models' encoder outputs on one waveform, concatenated."""
    outs = {model.name: model.encode(wav) for model in models}
    same_frames(outs, "encode")
    return torch.cat(list(outs.values()), -1)


# ------------------------------------------------------------------------------------------------
# The encoder side of the decoders' cross-attention, computed once per search and utterance
# ------------------------------------------------------------------------------------------------


class EncoderAttentionCache(nn.Module):
    """Stands in for a decoder layer's cross-attention (SpeechBrain's ``MultiheadAttention``)
    during one search: the keys and values of the encoder states are projected once per utterance
    and reused at every step and by every beam of the utterance.

    SpeechBrain's searchers call the decoder on the whole prefix at each step, with the encoder
    states copied once per beam: ``nn.MultiheadAttention`` then projects the same encoder frames
    again for every beam and every step, which is most of the decoder's cost on short words. The
    attention itself is ``nn.MultiheadAttention``'s (scaled query, additive -inf padding mask,
    softmax, output projection, weights averaged over heads), with the ``group`` rows of an
    utterance attending to its keys together."""

    def __init__(self, attention, group):
        super().__init__()
        self.attention, self.group, self.cached = attention, int(group), None

    @staticmethod
    def supports(attention):
        from speechbrain.nnet.attention import MultiheadAttention

        att = getattr(attention, "att", None)
        return (
            isinstance(attention, MultiheadAttention)
            and isinstance(att, nn.MultiheadAttention)
            and att._qkv_same_embed_dim
            and att.in_proj_bias is not None
            and att.bias_k is None
            and not att.add_zero_attn
            and not att.batch_first
        )

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, return_attn_weights=True, **kw):
        pos_embs = kw.get("pos_embs")
        rows, frames, dim = key.shape
        if key is not value or attn_mask is not None or pos_embs is not None or rows % self.group:
            return self.attention(query, key, value, attn_mask, key_padding_mask, return_attn_weights, **kw)
        att = self.attention.att
        heads, n, length = att.num_heads, rows // self.group, query.shape[1]
        head_dim = dim // heads
        w_q, w_kv = att.in_proj_weight.split([dim, 2 * dim])
        b_q, b_kv = att.in_proj_bias.split([dim, 2 * dim])
        ident = (key.data_ptr(), tuple(key.shape), tuple(key.stride()))
        if self.cached is None or self.cached[0] != ident:
            unique = key[:: self.group]  # the rows of one utterance hold the same encoder states
            k, v = F.linear(unique, w_kv, b_kv).unflatten(-1, (2, dim)).unbind(-2)
            k = k.reshape(n, frames, heads, head_dim).permute(0, 2, 3, 1)  # [n, H, hd, S]
            v = v.reshape(n, frames, heads, head_dim).transpose(1, 2)  # [n, H, S, hd]
            mask = None
            if key_padding_mask is not None:
                pad = key_padding_mask[:: self.group]
                mask = torch.zeros(pad.shape, dtype=query.dtype, device=query.device).masked_fill_(pad, float("-inf"))
                mask = mask[:, None, None, :]
            self.cached = (ident, k, v, mask)
        _, k, v, mask = self.cached
        q = F.linear(query, w_q, b_q)  # [rows, L, E]
        q = q.reshape(n, self.group, length, heads, head_dim).permute(0, 3, 1, 2, 4)
        q = q.reshape(n, heads, self.group * length, head_dim) * math.sqrt(1.0 / float(head_dim))
        scores = torch.matmul(q, k)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).reshape(n, heads, self.group, length, head_dim)
        out = out.permute(0, 2, 3, 1, 4).reshape(rows, length, dim)
        out = F.linear(out, att.out_proj.weight, att.out_proj.bias)
        if not return_attn_weights:
            return out
        weights = weights.reshape(n, heads, self.group, length, frames).mean(dim=1)
        return out, weights.reshape(rows, length, frames)


@contextlib.contextmanager
def cached_encoder_attention(models, group):
    """While inside, the decoder layers of ``models`` (``SAModel``) project their encoder states once
    (``EncoderAttentionCache``); ``group``: rows per utterance (the beam size; 1 for greedy)."""
    swapped = []
    for model in models:
        decoder = getattr(model.modules["Transformer"], "decoder", None)
        for layer in getattr(decoder, "layers", []):
            attention = getattr(layer, "multihead_attn", None)
            if attention is not None and EncoderAttentionCache.supports(attention):
                layer.multihead_attn = EncoderAttentionCache(attention, group)
                swapped.append((layer, attention))
    try:
        yield
    finally:
        for layer, attention in swapped:
            layer.multihead_attn = attention


class LastPosition(nn.Module):
    """A language model's output layers applied to the last position only (the scorer reads no other)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x[:, -1:])


class TransformerLMScorer(sb_scorer.TransformerLMScorer):
    """SpeechBrain's ``TransformerLMScorer`` computing the new position only: the language model's
    layers run on it, reading what they kept of the earlier positions (``incremental``; its memory is
    then (tokens, kept keys), reordered with the hypotheses), and only it is projected onto the
    vocabulary (the scorer reads no other position). A language model of another make is run on the
    whole prefix, its output layers on the last position. (The class keeps SpeechBrain's name:
    ``ScorerBuilder`` finds its weight by the class name.)"""

    def score(self, inp_tokens, memory, candidates, attn):
        from local.incremental import lm_last_position, lm_supported

        if lm_supported(self.lm):
            tokens, keys = memory if memory is not None else (None, None)
            if tokens is None:
                tokens = torch.empty(inp_tokens.size(0), 0, device=inp_tokens.device)
            tokens = torch.cat([tokens, inp_tokens.unsqueeze(1)], dim=-1)
            with torch.no_grad():
                out, keys = lm_last_position(self.lm, tokens, keys)
                log_probs = self.softmax(self.lm.output_proj(out) / self.temperature)
            return log_probs[:, -1, :], (tokens, keys)
        layers = self.lm.output_proj
        self.lm.output_proj = LastPosition(layers)
        try:
            return super().score(inp_tokens, memory, candidates, attn)
        finally:
            self.lm.output_proj = layers

    def permute_mem(self, memory, index):
        if isinstance(memory, tuple):
            tokens, keys = memory
            return tokens.index_select(0, index), [k.index_select(0, index) for k in keys]
        return super().permute_mem(memory, index)


# ------------------------------------------------------------------------------------------------
# SpeechBrain's searchers, each utterance of a batch with its own step limits
# ------------------------------------------------------------------------------------------------


def _steps(frames, ratio):
    """SpeechBrain's step limit of an utterance of ``frames`` encoder frames alone in its batch."""
    return int(frames * ratio)


class GreedySearcher(S2STransformerGreedySearcher):
    """SpeechBrain's greedy searcher; an utterance ends where it would in a batch of one.

    SpeechBrain runs ``int(T * max_decode_ratio) - int(T * min_decode_ratio)`` steps with T the
    batch's padded frames; here an utterance whose own limit is reached gets ``</s>``, which ends it
    (its hypothesis keeps the tokens of its own steps, as in a batch of one)."""

    def forward(self, enc_states, wav_len, attention_mask=None):
        frames = torch.round(enc_states.shape[1] * wav_len).int().tolist()
        self.row_steps = torch.tensor(
            [_steps(t, self.max_decode_ratio) - _steps(t, self.min_decode_ratio) for t in frames],
            device=enc_states.device,
        )
        with self.model.search(1):
            return super().forward(enc_states, wav_len, attention_mask)

    def forward_step(self, inp_tokens, memory, enc_states, enc_lens, attention_mask=None):
        logits, memory, attn = super().forward_step(inp_tokens, memory, enc_states, enc_lens, attention_mask)
        over = self.row_steps <= memory.shape[1] - 1  # steps already taken by each row
        if bool(over.any()):
            logits = logits.masked_fill(over[:, None], float("-inf"))
            logits[over, self.eos_index] = 0.0
        return logits, memory, attn


class BeamSearcher(S2STransformerBeamSearcher):
    """SpeechBrain's beam searcher; an utterance ends where it would in a batch of one.

    SpeechBrain stops the search of a batch after ``int(T * max_decode_ratio)`` steps (T: the
    padded frames) and then fills every unfinished beam from its alive hypotheses; forbids ``</s>``
    before ``int(T * min_decode_ratio)`` steps. Here each utterance has the limits of its own
    frames: its beams are filled from its alive hypotheses right after its own last step (the same
    call SpeechBrain makes after its loop, restricted to its rows), after which its rows go on being
    computed but can add nothing (its list of ended hypotheses is full)."""

    def forward(self, enc_states, wav_len):
        with self.model.search(self.beam_size):
            return super().forward(enc_states, wav_len)

    def permute_mem(self, memory, index):
        self.model.permute(index)  # what the decoders keep per hypothesis follows the hypotheses
        return super().permute_mem(memory, index)

    def init_beam_search_data(self, enc_states, wav_len):
        data = super().init_beam_search_data(enc_states, wav_len)
        frames = torch.round(enc_states.shape[1] * wav_len).int().tolist()
        self.utt_max_steps = [_steps(t, self.max_decode_ratio) for t in frames]
        self.utt_min_steps = torch.tensor([_steps(t, self.min_decode_ratio) for t in frames], device=self.device)
        return data

    def _set_eos_minus_inf_step(self, log_probs, step, min_decode_steps):
        rows = (self.utt_min_steps > step).repeat_interleave(self.beam_size)
        if bool(rows.any()):
            log_probs[rows, self.eos_index] = self.minus_inf
        return log_probs

    def search_step(self, alived_hyps, inp_tokens, log_probs, eos_hyps_and_log_probs_scores, *args):
        out = super().search_step(alived_hyps, inp_tokens, log_probs, eos_hyps_and_log_probs_scores, *args)
        step = args[-1]
        ending = [b for b, m in enumerate(self.utt_max_steps) if max(m, 1) == step + 1 and m < self.max_decode_steps]
        if ending:
            alived, scores = out[0], out[-1]
            tokens = torch.full((self.n_bh,), -1, dtype=torch.long, device=self.device)
            for b in ending:
                tokens[b * self.beam_size : (b + 1) * self.beam_size] = self.eos_index
            self._update_hyps_and_scores_if_eos_token(tokens, alived, out[3], scores)
        return out


# ------------------------------------------------------------------------------------------------
# CTC prefix scoring without Python loops over the rows
# ------------------------------------------------------------------------------------------------


class PrefixScore(CTCPrefixScore):
    """SpeechBrain's ``CTCPrefixScore`` with its per-row Python loops replaced by indexing: the same
    numbers (tested), the same states. Its loops cost a few microseconds per row and step, which at
    batch x beam rows dominates a CPU search of short utterances. The inflated posteriors of the
    full scorer (the same every step) are made once."""

    @torch.no_grad()
    def forward_step(self, inp_tokens, states, candidates=None, attn=None):
        n_bh = inp_tokens.size(0)
        beam_size = n_bh // self.batch_size
        last_char = inp_tokens
        self.prefix_length += 1
        self.num_candidates = self.vocab_size if candidates is None else candidates.size(-1)
        rows = torch.arange(n_bh, device=self.device)
        if states is None:
            r_prev = torch.full((self.max_enc_len, 2, self.batch_size, beam_size), self.minus_inf, device=self.device)
            r_prev[:, 1] = torch.cumsum(self.x[0, :, :, self.blank_index], 0).unsqueeze(2)
            r_prev = r_prev.view(-1, 2, n_bh)
            psi_prev = torch.full((n_bh, self.vocab_size), 0.0, device=self.device)
        else:
            r_prev, psi_prev = states

        if candidates is not None:
            cand_offset = self.batch_index * self.vocab_size
            scoring_table = torch.full((n_bh, self.vocab_size), -1, dtype=torch.long, device=self.device)
            scoring_table[rows.unsqueeze(1), candidates] = torch.arange(self.num_candidates, device=self.device)
            scoring_index = (candidates + cand_offset.unsqueeze(1).repeat(1, beam_size).view(-1, 1)).view(-1)
            x_inflate = torch.index_select(
                self.x.view(2, -1, self.batch_size * self.vocab_size), 2, scoring_index
            ).view(2, -1, n_bh, self.num_candidates)
        else:
            scoring_table = None
            if getattr(self, "_x_inflate", None) is None or self._x_inflate.shape[2] != n_bh:
                self._x_inflate = (
                    self.x.unsqueeze(3).repeat(1, 1, 1, beam_size, 1).view(2, -1, n_bh, self.num_candidates)
                )
            x_inflate = self._x_inflate

        r = torch.full((self.max_enc_len, 2, n_bh, self.num_candidates), self.minus_inf, device=self.device)
        if self.prefix_length == 0:
            r[0, 0] = x_inflate[0, 0]
        r_sum = torch.logsumexp(r_prev, 1)
        phi = r_sum.unsqueeze(2).repeat(1, 1, self.num_candidates)
        if candidates is not None:
            pos = scoring_table[rows, last_char]
            hit = pos != -1
            phi[:, rows[hit], pos[hit]] = r_prev[:, 1, rows[hit]]
        else:
            phi[:, rows, last_char] = r_prev[:, 1, :]

        if self.ctc_window_size == 0 or attn is None:
            start = max(1, self.prefix_length)
            end = self.max_enc_len
        else:
            _, attn_peak = torch.max(attn, dim=1)
            max_frame = torch.max(attn_peak).item() + self.ctc_window_size
            min_frame = torch.min(attn_peak).item() - self.ctc_window_size
            start = max(max(1, self.prefix_length), int(min_frame))
            end = min(self.max_enc_len, int(max_frame))

        for t in range(start, end):  # the recursion over frames, as SpeechBrain computes it
            rnb_prev = r[t - 1, 0]
            rb_prev = r[t - 1, 1]
            r_ = torch.stack([rnb_prev, phi[t - 1], rnb_prev, rb_prev]).view(2, 2, n_bh, self.num_candidates)
            r[t] = torch.logsumexp(r_, 1) + x_inflate[:, t]

        psi_init = r[start - 1, 0].unsqueeze(0)
        phix = torch.cat((phi[0].unsqueeze(0), phi[:-1]), dim=0) + x_inflate[0]
        if candidates is not None:
            psi = torch.full((n_bh, self.vocab_size), self.minus_inf, device=self.device)
            psi_ = torch.logsumexp(torch.cat((phix[start:end], psi_init), dim=0), dim=0)
            psi.scatter_(1, candidates, psi_)
        else:
            psi = torch.logsumexp(torch.cat((phix[start:end], psi_init), dim=0), dim=0)
        last_frame = self.last_frame_index.long()[torch.div(rows, beam_size, rounding_mode="floor")]
        psi[rows, self.eos_index] = r_sum[last_frame, rows]
        if self.eos_index != self.blank_index:
            psi[:, self.blank_index] = self.minus_inf
        return psi - psi_prev, (r, psi, scoring_table)


class CTCScorer(sb_scorer.CTCScorer):
    """SpeechBrain's ``CTCScorer`` on ``PrefixScore``. (The class keeps SpeechBrain's name:
    ``ScorerBuilder`` and the beam searcher find the CTC scorer by its class name.)"""

    def reset_mem(self, x, enc_lens):
        logits = self.ctc_fc(x)
        x = self.softmax(logits.float())
        self.ctc_score = PrefixScore(x, enc_lens, self.blank_index, self.eos_index, self.ctc_window_size)


def build_searcher(search, decoder, settings, bos, eos, lm=None, ctc_scoring="full", scorer_beam_scale=2.0):
    """SpeechBrain's searcher for ``search`` ("greedy" or "beam") around ``decoder``; the beam
    search with the CTC prefix scorer (``ctc_scoring``: full, or partial over the
    ``scorer_beam_scale`` x beam best candidates) and, when ``lm`` is given, the TransformerLM."""
    common = dict(
        bos_index=bos,
        eos_index=eos,
        min_decode_ratio=settings["min_decode_ratio"],
        max_decode_ratio=settings["max_decode_ratio"],
    )
    output = OutputIdentity(decoder.vocab_size)
    if search == "greedy":
        return GreedySearcher(modules=[decoder, output], **common)
    if search != "beam":
        raise ValueError(f"search must be greedy or beam, not {search!r}")
    if ctc_scoring not in CTC_SCORING:
        raise ValueError(f"ctc_scoring must be one of {CTC_SCORING}, not {ctc_scoring!r}")
    # In the SA yaml's order (LM, then CTC): ScorerBuilder adds the weighted scores in place in
    # this order, and another order rounds differently (near-ties could then break otherwise).
    full, partial, weights = [], [], {}
    if lm is not None and settings["lm_weight"] > 0:
        full.append(TransformerLMScorer(language_model=lm, temperature=settings["lm_temperature"]))
        weights["transformerlm"] = settings["lm_weight"]
    if settings["ctc_weight"] > 0:
        ctc = CTCScorer(ctc_fc=StreamCTC(decoder), blank_index=settings["blank_index"], eos_index=eos)
        (full if ctc_scoring == "full" else partial).append(ctc)
        weights["ctc"] = settings["ctc_weight"]
    scorer = None
    if full or partial:
        scorer = sb_scorer.ScorerBuilder(
            full_scorers=full, partial_scorers=partial, weights=weights, scorer_beam_scale=scorer_beam_scale
        )
    return BeamSearcher(
        modules=[decoder, output],
        beam_size=settings["beam_size"],
        temperature=settings["temperature"],
        using_eos_threshold=settings["using_eos_threshold"],
        length_normalization=settings["length_normalization"],
        scorer=scorer,
        **common,
    )


def describe(search, settings, lm, ctc_scoring="full", scorer_beam_scale=2.0, ctc_source=None):
    """How a free-running figure was decoded, in words (test_results.json, the tables)."""
    if search == "greedy":
        return "free-running greedy (SpeechBrain S2STransformerGreedySearcher, the student in the loop)"
    parts = [f"beam {settings['beam_size']}", f"temperature {settings['temperature']}"]
    if settings["ctc_weight"] > 0:
        ctc = f"CTC {settings['ctc_weight']}"
        if ctc_scoring == "partial":
            ctc += f" (partial: the {scorer_beam_scale:g} x beam best candidates)"
        if ctc_source:
            ctc += f" from {ctc_source}"
        parts.append(ctc)
    if lm is not None and settings["lm_weight"] > 0:
        parts.append(f"TransformerLM {settings['lm_weight']} (temperature {settings['lm_temperature']})")
    else:
        parts.append("no LM")
    return (
        "free-running joint CTC/attention beam search (SpeechBrain S2STransformerBeamSearcher; "
        + ", ".join(parts)
        + ", the student in the loop)"
    )


# ------------------------------------------------------------------------------------------------
# Memory of a search, batches, and decoding a list of utterances
# ------------------------------------------------------------------------------------------------

FLOAT = 4  # bytes: the searches run in float32 (the CTC scorer and the student always do)
# tqdm's bar with the rate always in utterances per second (tqdm turns a slow one into s/utt)
PROGRESS = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"


def search_memory(search, decoder, settings, frames, ctc_scoring="full", scorer_beam_scale=2.0):
    """Bytes one utterance of ``frames`` encoder frames needs in a search by ``decoder``
    (``StreamDecoder``), by part: {"encoder states", "CTC prefix scorer", "decoder streams"}.

    The CTC prefix scorer holds, per step, about eight tensors of [T, rows, C] floats (its
    inflated posteriors, the forward variables r and their previous values, phi, and their
    shifted sum; rows = beam, C = the vocabulary with full scoring, scorer_beam_scale x beam
    with partial scoring). The decoder streams are [rows, S, t, V] logits and the student's copies
    of them (about four in all), t = 1 for a student that reads the last position only, else the
    longest prefix the search allows (T x max_decode_ratio: the worst case, hypotheses that never
    end). The models' weights and the language model's activations are not included."""
    rows = settings["beam_size"] if search == "beam" else 1
    vocab = decoder.vocab_size
    t = max(1, int(frames * settings["max_decode_ratio"])) if decoder.reads_prefix else 1
    parts = {
        "encoder states": rows * frames * sum(decoder.d_model) * FLOAT,
        "decoder streams": 4 * rows * len(decoder.models) * t * vocab * FLOAT,
        "CTC prefix scorer": 0,
    }
    if search == "beam" and settings["ctc_weight"] > 0:
        width = vocab if ctc_scoring == "full" else min(vocab, max(1, int(rows * scorer_beam_scale)))
        parts["CTC prefix scorer"] = (8 * frames * rows * width + 2 * frames * vocab + 4 * rows * vocab) * FLOAT
    return parts


def plan_batches(utts, frames, batch_size, per_utterance=None, budget=None):
    """Batches of utterances of similar length (sorted by ``frames`` {utterance id: encoder
    frames}, ties in their order), at most ``batch_size`` each and, with ``per_utterance``
    (frames -> bytes) and ``budget`` (bytes), at most what fits the budget (at least one)."""
    order = sorted(range(len(utts)), key=lambda i: (frames[utts[i].id], i))
    batches, current = [], []
    for i in order:
        utt = utts[i]
        fits = len(current) < batch_size
        if fits and budget is not None and per_utterance is not None and current:
            fits = (len(current) + 1) * per_utterance(frames[utt.id]) <= budget
        if not fits:
            batches.append(current)
            current = []
        current.append(utt)
    if current:
        batches.append(current)
    return batches


def encoder_frames(samples, hop=160, subsampling=4):
    """The SA front end's encoder frames for ``samples`` of 16 kHz audio (10 ms Fbank hop, two
    stride-2 CNN blocks), for planning batches only: the search reads the real ones."""
    feats = samples // hop + 1
    for _ in range(int(math.log2(subsampling))):
        feats = (feats + 1) // 2
    return feats


def autocast(device, precision):
    """The autocast context of a search (bf16 or fp16), or a null context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def decode_batch(utts, models, searchers, systems, precision="fp32"):
    """Hypotheses (token id lists, in ``utts`` order) of every searcher on one batch of utterances:
    ``searchers`` {(key, system name): searcher}, ``systems`` {name: StreamDecoder}. The models'
    encoders run once for the batch (``SAModel.encode_batch``); returns {key: {system: [ids, ...]}}."""
    from local.sa_models import read_wav

    first = next(iter(models.values()))
    wavs = [read_wav(utt, first) for utt in utts]
    encoded, frames = {}, None
    for name, model in models.items():
        encoded[name], model_frames = model.encode_batch(wavs)
        if frames is not None and not torch.equal(frames, model_frames):
            where = ", ".join(f"{u.id}" for u, a, b in zip(utts, frames, model_frames) if a != b)
            raise ValueError(
                f"utterance(s) {where}: the models give different numbers of encoder frames on the same "
                f"audio: their front ends differ, so their decoders cannot share one search"
            )
        frames = model_frames
    device = first.device
    wav_lens = (frames.double() / frames.max()).to(device)
    out = {}
    for (key, name), searcher in searchers.items():
        enc = systems[name].encodings(encoded)
        with autocast(device, precision):
            hyps = searcher(enc, wav_lens)[0]
        out.setdefault(key, {})[name] = [[int(t) for t in h] for h in hyps]
    return out


def single_model_systems(models):
    """{name: StreamDecoder}: each SA model alone, with SpeechBrain's search of it (no student)."""
    return {name: StreamDecoder([model], StreamIdentity()) for name, model in models.items()}


def decode_utterances(
    utts,
    systems,
    searches=("beam",),
    settings=None,
    lm=None,
    batch_size=16,
    ctc_scoring="full",
    scorer_beam_scale=2.0,
    max_memory=None,
    precision="fp32",
    progress=True,
):
    """Decodes ``utts`` (``sa_models.Utterance``) with every system of ``systems`` ({name:
    StreamDecoder}) and every search of ``searches``: {search: {system: {utterance id: token ids}}}.

    The reusable core of decode.py (a corpus build decodes with it: ``single_model_systems`` for
    plain decodes of single SA models, ``write_wer_file`` for SpeechBrain ``wer_*.txt`` files).
    ``settings``: ``search_settings`` of an SA hparams file (SA_TEST_SEARCH by default);
    ``max_memory``: bytes a batch's search may use (``search_memory``), None for no limit."""
    from tqdm import tqdm

    from local.sa_models import check_audio

    settings = dict(settings or SA_TEST_SEARCH)
    models = {}
    for decoder in systems.values():
        models.update({m.name: m for m in decoder.layout})
    first = next(iter(models.values()))
    samples = check_audio(utts, first.sample_rate)
    frames = {u: encoder_frames(n) for u, n in samples.items()}
    searchers = {
        (search, name): build_searcher(search, decoder, settings, 1, EOS, lm, ctc_scoring, scorer_beam_scale)
        for search in searches
        for name, decoder in systems.items()
    }

    def per_utterance(n):
        return max(
            sum(search_memory(s, d, settings, n, ctc_scoring, scorer_beam_scale).values())
            for s in searches
            for d in systems.values()
        )

    batches = plan_batches(utts, frames, batch_size, per_utterance, max_memory)
    out = {search: {name: {} for name in systems} for search in searches}
    bar = tqdm(total=len(utts), unit="utt", disable=not progress, dynamic_ncols=True, bar_format=PROGRESS)
    for batch in batches:
        hyps = decode_batch(batch, models, searchers, systems, precision)
        for search, by_system in hyps.items():
            for name, lists in by_system.items():
                out[search][name].update({u.id: h for u, h in zip(batch, lists)})
        bar.update(len(batch))
    bar.close()
    return out


def write_wer_file(path, utts, hyps, tokenizer):
    """A SpeechBrain ``wer_*.txt`` (ErrorRateStats' format, the SA pipeline's scoring) of one
    system's hypotheses ``hyps`` {utterance id: token ids} on ``utts``; returns its summary."""
    from local.corpus import parse_utterance_id, word_category
    from local.scoring import SystemScores

    scores = SystemScores(tokenizer)
    for utt in utts:
        parts = parse_utterance_id(utt.id)
        scores.append_ids([utt.id], [hyps[utt.id]], [utt.word], [word_category(parts["word"])], [parts["mic"]])
    scores.write_stats(path)
    return scores.summary()
