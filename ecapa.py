"""Seed-TTS-eval's SIM network in plain torch: WavLM-large and its ECAPA-TDNN head.

wavlm_large_finetune.pth holds UniSpeech's ECAPA_TDNN_SMALL(feat_dim=1024, feat_type='wavlm_large'):
an s3prl WavLM, whose weights wavlm_from_unispeech maps onto transformers' WavLMModel, and the
ECAPA-TDNN head, ECAPAHead here, with the reference's key names. The head runs on padded batches:
every step (convolutions, instance norm, squeeze-excitation, pooling) sees zeros or a mask past a
clip's end, so each clip gets the embedding it gets alone. speaker.load_seed_tts_sim joins the two.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# UniSpeech/s3prl WavLM name -> transformers WavLMModel name (by substring, in order)
_RENAMES = [
    (".self_attn.grep_linear.", ".attention.gru_rel_pos_linear."),
    (".self_attn.grep_a", ".attention.gru_rel_pos_const"),
    (".self_attn.relative_attention_bias.", ".attention.rel_attn_embed."),
    (".self_attn.", ".attention."),
    (".self_attn_layer_norm.", ".layer_norm."),
    (".fc1.", ".feed_forward.intermediate_dense."),
    (".fc2.", ".feed_forward.output_dense."),
    (
        "encoder.pos_conv.0.weight_g",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    ),
    (
        "encoder.pos_conv.0.weight_v",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    ),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("post_extract_proj.", "feature_projection.projection."),
]
# Checkpoint weights that only pre-training used: left out
_UNUSED = ("mask_emb", "label_embs_concat", "final_proj.", "project_q.", "quantizer.")


def wavlm_from_unispeech(state: dict, source: str = "checkpoint"):
    """A transformers WavLMModel holding a UniSpeech/s3prl WavLM state dict, its config read from
    the shapes. Every weight of the model must come from `state`: a missing one is a ValueError
    naming `source`."""
    from transformers import WavLMConfig, WavLMModel

    convs = sorted(
        int(k.split(".")[2])
        for k in state
        if k.startswith("feature_extractor.conv_layers.") and k.endswith(".0.weight")
    )
    conv_w = [state[f"feature_extractor.conv_layers.{i}.0.weight"] for i in convs]
    layer_norm = "feature_extractor.conv_layers.0.2.1.weight" in state
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    bias = state["encoder.layers.0.self_attn.relative_attention_bias.weight"]  # [buckets, heads]
    pos = state["encoder.pos_conv.0.weight_v"]  # [H, H / groups, kernel]
    hidden = state["post_extract_proj.weight"].shape[0]
    config = WavLMConfig(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=bias.shape[1],
        intermediate_size=state["encoder.layers.0.fc1.weight"].shape[0],
        num_buckets=bias.shape[0],
        conv_dim=tuple(w.shape[0] for w in conv_w),
        conv_kernel=tuple(w.shape[2] for w in conv_w),
        conv_stride=(5,) + (2,) * (len(conv_w) - 1),
        num_feat_extract_layers=len(conv_w),
        conv_bias="feature_extractor.conv_layers.0.0.bias" in state,
        feat_extract_norm="layer" if layer_norm else "group",
        do_stable_layer_norm=layer_norm,
        num_conv_pos_embeddings=pos.shape[2],
        num_conv_pos_embedding_groups=hidden // pos.shape[1],
        mask_time_prob=0.0,
        layerdrop=0.0,
    )
    mapped = {}  # transformers name -> tensor
    unused = []  # checkpoint names
    for key, value in state.items():
        new = key
        if key.startswith("feature_extractor.conv_layers."):
            # feature_extractor.conv_layers.{i}.{part}.{rest}: part 0 the conv, 2 its layer norm
            fields = key.split(".", 4)
            i = fields[2]
            part = fields[3]
            rest = fields[4]
            if part == "0":
                new = f"feature_extractor.conv_layers.{i}.conv.{rest}"
            elif part == "2":
                new = f"feature_extractor.conv_layers.{i}.layer_norm.{rest.split('.')[-1]}"
            else:
                new = None
        elif key.startswith("layer_norm."):
            new = "feature_projection." + key
        else:
            for old, renamed in _RENAMES:
                new = new.replace(old, renamed)
        if new is None or key.startswith(_UNUSED):
            unused.append(key)
        else:
            mapped[new] = value.float()
    with torch.random.fork_rng(devices=[]):
        model = WavLMModel(config)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: the WavLM weights do not fit transformers' WavLMModel "
            f"(missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]})"
        )
    unknown = [k for k in unused if not k.startswith(_UNUSED)]
    if unknown:
        warnings.warn(f"{source}: WavLM weights not used: {unknown[:8]}", stacklevel=2)
    return model.eval()


class ECAPAHead(nn.Module):
    """Seed-TTS-eval's ECAPA-TDNN (UniSpeech's ecapa_tdnn.ECAPA_TDNN, channels [C] * 4 + [1536])
    on WavLM's hidden states, over padded batches: softmax-weighted layer sum, + 1e-6, instance
    norm, Conv-ReLU-BN (k 5), three SE-Res2Blocks (k 3, dilations 2, 3, 4, scale 8), 1x1 conv of
    their concatenation, attentive statistics pooling, BN, linear. Its state dict has the
    reference's key names. forward(states, lengths): states, one [B, T, D] per WavLM layer input
    and output; lengths [B], the clips' frame counts -> embeddings [B, emb_dim]."""

    min_frames = 1

    def __init__(
        self,
        n_states,
        feat_dim,
        channels=512,
        mfa_channels=1536,
        emb_dim=256,
        scale=8,
        se_dim=128,
        attention_dim=128,
    ):
        super().__init__()
        self.feature_weight = nn.Parameter(torch.zeros(n_states))
        self.layer1 = _ConvReluBn(feat_dim, channels, kernel=5)
        self.layer2 = _SERes2Block(channels, 2, scale, se_dim)  # dilation 2
        self.layer3 = _SERes2Block(channels, 3, scale, se_dim)
        self.layer4 = _SERes2Block(channels, 4, scale, se_dim)
        self.conv = nn.Conv1d(3 * channels, mfa_channels, kernel_size=1)
        self.pooling = _AttentiveStatsPool(mfa_channels, attention_dim)
        self.bn = nn.BatchNorm1d(2 * mfa_channels)
        self.linear = nn.Linear(2 * mfa_channels, emb_dim)

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "checkpoint") -> "ECAPAHead":
        """The head of a checkpoint, its sizes read from the shapes; every key must fit (else
        ValueError naming `source`)."""
        res2_convs = [
            k
            for k in state
            if k.startswith("layer2.Res2Conv1dReluBn.convs.") and k.endswith(".weight")
        ]
        try:
            first = state["layer1.conv.weight"]  # [channels, feat_dim, 5]
            head = cls(
                n_states=state["feature_weight"].numel(),
                feat_dim=first.shape[1],
                channels=first.shape[0],
                mfa_channels=state["conv.weight"].shape[0],
                emb_dim=state["linear.weight"].shape[0],
                scale=1 + len(res2_convs),
                se_dim=state["layer2.SE_Connect.linear1.weight"].shape[0],
                attention_dim=state["pooling.linear1.weight"].shape[0],
            )
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            for key, value in head.state_dict().items():
                if key.endswith("num_batches_tracked"):  # BatchNorm's counter, unused in eval
                    state.setdefault(key, value)
            head.load_state_dict(state)
        except (KeyError, RuntimeError) as e:
            raise ValueError(
                f"{source}: not Seed-TTS-eval's ECAPA-TDNN head ({type(e).__name__}: {e})"
            ) from None
        return head.eval()

    def forward(self, states, lengths):
        T = states[0].shape[1]
        mask = torch.arange(T, device=lengths.device)[None] < lengths[:, None]  # [B, T]
        m = mask[:, None].to(states[0].dtype)  # [B, 1, T]
        weights = F.softmax(self.feature_weight, dim=-1)  # [L]
        x = (torch.stack(states) * weights.view(-1, 1, 1, 1)).sum(0)  # [B, T, D]
        x = x.transpose(1, 2) + 1e-6  # [B, D, T]
        n = m.sum(2, keepdim=True)  # [B, 1, 1] frames
        mean = (x * m).sum(2, keepdim=True) / n  # instance norm over each clip's own frames
        var = (((x - mean) * m) ** 2).sum(2, keepdim=True) / n
        x = (x - mean) / torch.sqrt(var + 1e-5) * m
        out1 = self.layer1(x) * m
        out2 = self.layer2(out1, m)
        out3 = self.layer3(out2, m)
        out4 = self.layer4(out3, m)
        out = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.linear(self.bn(self.pooling(out * m, mask)))


class _ConvReluBn(nn.Module):
    def __init__(self, cin, cout, kernel=1, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(
            cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation
        )
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):  # x: zero past each clip's end, as the reference's zero padding
        return self.bn(F.relu(self.conv(x)))


class _SERes2Block(nn.Module):
    def __init__(self, channels, dilation, scale, se_dim):
        super().__init__()
        self.Conv1dReluBn1 = _ConvReluBn(channels, channels)
        self.Res2Conv1dReluBn = _Res2(channels, dilation, scale)
        self.Conv1dReluBn2 = _ConvReluBn(channels, channels)
        self.SE_Connect = _SqueezeExcite(channels, se_dim)

    def forward(self, x, m):
        h = self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x), m))
        return (self.SE_Connect(h, m) + x) * m


class _Res2(nn.Module):
    """Res2Net's hierarchical split: chunk i (after the first) gets conv(chunk i + output i - 1);
    the last chunk passes through."""

    def __init__(self, channels, dilation, scale, kernel=3):
        super().__init__()
        self.width = channels // scale
        self.n = scale if scale == 1 else scale - 1  # chunks convolved
        pad = dilation * (kernel - 1) // 2
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel, padding=pad, dilation=dilation)
            for _ in range(self.n)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(self.n))

    def forward(self, x, m):
        chunks = torch.split(x, self.width, dim=1)
        out = []
        h = None
        for i in range(self.n):
            h = chunks[i] if i == 0 else h + chunks[i]
            h = self.bns[i](F.relu(self.convs[i](h * m)))
            out.append(h)
        return torch.cat(out + list(chunks[self.n :]), dim=1)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels, bottleneck):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x, m):
        s = (x * m).sum(2) / m.sum(2)  # the mean over the clip's own frames
        return x * torch.sigmoid(self.linear2(F.relu(self.linear1(s))))[..., None]


class _AttentiveStatsPool(nn.Module):
    def __init__(self, channels, attention_dim):
        super().__init__()
        self.linear1 = nn.Conv1d(channels, attention_dim, kernel_size=1)
        self.linear2 = nn.Conv1d(attention_dim, channels, kernel_size=1)

    def forward(self, x, mask):
        logits = self.linear2(torch.tanh(self.linear1(x)))  # [B, C, T]
        logits = logits.masked_fill(~mask[:, None], float("-inf"))  # no weight on padding
        alpha = torch.softmax(logits, dim=2)
        mean = (alpha * x).sum(2)
        std = torch.sqrt(((alpha * x * x).sum(2) - mean**2).clamp(min=1e-9))
        return torch.cat([mean, std], dim=1)
