"""Prosody and pacing of a clip, in plain numpy: pitch level and variation, voicing, speaking rate.

GRPO on a CER/NLL reward is known to flatten prosody into a monotone (arXiv 2509.18531) and to
speed speech up until words blur; Whisper's reward sees neither. These per-clip figures make both
visible in metrics.jsonl: `f0_std_semitones` falls as the voice goes monotone, `chars_per_s` rises
as it rushes. No dependency beyond numpy (its speed: docs/prosody.md).

    f0, voiced = f0_track(audio)               # [frames] Hz (0 where unvoiced), [frames] bool
    f0_std_semitones(f0, voiced), f0_median_hz(f0, voiced), voiced_frac(voiced)
    chars_per_s(len(text), audio)
    measure(audio, text) -> {"f0_std_semitones", "voiced_frac", "chars_per_s", "f0_median_hz"}
"""

import numpy as np

from reward import normalize_text

SAMPLE_RATE = 16000
SILENCE_DB = -40.0  # frames this far below the clip's loudest frame are silence
# Mean square (-100 dBFS): below it a frame is digital silence, whatever the peak
FLOOR_POWER = 1e-10


def f0_track(
    audio: np.ndarray,
    *,
    hop_s: float = 0.01,
    fmin: float = 50.0,
    fmax: float = 500.0,
    threshold: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """YIN fundamental frequency (de Cheveigné & Kawahara 2002), vectorized over frames.

    audio: float [S] at 16 kHz. Frame i is centred at i * hop_s seconds; it spans one integration
    window W = sr / fmin samples (20 ms at 50 Hz) plus the lag range, W + sr / fmin in all (40 ms).
    Returns f0 [frames] in Hz (0.0 where unvoiced) and voiced [frames] bool. A frame is voiced when
    its cumulative mean normalized difference dips below `threshold` at a lag in [sr/fmax, sr/fmin]
    (noise never dips: it is aperiodic) and it is not silence (SILENCE_DB below the loudest frame,
    or under FLOOR_POWER). Silence or an empty clip gives all frames unvoiced, no error."""
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    hop = round(hop_s * SAMPLE_RATE)  # samples
    tau_min = int(SAMPLE_RATE // fmax)  # the shortest period searched, in samples
    tau_max = int(np.ceil(SAMPLE_RATE / fmin))  # the longest
    frames = _frames(audio, hop, length=2 * tau_max)  # [F, 2W], W = tau_max
    n = frames.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    d = _difference(frames, tau_max)  # [F, tau_max + 1]
    cmnd = _cmnd(d)
    tau, found = _first_dip(cmnd, tau_min, threshold)
    # Parabolic interpolation on the raw difference d (not d', whose tau factor biases the dip):
    # the true period sits between integer lags, and 1 sample at 220 Hz is 1.4% of the period.
    rows = np.arange(n)
    left = d[rows, tau - 1]  # [F]
    mid = d[rows, tau]
    right = d[rows, np.minimum(tau + 1, tau_max)]
    curve = left - 2 * mid + right
    convex = curve > 0  # a parabola with a minimum; else no shift
    shift = np.where(convex, 0.5 * (left - right) / np.where(convex, curve, 1.0), 0.0)
    period = tau + np.clip(shift, -1.0, 1.0)
    power = np.mean(frames**2, axis=1)
    voiced = found & ~_silent(power)
    f0 = np.where(voiced, SAMPLE_RATE / period, 0.0)
    return f0, voiced


def f0_std_semitones(f0: np.ndarray, voiced: np.ndarray) -> float:
    """Standard deviation of pitch over voiced frames, in semitones (12 * log2 f0).

    Semitones, not Hz: the same melody an octave up has the same spread. 0.0 with fewer than 2
    voiced frames (no variation to measure)."""
    f0 = np.asarray(f0, dtype=np.float64)[np.asarray(voiced, dtype=bool)]
    if f0.size < 2:
        return 0.0
    return float(np.std(12.0 * np.log2(f0)))


def f0_median_hz(f0: np.ndarray, voiced: np.ndarray) -> float:
    """The voice's median pitch over voiced frames, in Hz: where it sits, as f0_std_semitones says
    how far it moves (a voice cloned from a prompt should sit near the prompt's). The median, not
    the mean: YIN's rare octave errors do not move it. 0.0 with no voiced frame."""
    f0 = np.asarray(f0, dtype=np.float64)[np.asarray(voiced, dtype=bool)]
    if f0.size == 0:
        return 0.0
    return float(np.median(f0))


def voiced_frac(voiced: np.ndarray) -> float:
    """Fraction of frames that are voiced, in [0, 1]; 0.0 for no frames."""
    voiced = np.asarray(voiced, dtype=bool)
    return float(voiced.mean()) if voiced.size else 0.0


def speech_seconds(
    audio: np.ndarray, *, threshold_db: float = SILENCE_DB, frame_s: float = 0.01
) -> float:
    """Seconds from the first to the last frame within `threshold_db` of the loudest frame.

    Leading and trailing silence are trimmed, pauses inside the clip are kept (they are part of
    the pace). Frames are frame_s long (10 ms), not overlapping. 0.0 for silence or an empty
    clip."""
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    frame = round(frame_s * SAMPLE_RATE)  # samples
    n = -(-audio.size // frame)  # frames, the last zero-padded
    if n == 0:
        return 0.0
    frames = np.pad(audio, (0, n * frame - audio.size)).reshape(n, frame)  # [n, frame]
    power = np.mean(frames**2, axis=1)
    loud = np.flatnonzero(~_silent(power, threshold_db))
    if loud.size == 0:
        return 0.0
    return float(loud[-1] - loud[0] + 1) * frame / SAMPLE_RATE


def chars_per_s(text_chars: int, audio: np.ndarray) -> float:
    """Speaking rate in characters per second of speech: text_chars / speech_seconds(audio).

    text_chars is the length of the normalized text (reward.normalize_text: no spaces or
    punctuation, so scripts compare). 0.0 when there is no speech: no speech has no rate, and an
    infinite one would poison every mean it enters."""
    seconds = speech_seconds(audio)
    return text_chars / seconds if seconds > 0 else 0.0


def measure(audio: np.ndarray, text: str) -> dict:
    """Per-clip prosody and pacing: {"f0_std_semitones", "voiced_frac", "chars_per_s",
    "f0_median_hz"} (floats).

    audio: float [S] at 16 kHz; text: what the clip should say (its normalized length sets the
    rate)."""
    f0, voiced = f0_track(audio)
    return {
        "f0_std_semitones": f0_std_semitones(f0, voiced),
        "voiced_frac": voiced_frac(voiced),
        "chars_per_s": chars_per_s(len(normalize_text(text)), audio),
        "f0_median_hz": f0_median_hz(f0, voiced),
    }


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _frames(audio: np.ndarray, hop: int, *, length: int) -> np.ndarray:
    """[S] -> [ceil(S / hop), length] frames, frame i centred on sample i * hop (zero-padded
    ends)."""
    n = -(-audio.size // hop)
    if n == 0:
        return np.zeros((0, length))
    padded = np.pad(audio, (length // 2, (n - 1) * hop + length - length // 2 - audio.size))
    return np.lib.stride_tricks.sliding_window_view(padded, length)[::hop][:n]


def _difference(frames: np.ndarray, tau_max: int) -> np.ndarray:
    """YIN difference d(tau) = sum_{j<W} (x_j - x_{j+tau})^2, tau = 0..tau_max:
    [F, 2W] -> [F, tau_max + 1].

    Expanded as e(0) + e(tau) - 2 r(tau): the cross term r is one FFT correlation per frame
    (O(W log W), not O(W * tau_max)), the energies e are running sums of x^2."""
    width = frames.shape[1] - tau_max  # W: the integration window
    # FFT size 2W: j + tau < 2W, so the circular correlation never wraps; no padding to a power
    # of 2 (640 = 2^7 * 5 at 50 Hz is already a fast size, and the padded copy cost more than it
    # saved).
    size = frames.shape[1]
    spec = np.fft.rfft(frames, size)
    head = np.fft.rfft(frames[:, :width], size)
    # r(tau) = sum_{j<W} x_j x_{j+tau}, [F, tau_max + 1]
    r = np.fft.irfft(np.conj(head) * spec, size)[:, : tau_max + 1]
    # e(tau) = sum x_{tau..tau+W-1}^2, from the running sum of x^2 (csum[:, k] = sum x_{<k}^2)
    csum = np.concatenate([np.zeros((frames.shape[0], 1)), np.cumsum(frames**2, axis=1)], axis=1)
    energy = csum[:, width : width + tau_max + 1] - csum[:, : tau_max + 1]
    return np.maximum(energy[:, :1] + energy - 2 * r, 0.0)  # FFT rounding can dip below 0


def _cmnd(d: np.ndarray) -> np.ndarray:
    """Cumulative mean normalized difference d'(tau) = d(tau) / mean(d(1..tau)), d'(0) = 1:
    [F, T] -> [F, T].

    The normalization removes YIN's bias toward lag 0 and makes one threshold fit any loudness."""
    mean = np.cumsum(d[:, 1:], axis=1) / np.arange(1, d.shape[1])
    out = np.ones_like(d)
    np.divide(d[:, 1:], mean, out=out[:, 1:], where=mean > 0)  # all-zero frame: d' = 1, aperiodic
    return out


def _first_dip(cmnd: np.ndarray, tau_min: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """YIN's absolute threshold: per frame, the first lag >= tau_min with d' < threshold, walked
    down to the bottom of that dip. The first dip, not the deepest: deeper dips at 2, 3... periods
    would halve the pitch (octave errors). Returns lag [F] int (tau_min where none) and found [F]
    bool."""
    lags = np.arange(cmnd.shape[1])
    below = (cmnd < threshold) & (lags >= tau_min)
    found = below.any(axis=1)
    start = np.where(found, below.argmax(axis=1), tau_min)
    # Bottom of the dip: the first lag at or after start where d' stops falling.
    rising = np.append(cmnd[:, 1:] >= cmnd[:, :-1], np.ones((cmnd.shape[0], 1), dtype=bool), axis=1)
    lag = (rising & (lags >= start[:, None])).argmax(axis=1)
    return lag, found


def _silent(power: np.ndarray, threshold_db: float = SILENCE_DB) -> np.ndarray:
    """Which frames are silence: mean square power [F] below threshold_db of the loudest frame, or
    under FLOOR_POWER (an all-quiet clip has no loud frame to be relative to)."""
    peak = power.max(initial=0.0)
    return (power < peak * 10.0 ** (threshold_db / 10.0)) | (power < FLOOR_POWER)
