"""DNSMOS: Microsoft's non-intrusive speech quality scores, from the audio alone (no reference).

Two ONNX models that the MIT-licensed `speechmos` package ships, run with onnxruntime on the CPU:
P.835 reads the raw waveform and gives SIG (the speech itself), BAK (the background) and OVRL
(overall); P.808 reads a mel spectrogram and gives one overall MOS. All are on the 1-5 MOS scale,
higher is better. Whisper's reward does not hear noise, hiss or buzz that leaves the words
intelligible; these scores do (figures and cost: docs/prosody.md).

The method is the reference's (Microsoft's dnsmos_local.py, as speechmos's dnsmos.py runs it),
rewritten here without librosa: 9.01 s windows hopped by 1 s, a shorter clip tiled by doubling,
each window's raw P.835 scores mapped through the fitted polynomials, the scores averaged over
windows. tests/test_dnsmos.py holds it to speechmos's own scores on the shared clips.

    scorer = DNSMOS()                 # ImportError naming the pip command without the packages
    scorer.score(audio)               # {"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"}
    mel_features(audio)               # the P.808 model's input, as librosa computes it

Optional: `pip install speechmos onnxruntime`. Any clip up to 33 s makes 1 to 7 windows (a
short one once tiled: 3 s makes 3, 4.2 s 7, 4.7 s 1; see _windows for why never more).
"""

import importlib.util
import os

import numpy as np

SAMPLE_RATE = 16000
WINDOW_S = 9.01  # the P.835 model's fixed input length
WINDOW = int(WINDOW_S * SAMPLE_RATE)  # 144,160 samples
HOP = SAMPLE_RATE  # windows start 1 s apart
N_FFT = 321  # the P.808 mel spectrogram: 321-sample periodic Hann frames, 10 ms hop, 120 mels
MEL_HOP = 160
N_MELS = 120
INSTALL = "pip install speechmos onnxruntime"
KEYS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")

# The polynomials (np.polyval order: highest power first) that map the P.835 model's raw outputs to
# MOS, fitted by Microsoft to listeners' ratings; the personalized model has its own.
POLYNOMIALS = {
    False: {
        "sig": (-0.08397278, 1.22083953, 0.0052439),
        "bak": (-0.13166888, 1.60915514, -0.39604546),
        "ovrl": (-0.06766283, 1.11546468, 0.04602535),
    },
    True: {
        "sig": (-0.01019296, 0.02751166, 1.19576786, -0.24348726),
        "bak": (-0.04976499, 0.44276479, -0.1644611, 0.96883132),
        "ovrl": (-0.00533021, 0.005101, 1.18058466, -0.11236046),
    },
}


def model_dir() -> str:
    """The folder of the installed `speechmos` package, which holds dnsmos_models/ and
    pdnsmos_models/. ImportError (one line naming the pip command) when speechmos or onnxruntime
    is not installed. speechmos's own modules are not imported: they need librosa."""
    needed = ("speechmos", "onnxruntime")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"DNSMOS needs {' and '.join(missing)}: {INSTALL}")
    return os.path.dirname(importlib.util.find_spec("speechmos").origin)


class DNSMOS:
    """The P.835 and P.808 models, loaded once; score() is safe to call from several threads.

    personalized: the P.835 model that also penalizes a second talker in the background (and its
    polynomials); P.808 is the same either way. threads: onnxruntime's intra-op threads per
    model, 0 for its default (every core)."""

    def __init__(self, *, personalized: bool = False, threads: int = 0):
        root = model_dir()  # first: its one-line error, not import's, when a package is missing
        import onnxruntime

        folder = "pdnsmos_models" if personalized else "dnsmos_models"
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads

        def session(path):
            return onnxruntime.InferenceSession(
                os.path.join(root, path), options, providers=["CPUExecutionProvider"]
            )

        self.p835 = session(os.path.join(folder, "sig_bak_ovr.onnx"))
        self.p808 = session(os.path.join("dnsmos_models", "model_v8.onnx"))
        self.polynomials = POLYNOMIALS[personalized]

    def score(self, audio: np.ndarray) -> dict:
        """{"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"}: floats on the 1-5 MOS scale.

        audio: float [S] at 16 kHz, S >= 1, nominally in [-1, 1] (not checked: the reference
        refuses values outside, a codec's slight overshoot is scored as it is). ValueError for an
        empty or non-1-D clip."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"DNSMOS scores one non-empty 1-D clip; got shape {audio.shape}")
        windows = np.stack(list(_windows(audio)))  # [W, WINDOW]
        raw = self.p835.run(None, {"input_1": windows})[0]  # [W, 3]: sig, bak, ovrl
        # P.808 reads the window less its last 10 ms: 144,000 samples, 900 mel frames.
        mels = np.stack([mel_features(window[:-MEL_HOP]) for window in windows])  # [W, 900, 120]
        p808 = self.p808.run(None, {"input_1": mels.astype(np.float32)})[0][:, 0]  # [W]
        scores = {
            f"dnsmos_{name}": np.polyval(self.polynomials[name], raw[:, i])
            for i, name in enumerate(("sig", "bak", "ovrl"))
        }
        scores["dnsmos_p808"] = p808
        return {key: float(np.mean(scores[key])) for key in KEYS}

    def rate(self, audio: np.ndarray) -> dict:
        """score(), with an empty clip (a policy's empty answer) rated as the silence it is."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size == 0:
            audio = np.zeros(1, np.float32)
        return self.score(audio)


def mel_features(audio: np.ndarray) -> np.ndarray:
    """The P.808 model's features of audio [S] (S >= 1, 16 kHz): [frames, 120] float64,
    frames = 1 + (S - 1) // 160; a 144,000-sample window gives the model's 900 frames.

    librosa.feature.melspectrogram(sr=16000, n_fft=321, hop_length=160, n_mels=120) (centred
    frames zero-padded at the ends, power 2, Slaney mels), then power_to_db(ref=np.max) (floor
    1e-10, at most 80 dB below the peak), then (dB + 40) / 40. All zeros gives all ones."""
    audio = np.asarray(audio, dtype=np.float64)
    padded = np.pad(audio, N_FFT // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::MEL_HOP]  # [F, 321]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # [F, 161]
    mel = power @ mel_filterbank().T  # [F, 120]
    db = 10 * np.log10(np.maximum(mel, 1e-10)) - 10 * np.log10(max(mel.max(), 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    return (db + 40.0) / 40.0


def mel_filterbank() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=321, n_mels=120) (Slaney's mel scale and area
    normalization, 0 to 8 kHz): [120, 161] float64, row m weighting the rfft bins of mel band m."""
    bins = np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT  # rfft bin centres, Hz
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))  # [122] Hz
    lower = edges[:-2, None]  # [120, 1] Hz: band m rises from lower[m] to centre[m]
    centre = edges[1:-1, None]
    upper = edges[2:, None]  # and falls to upper[m]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return triangles * (2.0 / (upper - lower))  # equal area: each band sums to the same energy


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
MEL_LINEAR_HZ = 200.0 / 3  # Hz per mel below the break
MEL_BREAK_HZ = 1000.0
MEL_BREAK = MEL_BREAK_HZ / MEL_LINEAR_HZ  # 15 mels
MEL_LOG_STEP = np.log(6.4) / 27.0  # log-Hz per mel above the break


def _hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    above = MEL_BREAK + np.log(np.maximum(hz, MEL_BREAK_HZ) / MEL_BREAK_HZ) / MEL_LOG_STEP
    return np.where(hz >= MEL_BREAK_HZ, above, hz / MEL_LINEAR_HZ)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    above = MEL_BREAK_HZ * np.exp(MEL_LOG_STEP * (mel - MEL_BREAK))
    return np.where(mel >= MEL_BREAK, above, mel * MEL_LINEAR_HZ)


def _windows(audio: np.ndarray):
    """The reference's 9.01 s windows of a clip: yields [WINDOW] float32 arrays, at least one.

    A clip shorter than a window is doubled (concatenated with itself) until it is not. Windows
    start every second while a whole one fits. Their ends are computed as the reference computes
    them, int((i + 9.01) * 16000) in floating point, which falls one sample short for the windows
    starting at 7-23 s (and 119-122 s); the reference skips those, and so does this, so that the
    scores stay comparable with published DNSMOS figures."""
    while audio.size < WINDOW:
        audio = np.concatenate([audio, audio])
    count = int(np.floor(audio.size / SAMPLE_RATE) - WINDOW_S) + 1
    for i in range(count):
        start = i * HOP
        window = audio[start : int((i + WINDOW_S) * HOP)]
        if window.size == WINDOW:
            yield window
