"""Simulated dysarthria and simulated microphones: the signal processing of the rehearsal corpus.

Everything here is numpy/scipy on float64 signals at one sample rate (16 kHz in the corpus), and
every random draw comes from a ``numpy.random.Generator`` the caller seeds, so a production is the
same bytes whoever computes it and in whatever order.

A *production* is one spoken word of one speaker: the synthesizer's clean word, changed by the
speaker's dysarthria simulations (``simulate``). Its *microphones* are channels applied to that
same production (``microphone``): the recordings of one production are correlated, as UASpeech's
array microphones recorded one utterance at once.

The simulations and where they come from (rehearsal.md has the references):

- ``tempo``: slower, irregular speaking rate, by time stretching (WSOLA, which keeps the pitch);
  slow rate is the most common dysarthric trait, and tempo change of healthy speech is the
  augmentation of Vachhani et al. (2018);
- ``vocal tract``: all frequencies (pitch and formants) scaled by one factor, as a shorter or
  longer vocal tract would (the warp of vocal tract length perturbation), the duration kept;
- ``jitter`` / ``shimmer``: cycle-scale random perturbation of the pitch period (a fast random
  time warp) and of the amplitude, raised in dysarthric voices;
- ``repeats``: the word's onset said again before the word (repeated onsets);
- ``pauses``: a silence inserted inside the word (Soleymanpour et al. 2022 insert pauses);
- ``breakdown``: short stretches of the word blurred to a low-passed murmur (irregular
  articulatory breakdown, imprecise consonants);
- ``breathiness``: aspiration noise that follows the speech envelope;
- ``smearing`` / ``lowpass``: the short-time magnitude spectrum smoothed across frequency and
  time (spectral smearing, after Baer and Moore 1993), then the band cut (blurred articulation).
"""

import functools

import numpy as np
from scipy import fft, ndimage, signal

# ----------------------------------------------------------------------------- helpers


def db_to_amplitude(db):
    return 10.0 ** (db / 20.0)


def active_rms(x, rate, frame_s=0.02, floor_db=-40.0):
    """RMS over the frames within ``floor_db`` of the loudest frame: the level of the speech, not
    of the silences around it (the reference of every level and signal-to-noise ratio here)."""
    n = max(1, int(rate * frame_s))
    frames = len(x) // n
    if frames == 0:
        return float(np.sqrt(np.mean(x**2)) + 1e-12)
    energy = np.mean(x[: frames * n].reshape(frames, n) ** 2, axis=1)
    keep = energy >= energy.max() * 10.0 ** (floor_db / 10.0)
    return float(np.sqrt(np.mean(energy[keep])) + 1e-12)


def set_level(x, rate, level_dbfs):
    """``x`` scaled so that its active RMS is ``level_dbfs`` (dB re full scale)."""
    return x * (db_to_amplitude(level_dbfs) / active_rms(x, rate))


def trim_silence(x, rate, floor_db=-45.0, margin_s=0.02):
    """The span of ``x`` louder than ``floor_db`` below its peak frame, with a small margin: the
    synthesizers pad their words with different silences, the corpus adds its own."""
    n = max(1, int(rate * 0.01))
    frames = len(x) // n
    if frames == 0:
        return x
    energy = np.mean(x[: frames * n].reshape(frames, n) ** 2, axis=1)
    loud = np.flatnonzero(energy >= energy.max() * 10.0 ** (floor_db / 10.0))
    if loud.size == 0:
        return x
    margin = int(rate * margin_s)
    return x[max(0, loud[0] * n - margin) : min(len(x), (loud[-1] + 1) * n + margin)]


@functools.lru_cache(maxsize=256)
def butter(order, cutoff, rate, btype="lowpass"):
    """A Butterworth filter (second-order sections), designed once per setting: the design costs
    more than filtering a word."""
    return signal.butter(order, cutoff, btype=btype, fs=rate, output="sos")


def smooth_noise(rng, length, rate, cutoff_hz):
    """Gaussian noise low-passed at ``cutoff_hz``, unit standard deviation."""
    noise = signal.sosfiltfilt(butter(2, min(float(cutoff_hz), 0.45 * rate), rate), rng.standard_normal(length))
    return noise / (np.std(noise) + 1e-12)


def lowpass(x, rate, cutoff_hz, order=6):
    if cutoff_hz >= 0.49 * rate:
        return x
    return signal.sosfiltfilt(butter(order, float(cutoff_hz), rate), x)


def resample_to(x, length):
    """``x`` resampled to ``length`` samples (band-limited, by FFT)."""
    if length == len(x):
        return x
    return signal.resample(x, length)


def crossfade_join(parts, rate, fade_s=0.005):
    """Concatenates signals with short fades at every join (no clicks)."""
    fade = max(1, int(rate * fade_s))
    out = []
    for part in parts:
        part = np.array(part, dtype=np.float64)
        if len(part) > 2 * fade:
            ramp = np.linspace(0.0, 1.0, fade)
            part[:fade] *= ramp
            part[-fade:] *= ramp[::-1]
        out.append(part)
    return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------- time stretching


def wsola(x, stretch, frame=512, tolerance=160):
    """Waveform-similarity overlap-add (Verhelst and Roelands 1993): ``x`` made ``stretch`` times
    longer, the pitch kept. ``stretch`` is a number or an array giving the factor along the input
    (one value per input sample), for a rate that changes within the word."""
    hop = frame // 2
    window = np.hanning(frame + 1)[:frame]  # periodic Hann: overlaps at half a frame sum to one
    stretch = np.broadcast_to(np.asarray(stretch, dtype=np.float64), (len(x),))
    pad = np.concatenate([np.zeros(frame + tolerance), x, np.zeros(2 * frame + tolerance)])
    offset = frame + tolerance  # index in ``pad`` of x[0]
    positions = []
    pos = 0.0  # nominal input position (in x) of the next output frame
    while pos < len(x):
        positions.append(pos)
        pos += hop / stretch[min(int(pos), len(x) - 1)]
    out = np.zeros((len(positions) + 1) * hop + frame)
    prev = None  # where, in pad, the previous frame was copied from
    for k, nominal in enumerate(positions):
        start = offset + int(round(nominal)) - hop
        if prev is not None:
            # the segment that best continues the previous one, near the nominal position
            target = pad[prev + hop : prev + hop + frame]
            region = pad[start - tolerance : start + tolerance + frame]
            score = np.correlate(region, target, mode="valid")
            start = start - tolerance + int(np.argmax(score))
        out[k * hop : k * hop + frame] += window * pad[start : start + frame]
        prev = start
    total = int(round(float(np.sum(stretch))))  # the stretched length: sum of per-sample factors
    return out[hop : hop + total]


# ----------------------------------------------------------------------------- simulations


def vocal_tract_and_tempo(x, rate, vtl, stretch):
    """All frequencies scaled by ``vtl`` (a shorter vocal tract: > 1) and the duration multiplied
    by ``stretch`` (number or per-sample array over ``x``): resample by ``vtl`` (frequencies up,
    duration down), then WSOLA back to the wanted length."""
    shifted = resample_to(x, max(16, int(round(len(x) / vtl))))
    stretch = np.asarray(stretch, dtype=np.float64)
    if stretch.ndim:
        stretch = np.interp(np.linspace(0, len(stretch) - 1, len(shifted)), np.arange(len(stretch)), stretch)
    return wsola(shifted, stretch * vtl)


def jitter_shimmer(x, rate, jitter, shimmer, rng, band_hz=60.0):
    """A fast random time warp (instantaneous frequency times 1 + jitter * n(t)) and amplitude
    modulation (1 + shimmer * m(t)), with n, m unit-variance noise band-limited to ``band_hz``."""
    if jitter > 0:
        warp = 1.0 + jitter * smooth_noise(rng, len(x), rate, band_hz)
        where = np.cumsum(warp) - warp[0]
        where *= (len(x) - 1) / where[-1]  # same length: only the fine timing moves
        x = np.interp(where, np.arange(len(x)), x)
    if shimmer > 0:
        x = x * np.clip(1.0 + shimmer * smooth_noise(rng, len(x), rate, band_hz), 0.0, None)
    return x


def smear(x, rate, freq_hz, time_s, frame=512, hop=128):
    """Spectral smearing: the STFT magnitude smoothed by a Gaussian of ``freq_hz`` across frequency
    and ``time_s`` across time, the phase kept, resynthesized by overlap-add."""
    if freq_hz <= 0 and time_s <= 0:
        return x
    window = np.hanning(frame + 1)[:frame]
    pad = np.concatenate([np.zeros(frame), x, np.zeros(frame)])
    count = 1 + (len(pad) - frame) // hop
    frames = np.lib.stride_tricks.sliding_window_view(pad, frame)[::hop][:count] * window
    spec = np.fft.rfft(frames, axis=1)
    magnitude = np.abs(spec)
    sigma = (time_s * rate / hop, freq_hz * frame / rate)
    smoothed = ndimage.gaussian_filter(magnitude, sigma=sigma, mode="nearest")
    frames = np.fft.irfft(smoothed * np.exp(1j * np.angle(spec)), n=frame, axis=1) * window
    out = np.zeros(len(pad))
    norm = np.zeros(len(pad))
    for k in range(count):
        out[k * hop : k * hop + frame] += frames[k]
        norm[k * hop : k * hop + frame] += window**2
    out = out / np.maximum(norm, 1e-3)
    return out[frame : frame + len(x)]


def breakdown(x, rate, count, length_s, cutoff_hz, rng):
    """``count`` stretches of ``length_s`` (each drawn within +-50 %) inside the word replaced by
    their own low-passed version: a blurred, murmured piece of the word."""
    x = np.array(x)
    murmur = lowpass(x, rate, cutoff_hz, order=4)
    for _ in range(count):
        n = int(rate * length_s * rng.uniform(0.5, 1.5))
        if n <= 0 or n >= len(x):
            continue
        start = int(rng.integers(0, len(x) - n))
        ramp = np.ones(n)
        fade = min(n // 4, int(rate * 0.005)) or 1
        ramp[:fade] = np.linspace(0, 1, fade)
        ramp[-fade:] = np.linspace(1, 0, fade)
        x[start : start + n] = (1 - ramp) * x[start : start + n] + ramp * murmur[start : start + n]
    return x


def breath_noise(x, rate, ratio_db, rng, band=(1000.0, 6000.0)):
    """Aspiration noise: band-passed noise shaped by the speech envelope, ``ratio_db`` below the
    speech (active levels)."""
    sos = butter(4, (float(band[0]), min(float(band[1]), 0.45 * rate)), rate, "bandpass")
    noise = signal.sosfilt(sos, rng.standard_normal(len(x)))
    envelope = signal.sosfiltfilt(butter(2, 30.0, rate), np.abs(x))
    noise = noise * np.clip(envelope, 0.0, None)
    gain = active_rms(x, rate) / (active_rms(noise, rate) + 1e-12) * db_to_amplitude(-ratio_db)
    return x + gain * noise


def repeat_onset(x, rate, repeats, onset_s, gap_s):
    """The first ``onset_s`` of the word said ``repeats`` times before it, each followed by a gap
    of ``gap_s``: ``b- b- brush``."""
    if repeats <= 0:
        return x
    onset = x[: max(1, int(rate * onset_s))]
    gap = np.zeros(int(rate * gap_s))
    return crossfade_join([onset, gap] * repeats + [x], rate)


def insert_pause(x, rate, pause_s, rng, frame_s=0.01):
    """A silence of ``pause_s`` at the quietest 10 ms frame of the middle 20-80 % of the word."""
    n = max(1, int(rate * frame_s))
    frames = len(x) // n
    if frames < 10 or pause_s <= 0:
        return x
    energy = np.mean(x[: frames * n].reshape(frames, n) ** 2, axis=1)
    lo, hi = int(frames * 0.2), max(int(frames * 0.2) + 1, int(frames * 0.8))
    candidates = np.argsort(energy[lo:hi])[:3] + lo  # one of the three quietest: not always the same
    cut = int(candidates[int(rng.integers(0, len(candidates)))]) * n
    return crossfade_join([x[:cut], np.zeros(int(rate * pause_s)), x[cut:]], rate)


# ----------------------------------------------------------------------------- microphones


def room_impulse_response(rate, rt60_s, drr_db, rng, predelay_s=0.002):
    """A simple synthetic room: a direct path, then Gaussian noise decaying by 60 dB in ``rt60_s``
    (an exponential reverberant tail), scaled to a direct-to-reverberant ratio of ``drr_db``."""
    if rt60_s <= 0:
        return np.ones(1)
    n = int(rate * rt60_s)
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)  # ln(1000) = 6.9078: -60 dB at rt60
    tail[: int(rate * predelay_s)] = 0.0
    tail *= db_to_amplitude(-drr_db) / (np.sqrt(np.sum(tail**2)) + 1e-12)
    tail[0] = 1.0
    return tail


def microphone(x, rate, mic, rng):
    """One microphone's recording of the production ``x``: reverberation (synthetic room impulse
    response), band limits, gain, then stationary noise at ``snr_db`` below the speech's active
    level. ``mic`` holds ``rt60``, ``drr_db``, ``band_hz`` [low, high], ``gain_db``, ``snr_db`` and
    ``noise_tilt`` (0 white, 1 pink-like: -3 dB per octave)."""
    level = active_rms(x, rate)
    y = signal.fftconvolve(x, room_impulse_response(rate, mic["rt60"], mic["drr_db"], rng))[: len(x)]
    low, high = mic["band_hz"]
    band = butter(4, (float(low), min(float(high), 0.49 * rate)), rate, "bandpass")
    y = signal.sosfilt(band, y)  # causal, as a microphone
    y = y * (level / active_rms(y, rate))  # the room and the band change the level: restore it
    length = fft.next_fast_len(len(y), real=True)  # a fast FFT size; the noise is cut to the signal
    noise = rng.standard_normal(length)
    if mic["noise_tilt"] > 0:
        spectrum = fft.rfft(noise)
        freqs = np.maximum(fft.rfftfreq(length, 1.0 / rate), 20.0)
        spectrum /= freqs ** (0.5 * mic["noise_tilt"])
        noise = fft.irfft(spectrum, n=length)
    noise = noise[: len(y)]
    noise *= level * db_to_amplitude(-mic["snr_db"]) / (np.sqrt(np.mean(noise**2)) + 1e-12)
    return (y + noise) * db_to_amplitude(mic["gain_db"])


def to_pcm16(x):
    """Float signal in [-1, 1] to 16-bit PCM (clipped, rounded half to even: deterministic)."""
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")


# ----------------------------------------------------------------------------- one production

# The simulations in the order they are applied, each with the knobs it reads (rehearsal.yaml).
SIMULATIONS = {
    "tempo": ("stretch", "production_spread", "irregularity", "irregularity_hz"),
    "vocal_tract": ("production_spread",),
    "jitter": ("amount", "band_hz"),
    "shimmer": ("amount", "band_hz"),
    "breakdown": ("count", "length_s", "cutoff_hz"),
    "breathiness": ("ratio_db",),
    "smearing": ("freq_hz", "time_s"),
    "lowpass": ("cutoff_hz",),
    "repeats": ("probability", "max_repeats", "onset_s", "gap_s"),
    "pauses": ("probability", "seconds"),
}


def at_severity(knob, severity):
    """A knob's value for a severity in [0, 1]: ``{mild: a, severe: b}`` is interpolated linearly
    (a at 0, b at 1); a plain value is the same for every severity."""
    if isinstance(knob, dict):
        return knob["mild"] + (knob["severe"] - knob["mild"]) * severity
    return knob


def speaker_values(simulations, severities):
    """{simulation: {knob: value}} of one speaker, from its severity per simulation."""
    return {
        name: {knob: at_severity(simulations[name][knob], severities[name]) for knob in knobs}
        for name, knobs in SIMULATIONS.items()
    }


def simulate(clean, rate, values, vtl, rngs, level_dbfs, padding_s):
    """One production: the clean synthesized word ``clean`` changed by the speaker's simulation
    ``values`` (``speaker_values``) with the per-production draws of ``rngs`` (a function giving
    a ``numpy.random.Generator`` per simulation name, so that one simulation's draws do not move
    when another is changed), with leading and trailing silence and at the corpus's level."""
    x = set_level(trim_silence(np.asarray(clean, dtype=np.float64), rate), rate, level_dbfs)

    tempo = values["tempo"]
    rng = rngs("tempo")
    stretch = tempo["stretch"] * np.exp(tempo["production_spread"] * rng.standard_normal())
    if tempo["irregularity"] > 0:  # the rate wanders along the word (irregular rate)
        wander = smooth_noise(rng, len(x), rate, tempo["irregularity_hz"])
        stretch = stretch * np.exp(tempo["irregularity"] * wander)
    vtl = vtl * np.exp(values["vocal_tract"]["production_spread"] * rngs("vocal_tract").standard_normal())
    x = vocal_tract_and_tempo(x, rate, vtl, stretch)

    x = jitter_shimmer(x, rate, values["jitter"]["amount"], 0.0, rngs("jitter"), values["jitter"]["band_hz"])
    x = jitter_shimmer(x, rate, 0.0, values["shimmer"]["amount"], rngs("shimmer"), values["shimmer"]["band_hz"])

    b = values["breakdown"]
    rng = rngs("breakdown")
    x = breakdown(x, rate, int(rng.poisson(b["count"])), b["length_s"], b["cutoff_hz"], rng)
    # the breath noise is a source like the voice: the blurring and the band below act on both
    x = breath_noise(x, rate, values["breathiness"]["ratio_db"], rngs("breathiness"))
    x = smear(x, rate, values["smearing"]["freq_hz"], values["smearing"]["time_s"])
    x = lowpass(x, rate, values["lowpass"]["cutoff_hz"])

    r = values["repeats"]
    rng = rngs("repeats")
    if rng.uniform() < r["probability"]:
        repeats = int(rng.integers(1, int(r["max_repeats"]) + 1))
        x = repeat_onset(x, rate, repeats, r["onset_s"] * rng.uniform(0.7, 1.3), r["gap_s"] * rng.uniform(0.5, 1.5))
    p = values["pauses"]
    rng = rngs("pauses")
    if rng.uniform() < p["probability"]:
        x = insert_pause(x, rate, p["seconds"] * rng.uniform(0.5, 1.5), rng)

    rng = rngs("padding")
    lead, trail = (int(rate * rng.uniform(*padding_s)) for _ in range(2))
    x = np.concatenate([np.zeros(lead), x, np.zeros(trail)])
    return set_level(x, rate, level_dbfs)
