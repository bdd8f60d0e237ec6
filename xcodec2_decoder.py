"""XCodec2's decoder in plain PyTorch (codes -> 16 kHz audio), its weights read from a checkpoint.

XCodec2Decoder reproduces `XCodec2Model.decode_code` of the xcodec2 package (v0.1.5): FSQ code ->
8 level values -> project_out -> fc_post_a -> Vocos backbone (conv, 2 ResNet blocks, 12 transformer
blocks, 2 ResNet blocks, LayerNorm) -> linear head to a magnitude/phase spectrum -> ISTFT. Its
attention is bidirectional and its GroupNorms pool over time, so plain right-padding would change
the audio of the shorter clips of a batch: given the clip lengths, the decoder keeps padded frames
out of every step that mixes frames. (The module is not named xcodec2.py: that would shadow the
xcodec2 package, which codec.py's "xcodec2-package" imports.)
"""

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

XCODEC2 = "HKUSTAudio/xcodec2"  # the original checkpoint
XCODEC2_HF = "HKUSTAudio/xcodec2-hf"  # transformers' checkpoint: the decoder and the encoder


@dataclass(frozen=True)
class XCodec2Config:
    """Decoder shapes; the defaults are those of the published HKUSTAudio/xcodec2."""

    fsq_levels: tuple = (4, 4, 4, 4, 4, 4, 4, 4)  # one code = 8 digits in base 4
    vq_dim: int = 2048  # width of the FSQ's project_out (input of fc_post_a)
    hidden_dim: int = 1024
    depth: int = 12  # transformer blocks
    n_heads: int = 16
    hop_length: int = 320  # samples per code (codec.SAMPLES_PER_CODE); the ISTFT window is 4 hops


# A padding mask `m` [B, 1, T] (float, 1 = real frame) or None (no padding) goes to every step that
# mixes frames (convs, GroupNorm, attention, overlap-add), so a padded row decodes as if alone.


def _zero_padding(x, m):
    """x [B, C, T]: zero the padded frames, so a conv sees zeros past a clip's end, as if alone."""
    return x if m is None else x * m


def _group_norm(norm: nn.GroupNorm, x, m):
    """GroupNorm of x [B, C, T] with its statistics over the real frames only (all frames if m is
    None); written out rather than F.group_norm, which also refuses groups of one value (1 frame,
    1 channel)."""
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
    """x [B, H, T, D] -> x with torchtune's RoPE applied as the reference applies it: to
    [B, H, T, D] tensors, where torchtune expects [B, T, H, D], so the angle follows the head, not
    the time step. q and k of a head turn by the same angle, which cancels in q . k (no positional
    signal); kept to compute what the reference computes."""
    H = x.shape[1]  # heads
    D = x.shape[3]  # head dim
    theta = 1.0 / (10000 ** (torch.arange(0, D, 2, device=x.device).float() / D))  # [D/2]
    angle = torch.arange(H, device=x.device).float()[:, None] * theta  # [H, D/2]
    cos = angle.cos()[None, :, None]  # [1, H, 1, D/2]
    sin = angle.sin()[None, :, None]
    pairs = x.float().unflatten(-1, (D // 2, 2))  # interleaved pairs, [B, H, T, D/2, 2]
    x1, x2 = pairs.unbind(-1)  # [B, H, T, D/2] each
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).type_as(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.att_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.att = nn.ModuleDict(
            dict(c_attn=nn.Linear(dim, 3 * dim, False), c_proj=nn.Linear(dim, dim, False))
        )
        self.mlp = nn.ModuleDict(
            dict(fc1=nn.Linear(dim, 4 * dim, False), fc2=nn.Linear(4 * dim, dim, False))
        )

    def forward(self, x, key_mask):
        """x [B, T, C]; key_mask [B, 1, 1, T] bool (True = real frame) or None. Attention is
        bidirectional."""
        x = x + self.attend(self.att_norm(x), key_mask)  # its q, k, v freed before the MLP's peak
        h = self.ffn_norm(x)
        return x + self.mlp.fc2(F.silu(self.mlp.fc1(h)))

    def attend(self, h, key_mask):
        B, T, C = h.shape
        qkv = self.att.c_attn(h).view(B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, T, D] each
        q = _rotate_by_head(q)
        k = _rotate_by_head(k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [B, H, T, D]
        return self.att.c_proj(y.transpose(1, 2).reshape(B, T, C))  # [B, T, C]


def checkpoint_key(name: str) -> str:
    """Our parameter name -> its key in XCodec2's model.safetensors."""
    first, _, rest = name.partition(".")
    prefix = {
        "project_out": "generator.quantizer.project_out",
        "fc_post_a": "fc_post_a",
        "head": "generator.head.out",
    }.get(first, "generator.backbone." + first)
    return f"{prefix}.{rest}"


def transformers_keys(name: str) -> list[str]:
    """Our parameter name -> its key(s) in transformers' Xcodec2Model (HKUSTAudio/xcodec2-hf);
    c_attn is its q, k and v projections stacked, in that order."""
    first, _, rest = name.partition(".")
    if first == "transformers":
        i, _, rest = rest.partition(".")
        if rest == "att.c_attn.weight":
            return [f"acoustic_decoder.layers.{i}.self_attn.{x}_proj.weight" for x in "qkv"]
        rest = rest.replace("att_norm", "input_layernorm")
        rest = rest.replace("ffn_norm", "post_attention_layernorm")
        rest = rest.replace("att.c_proj", "self_attn.o_proj")
        return [f"acoustic_decoder.layers.{i}.{rest}"]
    prefix = {
        "project_out": "quantizer.project_out",
        "fc_post_a": "acoustic_decoder.fc",
        "head": "acoustic_decoder.head.linear",
        "final_layer_norm": "acoustic_decoder.norm",
    }
    return [f"{prefix.get(first, 'acoustic_decoder.' + first)}.{rest}"]


def _weights_file(path_or_id: str) -> str:
    """A local .safetensors file, a directory holding model.safetensors, or a Hugging Face Hub
    id -> the path of the file (downloaded for a hub id)."""
    if os.path.isdir(path_or_id):
        path = os.path.join(path_or_id, "model.safetensors")
    else:
        path = path_or_id
    if os.path.isfile(path):
        return path
    local = os.path.isdir(path_or_id) or path_or_id.endswith(".safetensors")
    if local or path_or_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"XCodec2 weights not found: {path}")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path_or_id, "model.safetensors")
    except Exception as e:
        raise OSError(
            f"could not get model.safetensors of {path_or_id!r} from the Hugging Face Hub ({e}). "
            "Download it once while online "
            f"(`huggingface-cli download {path_or_id} model.safetensors`), "
            f"or pass a local file or directory: --codec xcodec2:PATH"
        ) from e


class XCodec2Decoder(nn.Module):
    """XCodec2's decoding path: codes [B, 1, T] -> wav [B, 1, T * hop_length] at 16 kHz, float32.
    Equals `XCodec2Model.decode_code` of the xcodec2 package; `lengths` [B] (real codes per row, the
    rest being padding) makes each row's audio equal to that row decoded alone."""

    def __init__(self, config: XCodec2Config = XCodec2Config()):
        super().__init__()
        self.config = config
        c = config
        self.project_out = nn.Linear(len(c.fsq_levels), c.vq_dim)  # FSQ level values -> vq_dim
        self.fc_post_a = nn.Linear(c.vq_dim, c.hidden_dim)
        self.embed = nn.Conv1d(c.hidden_dim, c.hidden_dim, kernel_size=7, padding=3)
        self.prior_net = nn.ModuleList([ResnetBlock(c.hidden_dim) for _ in range(2)])
        self.transformers = nn.ModuleList(
            [TransformerBlock(c.hidden_dim, c.n_heads) for _ in range(c.depth)]
        )
        self.post_net = nn.ModuleList([ResnetBlock(c.hidden_dim) for _ in range(2)])
        self.final_layer_norm = nn.LayerNorm(c.hidden_dim, eps=1e-6)
        # log-magnitude and phase of 2 hop + 1 frequency bins
        self.head = nn.Linear(c.hidden_dim, 4 * c.hop_length + 2)

    @classmethod
    def from_pretrained(cls, path_or_id: str = XCODEC2, config: XCodec2Config = XCodec2Config()):
        """Read only the decoder's tensors of an XCodec2 checkpoint (model.safetensors; file, dir or
        hub id), the original's (HKUSTAudio/xcodec2) or transformers' (HKUSTAudio/xcodec2-hf)."""
        from safetensors import safe_open

        file = _weights_file(path_or_id)
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            model = cls(config)
        state = {}
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            is_transformers = "acoustic_decoder.fc.weight" in keys
            for name, p in model.state_dict().items():
                if is_transformers:
                    want = transformers_keys(name)
                else:
                    want = [checkpoint_key(name)]
                if missing := [k for k in want if k not in keys]:
                    raise KeyError(
                        f"{file}: no tensor {missing[0]!r}; is this an XCodec2 checkpoint?"
                    )
                t = torch.cat([f.get_tensor(k) for k in want])
                key = want[0]
                if t.shape != p.shape:
                    raise ValueError(
                        f"{file}: {key} has shape {tuple(t.shape)} but the decoder expects "
                        f"{tuple(p.shape)}: pass the XCodec2Config of this checkpoint"
                    )
                state[name] = t.float()
        model.load_state_dict(state, assign=True)
        return model.eval()

    def fsq_values(self, codes):
        """codes [B, T] ints -> [B, T, 8] level values: the FSQ's implicit codebook, digit i =
        level i."""
        levels = torch.tensor(self.config.fsq_levels, device=codes.device)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0)  # 1, 4, 16, ...
        digits = (codes[..., None] // basis) % levels  # [B, T, 8] in [0, level)
        half = levels // 2
        return (digits - half) / half  # FSQ's grid in [-1, 1): -1, -0.5, 0, 0.5 for 4 levels

    def forward(self, codes, lengths=None):
        """codes [B, 1, T] long; lengths [B] or None -> wav [B, 1, T * hop_length] float32."""
        codes = codes[:, 0]  # [B, T]
        T = codes.shape[1]
        x = self.fc_post_a(self.project_out(self.fsq_values(codes)))  # [B, T, C]
        if lengths is None:
            m = None
            key_mask = None
        else:
            mask = (
                torch.arange(T, device=codes.device) < lengths.to(codes.device)[:, None]
            )  # [B, T]
            m = mask[:, None, :].to(x.dtype)  # [B, 1, T]
            key_mask = mask[:, None, None, :]  # [B, 1, 1, T]

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
        spec = torch.polar(
            log_mag.exp().clamp(max=100.0), phase
        )  # magnitude capped as the reference
        return self.istft(spec, m).unsqueeze(1)

    def istft(self, spec, m=None):
        """spec [B, N, T] complex -> [B, T * hop]: overlap-add of Hann-windowed frames with "same"
        padding (the reference's ISTFT; torch.istft only pads "center"), divided by the summed
        squared window."""
        hop = self.config.hop_length
        n_fft = 4 * hop
        T = spec.shape[-1]
        window = torch.hann_window(n_fft, device=spec.device)
        frames = torch.fft.irfft(spec, n_fft, dim=1) * window[:, None]  # [B, n_fft, T]
        weights = window.square()[None, :, None].expand(1, n_fft, T)
        if m is not None:
            frames = frames * m
            weights = weights * m

        def overlap_add(f):  # [B, n_fft, T] -> [B, T * hop], trimming (n_fft - hop) / 2 at each end
            pad = (n_fft - hop) // 2
            folded = F.fold(
                f, (1, (T - 1) * hop + n_fft), (1, n_fft), stride=(1, hop)
            )  # [B, 1, 1, L]
            return folded[:, 0, 0, pad:-pad]

        return overlap_add(frames) / overlap_add(weights).clamp(min=1e-11)
