"""Listening proxies for the rehearsal corpus: numbers that stand in for a listener (or an ASR
model) when checking that the simulated dysarthria degrades speech as intended.

- ``durations_and_levels``: duration and active level of each recording, by speaker;
- ``template_distance``: the dynamic-time-warping distance (log-mel features with per-utterance
  mean removal, length-normalised) between a recording and the clean synthesized word: how far the
  simulations moved the word from what the voice says without them;
- ``template_accuracy``: a speaker-dependent template recognizer (nearest clean word by that
  distance), the crudest ASR there is: its accuracy should fall as the severity rises.

None of them is an ASR model's accuracy: the real figures come from the SA models trained on the
corpus.
"""

import numpy as np

from local.dysarthria import active_rms


def mel_filterbank(rate, n_fft, n_mels, fmin=60.0, fmax=None):
    fmax = fmax or rate / 2

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    bank = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, mid, hi = edges[i : i + 3]
        bank[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0.0, None)
    return bank


def log_mel(x, rate, n_mels=24, frame_s=0.025, hop_s=0.01, trim_db=-25.0, floor_db=-30.0):
    """Log-mel frames of ``x`` from its first to its last frame louder than ``trim_db`` below the
    loudest (the padding does not count), floored at ``floor_db`` below the loudest band value (a
    noise floor: digital silence and a microphone's noise look alike), each band's mean over the
    utterance removed."""
    frame, hop = int(rate * frame_s), int(rate * hop_s)
    n_fft = 1 << (frame - 1).bit_length()
    if len(x) < frame:
        x = np.concatenate([x, np.zeros(frame - len(x))])
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop] * np.hamming(frame)
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2
    mel = power @ mel_filterbank(rate, n_fft, n_mels).T
    feats = np.log(np.maximum(mel, mel.max() * 10.0 ** (floor_db / 10.0)) + 1e-20)
    energy = np.log(np.sum(power, axis=1) + 1e-10)
    keep = energy >= energy.max() + trim_db / 10.0 * np.log(10.0)
    first, last = np.flatnonzero(keep)[[0, -1]]
    feats = feats[first : last + 1]
    return feats - feats.mean(axis=0)


def dtw_distance(a, b):
    """Dynamic time warping between two feature sequences (Euclidean frame distance, steps
    (1,0), (0,1), (1,1)), divided by the sum of their lengths. Computed along anti-diagonals, so
    each step is one vectorized numpy operation."""
    cost = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for k in range(2, n + m + 1):  # cells (i, j), 1-based, with i + j = k
        i = np.arange(max(1, k - m), min(n, k - 1) + 1)
        j = k - i
        best = np.minimum(np.minimum(acc[i - 1, j], acc[i, j - 1]), acc[i - 1, j - 1])
        acc[i, j] = cost[i - 1, j - 1] + best
    return float(acc[n, m] / (n + m))


def template_distance(recording, clean, rate):
    return dtw_distance(log_mel(recording, rate), log_mel(clean, rate))


def template_accuracy(recordings, templates, rate):
    """Share of ``recordings`` ({id: (word, signal)}) whose nearest template ({word: clean signal})
    by ``template_distance`` is their own word; and the per-recording nearest words."""
    feats = {word: log_mel(x, rate) for word, x in templates.items()}
    chosen = {}
    for utt_id, (_, x) in recordings.items():
        f = log_mel(x, rate)
        chosen[utt_id] = min(feats, key=lambda w: dtw_distance(f, feats[w]))
    right = sum(chosen[u] == recordings[u][0] for u in recordings)
    return right / max(1, len(recordings)), chosen


def durations_and_levels(signals, rate):
    """(mean duration in s, mean active level in dBFS) of a list of signals."""
    durations = [len(x) / rate for x in signals]
    levels = [20.0 * np.log10(active_rms(x, rate)) for x in signals]
    return float(np.mean(durations)), float(np.mean(levels))
