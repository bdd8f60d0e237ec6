"""Speech codecs: codes (ints) <-> 16 kHz float32 audio.

Every codec has `.decode(codes) -> list[np.ndarray]` (code sequences: lists or 1-D tensors of ints in [0, 65536),
any lengths -> float32 mono 16 kHz clips, SAMPLES_PER_CODE samples per code; the word codec's codes are words) and
`.encode(audios) -> list[list[int]]` (1-D float32 16 kHz clips -> 50 codes per second; `PromptCodes` encodes each
distinct voice prompt once). `load_codec(name, device)` picks one: "tone" (a test codec: each code a short tone),
"words[:PATH]" (the CPU demo's: code k is word k of a small vocabulary, spoken by espeak-ng), "xcodec2[:PATH]"
(XCodec2, decoded by XCodec2Decoder below, the decoder half in plain PyTorch, ~187M weights; encoded by
transformers' Xcodec2Model, HKUSTAudio/xcodec2-hf, loaded on the first encode) or "xcodec2-package[:PATH]" (the
`xcodec2` package, which pins torch 2.5 and loads the encoders even to decode).

XCodec2Decoder reproduces `XCodec2Model.decode_code` of the xcodec2 package (v0.1.5): FSQ code -> 8 level values ->
project_out -> fc_post_a -> Vocos backbone (conv, 2 ResNet blocks, 12 transformer blocks, 2 ResNet blocks,
LayerNorm) -> linear head to a magnitude/phase spectrum -> ISTFT. Its attention is bidirectional and its GroupNorms
pool over time, so plain right-padding would change the audio of the shorter clips of a batch: XCodec2Codec passes
the clip lengths, and the decoder keeps padded frames out of every step that mixes frames.
"""
import contextlib
import hashlib
import math
import numbers
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tf32 import fp32_math

SAMPLE_RATE = 16000  # Hz
SAMPLES_PER_CODE = 320  # 16000 / 50 codes per second
CODEBOOK_SIZE = 65536  # XCodec2's one FSQ codebook: 8 levels of 4 values
XCODEC2, XCODEC2_HF = "HKUSTAudio/xcodec2", "HKUSTAudio/xcodec2-hf"  # original and transformers checkpoints
WORDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo", "words.npz")


def _as_lists(codes) -> list[list[int]]:
    out = []
    for i, c in enumerate(codes):
        c = c.tolist() if torch.is_tensor(c) or isinstance(c, np.ndarray) else list(c)
        bad = [x for x in c if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 0 <= x < CODEBOOK_SIZE]
        if bad:
            raise ValueError(f"clip {i}: codes must be ints in [0, {CODEBOOK_SIZE}), got {bad[0]!r} "
                             f"({len(bad)} bad of {len(c)})")
        out.append([int(x) for x in c])
    return out


def _as_audio(audios) -> list[np.ndarray]:
    out = [np.ascontiguousarray(a, dtype=np.float32) for a in audios]
    if bad := [i for i, a in enumerate(out) if a.ndim != 1]:
        raise ValueError(f"clip {bad[0]}: audio must be 1-D (mono, 16 kHz), got shape {out[bad[0]].shape}")
    return out


class PromptCodes:
    """A run's cache of prompt codes: each distinct audio content (sha1 of its float32 samples) encoded once."""

    def __init__(self, codec):
        self.codec, self.codes = codec, {}  # sha1 hex -> codes

    def encode(self, audios) -> list[list[int]]:
        """As codec.encode, encoding only content not seen before (once, even if repeated in `audios`)."""
        audios = _as_audio(audios)
        keys = [hashlib.sha1(a.tobytes()).hexdigest() for a in audios]
        new = {k: a for k, a in zip(keys, audios) if k not in self.codes}
        self.codes.update(zip(new, self.codec.encode(list(new.values())) if new else []))
        return [list(self.codes[k]) for k in keys]


class ToneCodec:
    """Deterministic test codec: code k becomes a 20 ms sine at 100 + 15 * (k % 256) Hz; distinct codes (mod 256)
    give distinct, audible sounds, so rewards on its audio are learnable."""
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
        """Each 320-sample frame -> the code in [0, 256) of the nearest tone (least squares), samples // 320
        codes. The inverse of decode on its own audio: encode(decode(c)) == [k % 256 for k in c] (k and k + 256
        sound the same), so decode(encode(a)) == a. Other audio gets the nearest tones: meaningless, no error."""
        tones = self.decode([range(256)])[0].reshape(256, SAMPLES_PER_CODE).astype(np.float64)  # [256, 320]
        frames = [a[:len(a) - len(a) % SAMPLES_PER_CODE].reshape(-1, SAMPLES_PER_CODE) for a in _as_audio(audios)]
        return [np.argmin((tones ** 2).sum(1) - 2 * f.astype(np.float64) @ tones.T, axis=1).tolist() for f in frames]


class WordCodec:
    """Real speech from a word vocabulary, for the CPU demo (demo.py): code k is word k, a clip
    spoken once by espeak-ng; a sequence decodes to its words' clips joined with `gap_s` of silence.
    path: an .npz with `clips` (int16, every clip concatenated), `offsets` [n + 1] (clip k is
    clips[offsets[k]:offsets[k + 1]]), `words` [n] and `sample_rate` (16000)."""
    sample_rate = SAMPLE_RATE

    def __init__(self, path: str, gap_s: float = 0.06):
        if not os.path.exists(path):
            raise FileNotFoundError(f"word clips not found: {path} (python demo.py build-words makes them)")
        with np.load(path) as z:
            if int(z["sample_rate"]) != SAMPLE_RATE:
                raise ValueError(f"{path}: sample rate {int(z['sample_rate'])}, expected {SAMPLE_RATE}")
            pcm, offsets = z["clips"].astype(np.float32) / 32768.0, z["offsets"]
            self.words = [str(w) for w in z["words"]]
        if len(offsets) != len(self.words) + 1:
            raise ValueError(f"{path}: {len(offsets)} offsets for {len(self.words)} words, expected words + 1")
        self.clips = [pcm[a:b] for a, b in zip(offsets[:-1], offsets[1:])]  # float32 [S_k] per word
        self.gap = np.zeros(int(round(gap_s * SAMPLE_RATE)), dtype=np.float32)

    def decode(self, codes) -> list[np.ndarray]:
        out = []
        for i, seq in enumerate(_as_lists(codes)):
            bad = [c for c in seq if c >= len(self.clips)]
            if bad:
                raise ValueError(f"clip {i}: word codes must be in [0, {len(self.clips)}), got {bad[0]}")
            parts = [p for c in seq for p in (self.gap, self.clips[c])][1:]  # gap between words only
            out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32))
        return out

    def encode(self, audios) -> list[list[int]]:
        """The exact inverse of decode, by matching its clips and gaps (longest word first). Audio that
        decode did not make (a recording) has no word codes: ValueError."""
        order, out = sorted(range(len(self.clips)), key=lambda k: -len(self.clips[k])), []
        for i, a in enumerate(_as_audio(audios)):
            p, seq = 0, []
            while p < len(a):
                g = len(self.gap) if seq else 0  # the gap before every word but the first
                k = None if a[p:p + g].any() else next(
                    (k for k in order if np.array_equal(a[p + g:p + g + len(self.clips[k])], self.clips[k])), None)
                if k is None:
                    raise ValueError(f"clip {i}: the word codec encodes only audio it decoded (its word clips joined "
                                     f"by gaps); no word matches at sample {p}. Voice prompts need --codec xcodec2")
                seq.append(k)
                p += g + len(self.clips[k])
            out.append(seq)
        return out

    def text(self, codes) -> list[str]:
        """What each code sequence says, as text (for reading samples)."""
        return [" ".join(self.words[c] for c in seq) for seq in _as_lists(codes)]


# ----------------------------------------------------------------------------- XCodec2 decoder

@dataclass(frozen=True)
class XCodec2Config:
    """Decoder shapes; the defaults are those of the published HKUSTAudio/xcodec2."""
    fsq_levels: tuple = (4, 4, 4, 4, 4, 4, 4, 4)  # one code = 8 digits in base 4
    vq_dim: int = 2048  # width of the FSQ's project_out (input of fc_post_a)
    hidden_dim: int = 1024
    depth: int = 12  # transformer blocks
    n_heads: int = 16
    hop_length: int = SAMPLES_PER_CODE  # samples per code; the ISTFT window is 4 hops


# A padding mask `m` [B, 1, T] (float, 1 = real frame) or None (no padding) goes to every step that mixes
# frames (convs, GroupNorm, attention, overlap-add), so a padded row decodes exactly as it would alone.

def _zero_padding(x, m):
    """x [B, C, T]: zero the padded frames, so that a conv sees zeros past a clip's end, as it would alone."""
    return x if m is None else x * m


def _group_norm(norm: nn.GroupNorm, x, m):
    """GroupNorm of x [B, C, T] with its statistics over the real frames only (all frames if m is None);
    written out rather than F.group_norm, which also refuses groups of one value (1 frame, 1 channel)."""
    B, C, T = x.shape
    xg = x.view(B, norm.num_groups, -1, T)  # [B, G, C/G, T]
    mg = (x.new_ones(1, 1, T) if m is None else m).view(-1, 1, 1, T)  # [B or 1, 1, 1, T]
    count = mg.sum(dim=(2, 3), keepdim=True) * xg.shape[2]  # values per group
    mean = (xg * mg).sum(dim=(2, 3), keepdim=True) / count
    var = ((xg - mean).square() * mg).sum(dim=(2, 3), keepdim=True) / count  # biased, as GroupNorm
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).view(B, C, T)
    return y * norm.weight[:, None] + norm.bias[:, None]


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), on [B, C, T]."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, dim, eps=1e-6)
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(32, dim, eps=1e-6)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x, m):
        h = self.conv1(_zero_padding(F.silu(_group_norm(self.norm1, x, m)), m))
        h = self.conv2(_zero_padding(F.silu(_group_norm(self.norm2, h, m)), m))
        return x + h


def _rotate_by_head(x):
    """x [B, H, T, D] -> x with torchtune's RoPE applied as the reference applies it: to [B, H, T, D] tensors,
    where torchtune expects [B, T, H, D], so the angle follows the head, not the time step. q and k of a head
    turn by the same angle, which cancels in q . k (no positional signal); kept to compute what it computes."""
    B, H, T, D = x.shape
    theta = 1.0 / (10000 ** (torch.arange(0, D, 2, device=x.device).float() / D))  # [D/2]
    angle = torch.arange(H, device=x.device).float()[:, None] * theta  # [H, D/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]  # [1, H, 1, D/2]
    x1, x2 = x.float().unflatten(-1, (D // 2, 2)).unbind(-1)  # interleaved pairs, [B, H, T, D/2] each
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).type_as(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.att_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.att = nn.ModuleDict(dict(c_attn=nn.Linear(dim, 3 * dim, False), c_proj=nn.Linear(dim, dim, False)))
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, 4 * dim, False), fc2=nn.Linear(4 * dim, dim, False)))

    def forward(self, x, key_mask):
        """x [B, T, C]; key_mask [B, 1, 1, T] bool (True = real frame) or None. Attention is bidirectional."""
        x = x + self.attend(self.att_norm(x), key_mask)  # its q, k, v freed before the MLP's peak
        h = self.ffn_norm(x)
        return x + self.mlp.fc2(F.silu(self.mlp.fc1(h)))

    def attend(self, h, key_mask):
        B, T, C = h.shape
        q, k, v = self.att.c_attn(h).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(_rotate_by_head(q), _rotate_by_head(k), v, attn_mask=key_mask)
        return self.att.c_proj(y.transpose(1, 2).reshape(B, T, C))  # [B, T, C]


def checkpoint_key(name: str) -> str:
    """Our parameter name -> its key in XCodec2's model.safetensors."""
    first, _, rest = name.partition(".")
    prefix = {"project_out": "generator.quantizer.project_out", "fc_post_a": "fc_post_a",
              "head": "generator.head.out"}.get(first, "generator.backbone." + first)
    return f"{prefix}.{rest}"


def transformers_keys(name: str) -> list[str]:
    """Our parameter name -> its key(s) in transformers' Xcodec2Model (HKUSTAudio/xcodec2-hf); c_attn is
    its q, k and v projections stacked, in that order."""
    first, _, rest = name.partition(".")
    if first == "transformers":
        i, _, rest = rest.partition(".")
        if rest == "att.c_attn.weight":
            return [f"acoustic_decoder.layers.{i}.self_attn.{x}_proj.weight" for x in "qkv"]
        rest = rest.replace("att_norm", "input_layernorm").replace("ffn_norm", "post_attention_layernorm")
        rest = rest.replace("att.c_proj", "self_attn.o_proj")
        return [f"acoustic_decoder.layers.{i}.{rest}"]
    prefix = {"project_out": "quantizer.project_out", "fc_post_a": "acoustic_decoder.fc",
              "head": "acoustic_decoder.head.linear", "final_layer_norm": "acoustic_decoder.norm"}
    return [f"{prefix.get(first, 'acoustic_decoder.' + first)}.{rest}"]


def _weights_file(path_or_id: str) -> str:
    """A local .safetensors file, a directory holding model.safetensors, or a Hugging Face Hub id."""
    path = os.path.join(path_or_id, "model.safetensors") if os.path.isdir(path_or_id) else path_or_id
    if os.path.isfile(path):
        return path
    if os.path.isdir(path_or_id) or path_or_id.endswith(".safetensors") or path_or_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"XCodec2 weights not found: {path}")
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(path_or_id, "model.safetensors")
    except Exception as e:
        raise OSError(f"could not get model.safetensors of {path_or_id!r} from the Hugging Face Hub ({e}). "
                      f"Download it once while online (`huggingface-cli download {path_or_id} model.safetensors`), "
                      f"or pass a local file or directory: --codec xcodec2:PATH") from e


class XCodec2Decoder(nn.Module):
    """XCodec2's decoding path: codes [B, 1, T] -> wav [B, 1, T * hop_length] at 16 kHz, float32. Equals
    `XCodec2Model.decode_code` of the xcodec2 package; `lengths` [B] (real codes per row, the rest being
    padding) makes each row's audio equal to that row decoded alone."""

    def __init__(self, config: XCodec2Config = XCodec2Config()):
        super().__init__()
        self.config = c = config
        self.project_out = nn.Linear(len(c.fsq_levels), c.vq_dim)  # FSQ level values -> vq_dim
        self.fc_post_a = nn.Linear(c.vq_dim, c.hidden_dim)
        self.embed = nn.Conv1d(c.hidden_dim, c.hidden_dim, kernel_size=7, padding=3)
        self.prior_net = nn.ModuleList([ResnetBlock(c.hidden_dim) for _ in range(2)])
        self.transformers = nn.ModuleList([TransformerBlock(c.hidden_dim, c.n_heads) for _ in range(c.depth)])
        self.post_net = nn.ModuleList([ResnetBlock(c.hidden_dim) for _ in range(2)])
        self.final_layer_norm = nn.LayerNorm(c.hidden_dim, eps=1e-6)
        self.head = nn.Linear(c.hidden_dim, 4 * c.hop_length + 2)  # log-magnitude and phase of 2 hop + 1 bins

    @classmethod
    def from_pretrained(cls, path_or_id: str = XCODEC2, config: XCodec2Config = XCodec2Config()):
        """Read only the decoder's tensors of an XCodec2 checkpoint (model.safetensors; file, dir or hub id),
        the original's (HKUSTAudio/xcodec2) or transformers' (HKUSTAudio/xcodec2-hf)."""
        from safetensors import safe_open
        file = _weights_file(path_or_id)
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            model = cls(config)
        state = {}
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name, p in model.state_dict().items():
                want = transformers_keys(name) if "acoustic_decoder.fc.weight" in keys else [checkpoint_key(name)]
                if missing := [k for k in want if k not in keys]:
                    raise KeyError(f"{file}: no tensor {missing[0]!r}; is this an XCodec2 checkpoint?")
                t, key = torch.cat([f.get_tensor(k) for k in want]), want[0]
                if t.shape != p.shape:
                    raise ValueError(f"{file}: {key} has shape {tuple(t.shape)} but the decoder expects "
                                     f"{tuple(p.shape)}: pass the XCodec2Config of this checkpoint")
                state[name] = t.float()
        model.load_state_dict(state, assign=True)
        return model.eval()

    def fsq_values(self, codes):
        """codes [B, T] ints -> [B, T, 8] level values: the FSQ's implicit codebook, digit i = level i."""
        levels = torch.tensor(self.config.fsq_levels, device=codes.device)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0)  # 1, 4, 16, ...
        digits = (codes[..., None] // basis) % levels  # [B, T, 8] in [0, level)
        half = levels // 2
        return (digits - half) / half  # FSQ's grid in [-1, 1): -1, -0.5, 0, 0.5 for 4 levels

    def forward(self, codes, lengths=None):
        """codes [B, 1, T] long; lengths [B] or None -> wav [B, 1, T * hop_length] float32."""
        codes = codes[:, 0]
        B, T = codes.shape
        x = self.fc_post_a(self.project_out(self.fsq_values(codes)))  # [B, T, C]
        mask = None if lengths is None else torch.arange(T, device=codes.device) < lengths.to(codes.device)[:, None]
        m = None if mask is None else mask[:, None, :].to(x.dtype)  # [B, 1, T]
        key_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, T]

        x = self.embed(_zero_padding(x.transpose(1, 2), m))  # [B, C, T]
        for block in self.prior_net:
            x = block(x, m)
        x = x.transpose(1, 2)  # [B, T, C]
        for block in self.transformers:
            x = block(x, key_mask)
        x = x.transpose(1, 2)
        for block in self.post_net:
            x = block(x, m)
        x = self.final_layer_norm(x.transpose(1, 2))  # [B, T, C]

        log_mag, phase = self.head(x).transpose(1, 2).chunk(2, dim=1)  # [B, 2 hop + 1, T] each
        spec = torch.polar(log_mag.exp().clamp(max=100.0), phase)  # magnitude capped as in the reference
        return self.istft(spec, m).unsqueeze(1)

    def istft(self, spec, m=None):
        """spec [B, N, T] complex -> [B, T * hop]: overlap-add of Hann-windowed frames with "same" padding
        (the reference's ISTFT; torch.istft only pads "center"), divided by the summed squared window."""
        hop = self.config.hop_length
        n_fft, T = 4 * hop, spec.shape[-1]
        window = torch.hann_window(n_fft, device=spec.device)
        frames = torch.fft.irfft(spec, n_fft, dim=1) * window[:, None]  # [B, n_fft, T]
        weights = window.square()[None, :, None].expand(1, n_fft, T)
        if m is not None:
            frames, weights = frames * m, weights * m

        def overlap_add(f):  # [B, n_fft, T] -> [B, T * hop], trimming (n_fft - hop) / 2 at each end
            pad = (n_fft - hop) // 2
            return F.fold(f, (1, (T - 1) * hop + n_fft), (1, n_fft), stride=(1, hop))[:, 0, 0, pad:-pad]

        return overlap_add(frames) / overlap_add(weights).clamp(min=1e-11)


PRECISIONS = ("tf32", "bf16", "fp32")


class XCodec2Codec:
    """XCodec2: decode through XCodec2Decoder (only the decoder's weights, no xcodec2 package), encode through
    transformers' Xcodec2Model. precision of decode on CUDA (a CPU computes in fp32, except "bf16"): "tf32"
    (default) fp32 weights with TF32 matmuls and convolutions, about 8x the strict-fp32 throughput of an
    H100's tensor cores at ~1e-3 relative error per product; "bf16" autocast, 2x more, 37 dB SNR against fp32
    (max error 0.0015 at a 0.09 peak, on the test file's and the full-size random decoder), TF32 off beside it;
    "fp32" strict: TF32 matmuls and convolutions off, whatever the process had set (`_numerics`, tf32.py:
    torch's fp32_precision settings where it has them, as transformers' enable_tf32 sets them)."""
    sample_rate = SAMPLE_RATE

    def __init__(self, model=XCODEC2, device="cpu", config: XCodec2Config = XCodec2Config(),
                 precision: str = "tf32", encoder=None):
        if precision not in PRECISIONS:
            raise ValueError(f"codec precision {precision!r}: expected one of {PRECISIONS}")
        self.device, self.precision = torch.device(device), precision
        decoder = model if isinstance(model, XCodec2Decoder) else XCodec2Decoder.from_pretrained(model, config)
        self.model = decoder.eval().to(self.device)
        own = model if isinstance(model, str) and model != XCODEC2 else XCODEC2_HF  # an -hf checkpoint serves both
        self.encoder = own if encoder is None else encoder  # an Xcodec2Model, or its hub id / dir: loaded on 1st use

    @torch.no_grad()
    def encode(self, audios) -> list[list[int]]:
        """transformers' Xcodec2Model.encode (w2v-bert-2.0 semantic encoder + acoustic encoder + FSQ), on its
        device, one clip at a time so that a clip's codes never depend on its batch. A clip of S samples is
        padded as Xcodec2FeatureExtractor pads it (at least one zero, to a multiple of 320: S // 320 + 1 codes)
        and keeps the codes the model marks valid (its audio_codes_mask): (S + 1) // 320 of them."""
        if isinstance(self.encoder, str):
            self.encoder = load_transformers_xcodec2(self.encoder, self.device)
        from transformers import SeamlessM4TFeatureExtractor  # Xcodec2FeatureExtractor's fbank, without torchaudio
        model, hop, fbank, out = self.encoder, self.encoder.config.hop_length, SeamlessM4TFeatureExtractor(), []
        for a in _as_audio(audios):
            wav = np.pad(a, (0, (len(a) // hop + 1) * hop - len(a)))  # [k * hop]
            feats = fbank(np.pad(wav, hop // 2), sampling_rate=SAMPLE_RATE, return_tensors="pt")
            x = torch.from_numpy(wav)[None, None].to(model.device, model.dtype)  # [1, 1, k * hop]
            codes = model.encode(x, feats["input_features"].to(model.device, model.dtype)).audio_codes  # [1, 1, k]
            out.append(codes[0, 0, :(len(a) + 1) // hop].tolist())
        return out

    @contextlib.contextmanager
    def _numerics(self):
        """The precision's settings for one decode, whatever the caller's, restored after (process-wide)."""
        tf32 = self.precision == "tf32" and self.device.type == "cuda"  # else strict fp32 (beside bf16's autocast)
        bf16 = self.precision == "bf16"
        with fp32_math(cuda_tf32=tf32), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            yield

    @torch.no_grad()
    def decode(self, codes) -> list[np.ndarray]:
        """All clips in one forward, right-padded; the padding is masked, so each clip sounds as alone."""
        seqs = _as_lists(codes)
        if not seqs:
            return []
        lengths = [len(s) for s in seqs]
        T = max(max(lengths), 1)
        batch = torch.tensor([s + [0] * (T - len(s)) for s in seqs], dtype=torch.long)[:, None]  # [B, 1, T], 0-padded
        # An empty clip decodes one padding frame (cut below) rather than none; no padding, no mask.
        frames = torch.tensor([max(n, 1) for n in lengths])
        with self._numerics():
            wav = self.model(batch.to(self.device), frames if int(frames.min()) < T else None)  # [B, 1, T * 320]
        wav = wav.float().cpu().numpy()
        return [wav[i, 0, :n * SAMPLES_PER_CODE].copy() for i, n in enumerate(lengths)]


def load_transformers_xcodec2(path_or_id: str = XCODEC2_HF, device="cpu"):
    """transformers' Xcodec2Model from a hub id or directory, whole (encode needs all of it), in eval mode."""
    import transformers
    if not hasattr(transformers, "Xcodec2Model"):
        raise ImportError(f"XCodec2 encode needs transformers >= 5.13 (Xcodec2Model); this is "
                          f"{transformers.__version__}: pip install -U 'transformers>=5.13'")
    hint = f"encode needs transformers' Xcodec2Model checkpoint {XCODEC2_HF} or a local copy (it decodes too)"
    try:
        model, info = transformers.Xcodec2Model.from_pretrained(path_or_id, output_loading_info=True)
    except Exception as e:
        raise OSError(f"could not load the XCodec2 encoder {path_or_id!r} ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0]}); {hint}: --codec xcodec2:PATH") from e
    if missing := sorted(info["missing_keys"]):  # e.g. the original HKUSTAudio/xcodec2 (its config.json: xcodec2)
        raise OSError(f"{path_or_id!r} is not a transformers Xcodec2Model checkpoint ({len(missing)} tensors "
                      f"missing, e.g. {missing[0]}); {hint}: --codec xcodec2:PATH")
    return model.eval().to(device)


class XCodec2PackageCodec:
    """XCodec2 through the `xcodec2` package (`XCodec2Model.decode_code`)."""
    sample_rate = SAMPLE_RATE

    def __init__(self, model: str = XCODEC2, device="cpu"):
        try:
            from xcodec2.modeling_xcodec2 import XCodec2Model
        except ImportError as e:
            raise ImportError(
                "codec 'xcodec2-package' needs the xcodec2 package. It pins torch==2.5.0; to keep your torch, install "
                "it with `pip install xcodec2 --no-deps` and then its needs by hand (vector-quantize-pytorch, einops, "
                "torchtune, torchao). Or use --codec xcodec2, which needs none of them.") from e
        self.device = torch.device(device)
        self.model = XCodec2Model.from_pretrained(model).eval().to(self.device)

    @torch.no_grad()
    def decode(self, codes) -> list[np.ndarray]:
        """One clip at a time: decode_code has no padding mask, so padding would change shorter clips."""
        clips = []
        for seq in _as_lists(codes):
            batch = torch.tensor(seq or [0], dtype=torch.long, device=self.device)[None, None]  # [1, 1, T]
            wav = self.model.decode_code(batch)[0, 0].float().cpu().numpy()  # [T * 320]
            clips.append(wav[:len(seq) * SAMPLES_PER_CODE])
        return clips

    @torch.no_grad()
    def encode(self, audios) -> list[list[int]]:
        """The package's encode_code, one clip at a time, cut as XCodec2Codec.encode: (S + 1) // 320 codes."""
        return [self.model.encode_code(torch.from_numpy(a)[None].to(self.device)).reshape(-1)
                [:(len(a) + 1) // SAMPLES_PER_CODE].tolist() for a in _as_audio(audios)]


def load_codec(name: str, device="cpu", precision: str = "tf32"):
    """'tone', 'words[:PATH]' (the demo's spoken words, default data/demo/words.npz), 'xcodec2[:PATH_OR_HUB_ID]'
    (ours, computing in `precision` on CUDA: XCodec2Codec) or 'xcodec2-package[:PATH_OR_HUB_ID]' (the
    xcodec2 package)."""
    kind, _, path = name.partition(":")
    if name == "tone":
        return ToneCodec()
    if kind == "words":
        return WordCodec(path or WORDS_FILE)
    if kind == "xcodec2":
        return XCodec2Codec(path or XCODEC2, device, precision=precision)
    if kind == "xcodec2-package":
        return XCodec2PackageCodec(path or XCODEC2, device)
    raise ValueError(f"unknown codec {name!r}: expected 'tone', 'words[:PATH]', 'xcodec2[:PATH]' or "
                     "'xcodec2-package[:PATH]'")
