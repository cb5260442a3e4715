"""Free-running decoding of the held-out speaker's audio with the trained student in the loop.

The fold's test-stream SA models (``matched`` / ``self``: the held-out speaker's own model;
``cross``: the teachers' models) encode the audio once; then, at each step of the search, each
model's decoder reads the hypothesis prefix, the student (causal: its output at a position sees
only the positions before it) fuses their step logits, and SpeechBrain's own searcher extends
the hypotheses. The searchers are SpeechBrain's ``S2STransformerGreedySearcher`` and
``S2STransformerBeamSearcher``, unchanged: ``StreamDecoder`` stands where their ``TransformerASR``
stands (it has its ``decode(memory, enc_states, enc_lens)``) and the output layer is the identity
(the student's output is already over the vocabulary). The encoder states of the S models are
concatenated on the feature axis (same audio, same front end: the same frames), so that the
searcher's batch and beam bookkeeping carries them unchanged; ``StreamCTC`` gives the CTC scorer
the frame-mean of the models' CTC posteriors.

With one stream and a student that returns its stream (or the ``mean`` fusion), these searches are
SpeechBrain's searches of that SA model, token for token (tested).
"""

import math
from types import SimpleNamespace

import torch
from torch import nn

from local.corpus import SPEAKERS

EOS = 2  # </s> of the SA models

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


class StreamDecoder(nn.Module):
    """``decode(memory, enc_states, enc_lens)`` of S SA models' decoders fused by the student.

    ``models``: objects with ``modules["Transformer"]`` and ``modules["seq_lin"]`` (``SAModel``);
    ``enc_states`` [N, T, S * D]; returns the student's output at every prefix position [N, t, V]
    (the searcher reads the last one) and the first model's cross-attention."""

    def __init__(self, models, student):
        super().__init__()
        self.models = list(models)
        self.student = student
        self.d_model = [int(m.modules["seq_lin"].w.in_features) for m in self.models]
        identity = {m: i for i, m in enumerate(SPEAKERS)}
        # as the store gives them: the model's index in SPEAKERS, unknown models share one
        self.stream_ids = torch.tensor([identity.get(m.name, len(SPEAKERS)) for m in self.models])

    def split(self, enc_states):
        return torch.split(enc_states, self.d_model, dim=-1)

    def stream_logits(self, memory, enc_states, enc_lens):
        """[N, S, t, V]: each model's decoder logits on the prefix ``memory`` [N, t]."""
        logits, attn = [], None
        for model, enc in zip(self.models, self.split(enc_states)):
            pred, a = model.modules["Transformer"].decode(memory, enc, enc_lens)
            attn = a if attn is None else attn
            logits.append(model.modules["seq_lin"](pred))
        return torch.stack(logits, 1), attn

    def max_positions(self):
        """Prefix positions the student can read (its position table), or None."""
        position = getattr(getattr(self.student, "fusion", None), "position", None)
        return position.num_embeddings if isinstance(position, nn.Embedding) else None

    def decode(self, memory, enc_states, enc_lens=None):
        limit = self.max_positions()
        if limit is not None and memory.shape[1] > limit:
            # Only a hypothesis that no model ends runs this long (UASpeech words are a few
            # pieces); past the student's position table it is ended with </s>.
            memory = memory[:, -limit:]
            out, attn = self.decode(memory, enc_states, enc_lens)
            ended = torch.full_like(out[:, -1:], float("-inf"))
            ended[..., EOS] = 0.0
            return torch.cat([out[:, :-1], ended], 1), attn
        streams, attn = self.stream_logits(memory, enc_states, enc_lens)
        n, s = streams.shape[:2]
        mask = torch.ones(n, s, dtype=torch.bool, device=streams.device)
        ids = self.stream_ids.to(streams.device).expand(n, s)
        return self.student(streams.float(), mask, ids), attn


class StreamCTC(nn.Module):
    """The CTC scorer's ``ctc_fc``: log of the frame-by-frame mean of the S models' CTC posteriors
    (the scorer's log-softmax leaves a normalised log-distribution as it is)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, enc_states):
        logp = [
            torch.log_softmax(m.modules["ctc_lin"](enc).float(), -1)
            for m, enc in zip(self.decoder.models, self.decoder.split(enc_states))
        ]
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
    """Raises ValueError unless the encoder outputs ``encodings`` ({model: [1, T, D]}) have one T:
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


def build_searcher(search, decoder, settings, bos, eos, lm=None):
    """SpeechBrain's searcher for ``search`` ("greedy" or "beam") around ``decoder``; the beam
    search with the CTC prefix scorer and, when ``lm`` is given, the TransformerLM."""
    from speechbrain.decoders import S2STransformerBeamSearcher, S2STransformerGreedySearcher
    from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder, TransformerLMScorer

    common = dict(
        bos_index=bos,
        eos_index=eos,
        min_decode_ratio=settings["min_decode_ratio"],
        max_decode_ratio=settings["max_decode_ratio"],
    )
    if search == "greedy":
        return S2STransformerGreedySearcher(modules=[decoder, OutputIdentity(decoder.models[0].vocab_size)], **common)
    if search != "beam":
        raise ValueError(f"search must be greedy or beam, not {search!r}")
    # In the SA yaml's order (LM, then CTC): ScorerBuilder adds the weighted scores in place in
    # this order, and another order rounds differently (near-ties could then break otherwise).
    scorers, weights = [], {}
    if lm is not None and settings["lm_weight"] > 0:
        scorers.append(TransformerLMScorer(language_model=lm, temperature=settings["lm_temperature"]))
        weights["transformerlm"] = settings["lm_weight"]
    if settings["ctc_weight"] > 0:
        scorers.append(CTCScorer(ctc_fc=StreamCTC(decoder), blank_index=settings["blank_index"], eos_index=eos))
        weights["ctc"] = settings["ctc_weight"]
    scorer = ScorerBuilder(full_scorers=scorers, weights=weights) if scorers else None
    return S2STransformerBeamSearcher(
        modules=[decoder, OutputIdentity(decoder.models[0].vocab_size)],
        beam_size=settings["beam_size"],
        temperature=settings["temperature"],
        using_eos_threshold=settings["using_eos_threshold"],
        length_normalization=settings["length_normalization"],
        scorer=scorer,
        **common,
    )


def describe(search, settings, lm):
    """How a free-running figure was decoded, in words (test_results.json, the tables)."""
    if search == "greedy":
        return "free-running greedy (SpeechBrain S2STransformerGreedySearcher, the student in the loop)"
    parts = [f"beam {settings['beam_size']}", f"temperature {settings['temperature']}"]
    if settings["ctc_weight"] > 0:
        parts.append(f"CTC {settings['ctc_weight']}")
    if lm is not None and settings["lm_weight"] > 0:
        parts.append(f"TransformerLM {settings['lm_weight']} (temperature {settings['lm_temperature']})")
    else:
        parts.append("no LM")
    return (
        "free-running joint CTC/attention beam search (SpeechBrain S2STransformerBeamSearcher; "
        + ", ".join(parts)
        + ", the student in the loop)"
    )
