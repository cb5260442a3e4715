"""The SA decoders and the TransformerLM on the new position only, at each step of a search.

SpeechBrain's searchers call ``TransformerASR.decode`` and the ``TransformerLM`` on the whole
hypothesis prefix at every step, and read the last position only. Both are causal (a position sees
only itself and the positions before it), so the outputs at the earlier positions are those of the
previous step: here each layer keeps the inputs its self-attention read at the earlier positions
(``PrefixKeys``), and a step runs the layers on the new position only, its self-attention reading
the kept positions and the new one. The arithmetic of every module is SpeechBrain's (its layers,
norms and attention are called as they are); a beam search reorders the kept rows as it reorders
its hypotheses (``permute``). Tested: the logits and log-probabilities equal those of the whole
prefix, step after step, with beams reordered; the searches equal SpeechBrain's own.

Used where SpeechBrain's modules are the ones this was written against (a ``TransformerASR`` with
absolute sinusoidal positions in its decoder, a ``TransformerLM`` without decoder layers, both with
SpeechBrain's ``MultiheadAttention``); anything else is computed on the whole prefix, as before.
"""

import torch
from speechbrain.dataio.dataio import length_to_mask
from speechbrain.lobes.models.transformer.Transformer import PositionalEncoding
from speechbrain.nnet.attention import MultiheadAttention
from torch import nn


class PrefixKeys(nn.Module):
    """Stands in for a layer's self-attention during a search: the layer runs on the new position
    only (``query`` [N, 1, d]); the attention reads the kept inputs of the earlier positions and the
    new one as its keys and values (``keys``, [N, t, d] after the step)."""

    def __init__(self, attention, keys=None):
        super().__init__()
        self.attention, self.keys = attention, keys

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, return_attn_weights=True, **kw):
        self.keys = query if self.keys is None else torch.cat([self.keys, query], 1)
        return self.attention(
            query, self.keys, self.keys, key_padding_mask=key_padding_mask, return_attn_weights=return_attn_weights
        )


def _positions(module):
    return isinstance(module, PositionalEncoding) and hasattr(module, "pe")


def decoder_supported(transformer):
    """Whether ``transformer`` (a TransformerASR) can be run on the new position only."""
    decoder = getattr(transformer, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(isinstance(getattr(layer, "self_attn", None), MultiheadAttention) for layer in layers):
        return False
    if transformer.attention_type == "RelPosMHAXL":
        return _positions(getattr(transformer, "positional_encoding_decoder", None))
    return transformer.attention_type == "regularMHA" and _positions(getattr(transformer, "positional_encoding", None))


class LastPositionDecoder:
    """``TransformerASR.decode`` of one SA model on the new position of the prefix only (see the
    module docstring); ``__call__(tokens, encoder_out, enc_len)`` -> ([N, 1, d], cross-attention)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.layers = list(transformer.decoder.layers)
        self.keys = [None] * len(self.layers)
        self.length = 0

    def __call__(self, tokens, encoder_out, enc_len=None):
        t = tokens.shape[1]
        if t != self.length + 1:
            raise RuntimeError(f"incremental decoding: a prefix of {t} after {self.length} positions")
        model = self.transformer
        tgt = model.custom_tgt_module(tokens[:, -1:])
        positions = (
            model.positional_encoding_decoder if model.attention_type == "RelPosMHAXL" else model.positional_encoding
        )
        tgt = tgt + positions.pe[:, t - 1 : t].clone().detach()
        padding = None if enc_len is None else (1 - length_to_mask(enc_len)).bool()
        swapped = [layer.self_attn for layer in self.layers]
        for layer, attention, keys in zip(self.layers, swapped, self.keys):
            layer.self_attn = PrefixKeys(attention, keys)
        try:
            prediction, _, cross = model.decoder(tgt, encoder_out, tgt_mask=None, memory_key_padding_mask=padding)
        finally:
            self.keys = [layer.self_attn.keys for layer in self.layers]
            for layer, attention in zip(self.layers, swapped):
                layer.self_attn = attention
        self.length = t
        return prediction, cross[-1]

    def permute(self, index):
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]


def lm_supported(lm):
    """Whether ``lm`` (a TransformerLM) can be run on the new position only."""
    layers = getattr(getattr(lm, "encoder", None), "layers", None)
    return (
        getattr(lm, "num_decoder_layers", 1) == 0
        and layers is not None
        and all(isinstance(getattr(layer, "self_att", None), MultiheadAttention) for layer in layers)
        and _positions(getattr(lm, "positional_encoding", None))
    )


def lm_last_position(lm, tokens, keys):
    """The TransformerLM's output layers' input at the last position of ``tokens`` [N, t] (its
    ``forward`` up to ``output_proj``, on the new position only) and the layers' kept keys."""
    t = tokens.shape[1]
    _, padding = lm.make_masks(tokens)
    src = lm.custom_src_module(tokens[:, -1:])
    if lm.embedding_proj is not None:
        src = lm.embedding_proj(src)
    src = src + lm.positional_encoding.pe[:, t - 1 : t].clone().detach()
    layers = list(lm.encoder.layers)
    swapped = [layer.self_att for layer in layers]
    for layer, attention, kept in zip(layers, swapped, keys or [None] * len(layers)):
        layer.self_att = PrefixKeys(attention, kept)
    try:
        out, _ = lm.encoder(src=src, src_mask=None, src_key_padding_mask=padding)
    finally:
        keys = [layer.self_att.keys for layer in layers]
        for layer, attention in zip(layers, swapped):
            layer.self_att = attention
    return out, keys
