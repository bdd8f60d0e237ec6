"""Speech codecs: codes (ints) <-> 16 kHz float32 audio.

Every codec has `.decode(codes) -> list[np.ndarray]` (code sequences: lists or 1-D tensors of ints
in [0, 65536), any lengths -> float32 mono 16 kHz clips, SAMPLES_PER_CODE samples per code; the
word codec's codes are words) and `.encode(audios) -> list[list[int]]` (1-D float32 16 kHz clips ->
50 codes per second; `PromptCodes` encodes each distinct voice prompt once).
`load_codec(name, device)` picks one:
  "tone"                    a test codec: each code a short tone
  "words[:PATH]"            the CPU demo's: code k is word k of a small vocabulary, spoken by
                            espeak-ng
  "xcodec2[:PATH]"          XCodec2: decoded by xcodec2_decoder.XCodec2Decoder (the decoder half
                            in plain PyTorch), encoded by transformers' Xcodec2Model
                            (HKUSTAudio/xcodec2-hf), loaded on the first encode
  "xcodec2-package[:PATH]"  the `xcodec2` package, which pins torch 2.5 and loads the encoders
                            even to decode
"""

import contextlib
import hashlib
import itertools
import math
import numbers
import os

import numpy as np
import torch

from tf32 import fp32_math
from xcodec2_decoder import XCODEC2, XCODEC2_HF, XCodec2Config, XCodec2Decoder

# Re-exported: callers use the decoder's key maps as codec.checkpoint_key, codec.transformers_keys
from xcodec2_decoder import checkpoint_key as checkpoint_key
from xcodec2_decoder import transformers_keys as transformers_keys

SAMPLE_RATE = 16000  # Hz
SAMPLES_PER_CODE = 320  # 16000 / 50 codes per second
CODEBOOK_SIZE = 65536  # XCodec2's one FSQ codebook: 8 levels of 4 values
WORDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo", "words.npz")


def _is_code(x) -> bool:
    """An int (not a bool) in [0, CODEBOOK_SIZE)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and 0 <= x < CODEBOOK_SIZE


def _as_lists(codes) -> list[list[int]]:
    out = []
    for i, c in enumerate(codes):
        c = c.tolist() if torch.is_tensor(c) or isinstance(c, np.ndarray) else list(c)
        bad = [x for x in c if not _is_code(x)]
        if bad:
            raise ValueError(
                f"clip {i}: codes must be ints in [0, {CODEBOOK_SIZE}), got {bad[0]!r} "
                f"({len(bad)} bad of {len(c)})"
            )
        out.append([int(x) for x in c])
    return out


def _as_audio(audios) -> list[np.ndarray]:
    out = [np.ascontiguousarray(a, dtype=np.float32) for a in audios]
    if bad := [i for i, a in enumerate(out) if a.ndim != 1]:
        raise ValueError(
            f"clip {bad[0]}: audio must be 1-D (mono, 16 kHz), got shape {out[bad[0]].shape}"
        )
    return out


class PromptCodes:
    """A run's cache of prompt codes: each distinct audio content (sha1 of its float32 samples)
    encoded once."""

    def __init__(self, codec):
        self.codec = codec
        self.codes = {}  # sha1 hex -> codes

    def encode(self, audios) -> list[list[int]]:
        """As codec.encode, encoding only content not seen before (once, even if repeated in
        `audios`)."""
        audios = _as_audio(audios)
        keys = [hashlib.sha1(a.tobytes()).hexdigest() for a in audios]
        new = {k: a for k, a in zip(keys, audios) if k not in self.codes}  # sha1 -> audio
        if new:
            self.codes.update(zip(new, self.codec.encode(list(new.values()))))
        return [list(self.codes[k]) for k in keys]


class ToneCodec:
    """Deterministic test codec: code k becomes a 20 ms sine at 100 + 15 * (k % 256) Hz; distinct
    codes (mod 256) give distinct, audible sounds, so rewards on its audio are learnable."""

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

    def encode(self, audios) -> list[list[int]]:
        """Each 320-sample frame -> the code in [0, 256) of the nearest tone (least squares),
        samples // 320 codes. The inverse of decode on its own audio: encode(decode(c)) ==
        [k % 256 for k in c] (k and k + 256 sound the same), so decode(encode(a)) == a. Other audio
        gets the nearest tones: meaningless, no error."""
        tones = self.decode([range(256)])[0].reshape(256, SAMPLES_PER_CODE)  # [256, 320]
        tones = tones.astype(np.float64)
        out = []
        for a in _as_audio(audios):
            frames = a[: len(a) - len(a) % SAMPLES_PER_CODE].reshape(
                -1, SAMPLES_PER_CODE
            )  # [n, 320]
            # |frame - tone|^2 less |frame|^2, which is the same for every tone
            distance = (tones**2).sum(1) - 2 * frames.astype(np.float64) @ tones.T  # [n, 256]
            out.append(np.argmin(distance, axis=1).tolist())
        return out


class WordCodec:
    """Real speech from a word vocabulary, for the CPU demo (demo.py): code k is word k, a clip
    spoken once by espeak-ng; a sequence decodes to its words' clips joined with `gap_s` of silence.
    path: an .npz with `clips` (int16, every clip concatenated), `offsets` [n + 1] (clip k is
    clips[offsets[k]:offsets[k + 1]]), `words` [n] and `sample_rate` (16000)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, path: str, gap_s: float = 0.06):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"word clips not found: {path} (python demo.py build-words makes them)"
            )
        with np.load(path) as z:
            if int(z["sample_rate"]) != SAMPLE_RATE:
                raise ValueError(
                    f"{path}: sample rate {int(z['sample_rate'])}, expected {SAMPLE_RATE}"
                )
            pcm = z["clips"].astype(np.float32) / 32768.0  # every clip, concatenated
            offsets = z["offsets"]
            self.words = [str(w) for w in z["words"]]
        if len(offsets) != len(self.words) + 1:
            raise ValueError(
                f"{path}: {len(offsets)} offsets for {len(self.words)} words, expected words + 1"
            )
        self.clips = [pcm[a:b] for a, b in itertools.pairwise(offsets)]  # float32 [S_k] per word
        self.gap = np.zeros(round(gap_s * SAMPLE_RATE), dtype=np.float32)

    def decode(self, codes) -> list[np.ndarray]:
        out = []
        for i, seq in enumerate(_as_lists(codes)):
            bad = [c for c in seq if c >= len(self.clips)]
            if bad:
                raise ValueError(
                    f"clip {i}: word codes must be in [0, {len(self.clips)}), got {bad[0]}"
                )
            parts = []
            for c in seq:
                if parts:
                    parts.append(self.gap)  # a gap between words only
                parts.append(self.clips[c])
            out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32))
        return out

    def encode(self, audios) -> list[list[int]]:
        """The exact inverse of decode, by matching its clips and gaps (longest word first). Audio
        that decode did not make (a recording) has no word codes: ValueError."""
        order = sorted(range(len(self.clips)), key=lambda k: -len(self.clips[k]))  # longest first
        out = []
        for i, a in enumerate(_as_audio(audios)):
            p = 0  # the sample where the next gap and word start
            seq = []
            while p < len(a):
                g = len(self.gap) if seq else 0  # the gap before every word but the first
                k = None
                if not a[p : p + g].any():
                    k = self._word_at(a, p + g, order)
                if k is None:
                    raise ValueError(
                        f"clip {i}: the word codec encodes only audio it decoded (its word clips "
                        f"joined by gaps); no word matches at sample {p}. "
                        "Voice prompts need --codec xcodec2"
                    )
                seq.append(k)
                p += g + len(self.clips[k])
            out.append(seq)
        return out

    def _word_at(self, audio, start: int, order) -> int | None:
        """The first word k of `order` whose clip `audio` holds at sample `start`, or None."""
        for k in order:
            clip = self.clips[k]
            if np.array_equal(audio[start : start + len(clip)], clip):
                return k
        return None

    def text(self, codes) -> list[str]:
        """What each code sequence says, as text (for reading samples)."""
        return [" ".join(self.words[c] for c in seq) for seq in _as_lists(codes)]


PRECISIONS = ("tf32", "bf16", "fp32")


class XCodec2Codec:
    """XCodec2: decode through XCodec2Decoder (only the decoder's weights, no xcodec2 package),
    encode through transformers' Xcodec2Model. `precision` of decode on CUDA (a CPU computes in
    fp32, except "bf16"): "tf32" (default) fp32 weights with TF32 matmuls and convolutions; "bf16"
    autocast, TF32 off beside it; "fp32" strict: TF32 matmuls and convolutions off, whatever the
    process had set (`_numerics`, tf32.py). Another precision: ValueError. Their speed and error:
    docs/speed.md."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model=XCODEC2,
        device="cpu",
        config: XCodec2Config = XCodec2Config(),  # noqa: B008 (a frozen dataclass: immutable)
        precision: str = "tf32",
        encoder=None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"codec precision {precision!r}: expected one of {PRECISIONS}")
        self.device = torch.device(device)
        self.precision = precision
        if isinstance(model, XCodec2Decoder):
            decoder = model
        else:
            decoder = XCodec2Decoder.from_pretrained(model, config)
        self.model = decoder.eval().to(self.device)
        # An Xcodec2Model, or its hub id / directory, loaded on first use. A checkpoint other than
        # the original is in transformers' format, which serves both decoder and encoder.
        if encoder is not None:
            self.encoder = encoder
        elif isinstance(model, str) and model != XCODEC2:
            self.encoder = model
        else:
            self.encoder = XCODEC2_HF

    @torch.no_grad()
    def encode(self, audios) -> list[list[int]]:
        """transformers' Xcodec2Model.encode (w2v-bert-2.0 semantic encoder + acoustic encoder +
        FSQ), on its device, one clip at a time so that a clip's codes never depend on its batch. A
        clip of S samples is padded as Xcodec2FeatureExtractor pads it (at least one zero, to a
        multiple of 320: S // 320 + 1 codes) and keeps the codes the model marks valid (its
        audio_codes_mask): (S + 1) // 320 of them."""
        if isinstance(self.encoder, str):
            self.encoder = load_transformers_xcodec2(self.encoder, self.device)
        # Xcodec2FeatureExtractor's fbank, without torchaudio
        from transformers import SeamlessM4TFeatureExtractor

        model = self.encoder
        hop = model.config.hop_length
        fbank = SeamlessM4TFeatureExtractor()
        out = []
        for a in _as_audio(audios):
            wav = np.pad(a, (0, (len(a) // hop + 1) * hop - len(a)))  # [k * hop]
            feats = fbank(np.pad(wav, hop // 2), sampling_rate=SAMPLE_RATE, return_tensors="pt")
            x = torch.from_numpy(wav)[None, None].to(model.device, model.dtype)  # [1, 1, k * hop]
            features = feats["input_features"].to(model.device, model.dtype)
            codes = model.encode(x, features).audio_codes  # [1, 1, k]
            out.append(codes[0, 0, : (len(a) + 1) // hop].tolist())
        return out

    @contextlib.contextmanager
    def _numerics(self):
        """The precision's settings for one decode, whatever the caller's, restored after
        (process-wide)."""
        # TF32 only for "tf32" on CUDA; else strict fp32 (beside bf16's autocast)
        tf32 = self.precision == "tf32" and self.device.type == "cuda"
        bf16 = self.precision == "bf16"
        with (
            fp32_math(cuda_tf32=tf32),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            yield

    @torch.no_grad()
    def decode(self, codes) -> list[np.ndarray]:
        """All clips in one forward, right-padded; the padding is masked, so each clip sounds as
        alone."""
        seqs = _as_lists(codes)
        if not seqs:
            return []
        lengths = [len(s) for s in seqs]
        T = max(max(lengths), 1)
        batch = torch.tensor([s + [0] * (T - len(s)) for s in seqs], dtype=torch.long)  # [B, T]
        batch = batch[:, None]  # [B, 1, T], 0-padded
        # An empty clip decodes one padding frame (cut below) rather than none; no padding, no mask.
        frames = torch.tensor([max(n, 1) for n in lengths])  # [B]
        if int(frames.min()) == T:
            frames = None
        with self._numerics():
            wav = self.model(batch.to(self.device), frames)  # [B, 1, T * 320]
        wav = wav.float().cpu().numpy()
        return [wav[i, 0, : n * SAMPLES_PER_CODE].copy() for i, n in enumerate(lengths)]


def load_transformers_xcodec2(path_or_id: str = XCODEC2_HF, device="cpu"):
    """transformers' Xcodec2Model from a hub id or directory, whole (encode needs all of it), in
    eval mode. ImportError for a transformers without it; OSError for a checkpoint it can't load."""
    import transformers

    if not hasattr(transformers, "Xcodec2Model"):
        raise ImportError(
            f"XCodec2 encode needs transformers >= 5.13 (Xcodec2Model); this is "
            f"{transformers.__version__}: pip install -U 'transformers>=5.13'"
        )
    hint = (
        f"encode needs transformers' Xcodec2Model checkpoint {XCODEC2_HF} or a local copy "
        "(it decodes too)"
    )
    try:
        model, info = transformers.Xcodec2Model.from_pretrained(
            path_or_id, output_loading_info=True
        )
    except Exception as e:
        raise OSError(
            f"could not load the XCodec2 encoder {path_or_id!r} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0]}); {hint}: --codec xcodec2:PATH"
        ) from e
    missing = sorted(info["missing_keys"])
    if missing:  # e.g. the original HKUSTAudio/xcodec2 (its config.json: xcodec2)
        raise OSError(
            f"{path_or_id!r} is not a transformers Xcodec2Model checkpoint ({len(missing)} tensors "
            f"missing, e.g. {missing[0]}); {hint}: --codec xcodec2:PATH"
        )
    return model.eval().to(device)


class XCodec2PackageCodec:
    """XCodec2 through the `xcodec2` package (`XCodec2Model.decode_code`)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: str = XCODEC2, device="cpu"):
        try:
            from xcodec2.modeling_xcodec2 import XCodec2Model
        except ImportError as e:
            raise ImportError(
                "codec 'xcodec2-package' needs the xcodec2 package. It pins torch==2.5.0; "
                "to keep your torch, install it with `pip install xcodec2 --no-deps` and then "
                "its needs by hand (vector-quantize-pytorch, einops, torchtune, torchao). "
                "Or use --codec xcodec2, which needs none of them."
            ) from e
        self.device = torch.device(device)
        self.model = XCodec2Model.from_pretrained(model).eval().to(self.device)

    @torch.no_grad()
    def decode(self, codes) -> list[np.ndarray]:
        """One clip at a time: decode_code has no padding mask, so padding would change shorter
        clips."""
        clips = []
        for seq in _as_lists(codes):
            batch = torch.tensor(seq or [0], dtype=torch.long, device=self.device)  # [T]
            batch = batch[None, None]  # [1, 1, T]
            wav = self.model.decode_code(batch)[0, 0].float().cpu().numpy()  # [T * 320]
            clips.append(wav[: len(seq) * SAMPLES_PER_CODE])
        return clips

    @torch.no_grad()
    def encode(self, audios) -> list[list[int]]:
        """The package's encode_code, one clip at a time, cut as XCodec2Codec.encode: (S + 1) // 320
        codes."""
        out = []
        for a in _as_audio(audios):
            codes = self.model.encode_code(torch.from_numpy(a)[None].to(self.device)).reshape(-1)
            out.append(codes[: (len(a) + 1) // SAMPLES_PER_CODE].tolist())
        return out


def load_codec(name: str, device="cpu", precision: str = "tf32"):
    """The codec named: 'tone', 'words[:PATH]' (the demo's spoken words, default
    data/demo/words.npz), 'xcodec2[:PATH_OR_HUB_ID]' (ours, computing in `precision` on CUDA:
    XCodec2Codec) or 'xcodec2-package[:PATH_OR_HUB_ID]' (the xcodec2 package). Another name:
    ValueError."""
    kind, _, path = name.partition(":")
    if name == "tone":
        return ToneCodec()
    if kind == "words":
        return WordCodec(path or WORDS_FILE)
    if kind == "xcodec2":
        return XCodec2Codec(path or XCODEC2, device, precision=precision)
    if kind == "xcodec2-package":
        return XCodec2PackageCodec(path or XCODEC2, device)
    raise ValueError(
        f"unknown codec {name!r}: expected 'tone', 'words[:PATH]', 'xcodec2[:PATH]' or "
        "'xcodec2-package[:PATH]'"
    )
