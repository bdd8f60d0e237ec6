"""Speech codecs: codes (ints) -> 16 kHz float32 audio.

Every codec has `.decode(codes) -> list[np.ndarray]`, where `codes` is a list of code sequences
(lists or 1-D tensors of ints, different lengths allowed) and each output clip is float32 mono at
16 kHz, exactly SAMPLES_PER_CODE samples per code. `load_codec(name, device)` picks one:
  "tone"    a deterministic test codec (each code a short tone), for tiny runs and tests;
  "xcodec2" XCodec2 (HKUSTAudio/xcodec2), 50 codes per second.
"""
import math

import numpy as np
import torch

SAMPLE_RATE = 16000  # Hz
SAMPLES_PER_CODE = 320  # 16000 / 50 codes per second


def _as_lists(codes) -> list[list[int]]:
    out = []
    for i, c in enumerate(codes):
        c = c.tolist() if torch.is_tensor(c) or isinstance(c, np.ndarray) else list(c)
        if any((not isinstance(x, int)) or x < 0 for x in c):
            raise ValueError(f"clip {i}: codes must be non-negative ints, got {c[:8]}...")
        out.append(c)
    return out


class ToneCodec:
    """Deterministic test codec: code k becomes a 20 ms sine at 100 + 15 * (k % 256) Hz.

    Distinct codes give distinct, audible sounds, so rewards on its audio are learnable."""
    sample_rate = SAMPLE_RATE

    def __init__(self, amplitude: float = 0.3):
        self.amplitude = amplitude

    def decode(self, codes) -> list[np.ndarray]:
        t = np.arange(SAMPLES_PER_CODE, dtype=np.float64) / SAMPLE_RATE  # seconds, [320]
        clips = []
        for seq in _as_lists(codes):
            freqs = 100.0 + 15.0 * (np.asarray(seq, dtype=np.float64) % 256)  # Hz, [T]
            wav = self.amplitude * np.sin(2 * math.pi * freqs[:, None] * t[None, :])  # [T, 320]
            clips.append(wav.reshape(-1).astype(np.float32))
        return clips


class XCodec2PackageCodec:
    """XCodec2 through the `xcodec2` package (`XCodec2Model.decode_code`)."""
    sample_rate = SAMPLE_RATE

    def __init__(self, model: str = "HKUSTAudio/xcodec2", device="cpu"):
        try:
            from xcodec2.modeling_xcodec2 import XCodec2Model
        except ImportError as e:
            raise ImportError(
                "codec 'xcodec2-package' needs the xcodec2 package. It pins torch==2.5.0; to keep your torch, "
                "install it with `pip install xcodec2 --no-deps` and then its needs by hand "
                "(vector-quantize-pytorch, einops, torchtune, torchao). Or use --codec xcodec2, "
                "which needs none of them.") from e
        self.device = torch.device(device)
        self.model = XCodec2Model.from_pretrained(model).eval().to(self.device)

    @torch.no_grad()
    def decode(self, codes) -> list[np.ndarray]:
        seqs = _as_lists(codes)
        if not seqs:
            return []
        lengths = [len(s) for s in seqs]
        T = max(max(lengths), 1)
        batch = torch.zeros(len(seqs), 1, T, dtype=torch.long)  # [B, 1, T], right-padded with code 0
        for i, s in enumerate(seqs):
            batch[i, 0, :len(s)] = torch.tensor(s, dtype=torch.long)
        wav = self.model.decode_code(batch.to(self.device)).float().cpu().numpy()  # [B, 1, S]
        return [wav[i, 0, :n * SAMPLES_PER_CODE].astype(np.float32) for i, n in enumerate(lengths)]


def load_codec(name: str, device="cpu"):
    """'tone', 'xcodec2-package', or 'xcodec2' / 'xcodec2:PATH_OR_HUB_ID'."""
    if name == "tone":
        return ToneCodec()
    if name.startswith("xcodec2-package"):
        _, _, path = name.partition(":")
        return XCodec2PackageCodec(path or "HKUSTAudio/xcodec2", device)
    if name.startswith("xcodec2"):
        _, _, path = name.partition(":")
        return XCodec2PackageCodec(path or "HKUSTAudio/xcodec2", device)
    raise ValueError(f"unknown codec {name!r}: expected 'tone', 'xcodec2[:PATH]' or 'xcodec2-package[:PATH]'")
