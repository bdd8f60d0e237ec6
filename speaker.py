"""Speaker similarity: how much a generated clip sounds like its voice prompt (DESIGN.md §2).

sim = cosine of two speaker embeddings, generated clip vs prompt audio, in [-1, 1]. A speaker
model (load_speaker_model) is one of:
  "wavlm-sv"        transformers' WavLMForXVector, microsoft/wavlm-base-plus-sv (the default);
                    "wavlm-sv:PATH" a local copy (save_pretrained directory, feature extractor too)
  "PATH.pth"        Seed-TTS-eval's SIM model, wavlm_large_finetune.pth: WavLM-large (transformers'
                    WavLMModel, weights mapped from the checkpoint's feature_extract.model.* keys)
                    and the ECAPA-TDNN head written here (ECAPAHead), so that figures follow the
                    published SIM protocol
  "module:function" function(audio float32 [S] at 16 kHz) -> 1-D embedding
  "random-tiny"     a seeded random tiny WavLMForXVector, for offline smoke runs
Both WavLM models embed a batch at once and give each clip the embedding it gets alone: the conv
front end runs clip by clip (wavlm-base-plus's GroupNorm would mix padding into a clip's features),
the transformer on the padded batch with its attention mask, and every later step (TDNN, ECAPA's
convolutions, instance norm, squeeze-excitation, pooling) sees zeros or a mask past a clip's end.
SpeakerSimilarity is what the scorers use: prompt embeddings cached by content, silence 0.0.
"""
import collections
import hashlib
import math
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reward import import_function

SAMPLE_RATE = 16000
WAVLM_SV = "microsoft/wavlm-base-plus-sv"
SEED_TTS_SIM_CHECKPOINT = "https://drive.google.com/file/d/1-aE1NfzpRCLxA4GUxX9ITI3F9LlbtEGP"
_WAVLM = "feature_extract.model."  # the WavLM in Seed-TTS-eval's ECAPA_TDNN (s3prl's UpstreamExpert.model)


def load_speaker_model(spec, device="cpu", *, batch_size=16) -> "SpeakerModel":
    """The speaker model of `spec` (see the module docstring) on `device`; a SpeakerModel passes
    through. A model that cannot be found or downloaded is one FileNotFoundError naming it."""
    if isinstance(spec, SpeakerModel):
        return spec
    kw = dict(device=device, batch_size=batch_size)
    if spec == "random-tiny":
        return xvector_speaker(*random_wavlm_sv(), name=spec, **kw)
    if isinstance(spec, str) and (spec == "wavlm-sv" or spec.startswith("wavlm-sv:")):
        return xvector_speaker(*_from_pretrained(spec, spec.partition(":")[2] or WAVLM_SV), name=spec, **kw)
    if isinstance(spec, str) and spec.endswith(".pth"):
        return load_seed_tts_sim(spec, **kw)
    if isinstance(spec, str) and ":" in spec and not os.path.exists(spec):
        return FunctionSpeaker(spec)
    raise ValueError(f"speaker model {spec!r} is not 'wavlm-sv', 'wavlm-sv:PATH', a .pth checkpoint "
                     "(Seed-TTS-eval's wavlm_large_finetune.pth), 'module:function' or 'random-tiny'")


def similarity(a, b) -> torch.Tensor:
    """Cosine similarity of embeddings a and b along their last dimension ([D] -> a 0-d tensor,
    [N, D] -> [N]), in float64 and clamped to [-1, 1]; a zero embedding has similarity 0."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return F.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)


class SpeakerModel:
    """embed(audios) -> float32 [N, D] on the CPU, one row per float32 16 kHz clip. Clips shorter
    than min_samples cannot be embedded (SpeakerSimilarity does not send them)."""
    name, min_samples = "speaker model", 1

    def embed(self, audios) -> torch.Tensor:
        raise NotImplementedError


class SpeakerSimilarity:
    """sims(clips, prompts): one sim per clip, in [-1, 1], or None where the clip or its prompt is
    None. Prompt embeddings are cached by content (sha1 of the float32 samples; up to cache_size
    prompts): the same prompt, sent with every clip of its group and at every step, is embedded
    once. Each call embeds its new prompts and its clips in one model.embed call.

    Silence has no voice: a clip that is empty, all zeros or too short for the model (under
    model.min_samples, e.g. 0.33 s for wavlm-sv) gets sim 0.0, counted like any clip, without
    running the model (the policy's silence is an answer elsewhere too: CER 1). A prompt that
    cannot be embedded (silent or too short) gives its clips sim None, with one warning."""

    def __init__(self, model: SpeakerModel, cache_size: int = 4096):
        self.model, self.cache_size = model, cache_size
        self._cache = collections.OrderedDict()  # sha1 -> embedding [D], or None (unusable prompt)

    def sims(self, clips, prompts) -> list:
        if len(clips) != len(prompts):
            raise ValueError(f"got {len(clips)} clips and {len(prompts)} prompts; they must match 1 to 1")
        keys = [None if p is None else _content_key(p) for p in prompts]
        known = {key: self._cache[key] for key in keys if key in self._cache}  # prompt key -> embedding
        new, batch = {}, []  # new prompt keys -> their row in the one batch embedded
        for key, prompt in zip(keys, prompts):
            if key is None or key in known or key in new:
                continue
            if self._hearable(prompt):
                new[key] = len(batch)
                batch.append(np.asarray(prompt, np.float32))
            else:
                warnings.warn(f"a voice prompt of {len(prompt)} samples is silent or shorter than "
                              f"{self.model.name}'s {self.model.min_samples}: its clips get no sim")
                self._remember(key, known.setdefault(key, None))
        out, rows = [None] * len(clips), {}  # rows: clip index -> its row in the batch
        for i, (clip, key) in enumerate(zip(clips, keys)):
            if clip is None or key is None or known.get(key, True) is None:
                continue  # no clip, no prompt, or a prompt with no voice to compare with
            if self._hearable(clip):
                rows[i] = len(batch)
                batch.append(np.asarray(clip, np.float32))
            else:
                out[i] = 0.0
        embeddings = self.model.embed(batch) if batch else None
        for key in known:
            self._cache.move_to_end(key)  # least recently used first out
        for key, row in new.items():
            self._remember(key, known.setdefault(key, embeddings[row].clone()))  # not a view of the batch
        for i, row in rows.items():
            out[i] = float(similarity(embeddings[row], known[keys[i]]))
        return out

    def _hearable(self, audio) -> bool:
        return len(audio) >= self.model.min_samples and bool(np.any(audio))

    def _remember(self, key, embedding):
        self._cache[key] = embedding
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def _content_key(audio) -> str:
    return hashlib.sha1(np.ascontiguousarray(audio, np.float32).tobytes()).hexdigest()


class FunctionSpeaker(SpeakerModel):
    """A user's embedding, spec "module:function": function(audio float32 [S] at 16 kHz) -> 1-D
    embedding (numpy array, tensor or list), the same length for every clip."""

    def __init__(self, spec: str):
        self.function, self.name = import_function(spec, "speaker model"), spec

    def embed(self, audios) -> torch.Tensor:
        rows = []
        for audio in audios:
            row = torch.as_tensor(np.asarray(self.function(np.asarray(audio, np.float32)), np.float32))
            ok = row.ndim == 1 and len(row) and (not rows or row.shape == rows[0].shape)
            if not ok or not row.isfinite().all():
                raise ValueError(f"speaker model {self.name} returned an embedding of shape "
                                 f"{tuple(row.shape)}: expected one finite 1-D vector, one length for all")
            rows.append(row)
        return torch.stack(rows) if rows else torch.zeros(0, 0)


class WavLMSpeaker(SpeakerModel):
    """A WavLM (transformers' WavLMModel) and a head on its hidden states: XVectorHead (wavlm-sv)
    or ECAPAHead (Seed-TTS-eval). prepare(audio float32 numpy) -> the model's input samples (the
    feature extractor's normalization, or s3prl's layer norm of the whole clip). A batch holds at
    most batch_size clips and max_frames2 padded frames squared (its attention maps: WavLM-large's
    are about 16 heads x 4 bytes x that per layer, a few copies at its peak)."""
    max_frames2 = 4 * 1500 ** 2  # four 30 s clips, or 36 of 10 s

    def __init__(self, wavlm, head, prepare, *, device="cpu", batch_size=16, name="wavlm"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.batch_size, self.name = torch.device(device), batch_size, name
        self.prepare, self.stride = prepare, math.prod(wavlm.config.conv_stride)  # samples per frame
        self.wavlm = wavlm.to(self.device).eval().requires_grad_(False)
        self.head = head.to(self.device).eval().requires_grad_(False)
        receptive = 1  # samples one frame of the conv front end sees
        for kernel, stride in reversed(list(zip(wavlm.config.conv_kernel, wavlm.config.conv_stride))):
            receptive = (receptive - 1) * stride + kernel
        self.min_samples = receptive + (head.min_frames - 1) * self.stride

    @torch.inference_mode()
    def embed(self, audios) -> torch.Tensor:
        order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))  # similar lengths: little padding
        out, chunks = {}, []
        for i in order:  # a chunk's first clip is its longest
            last = chunks[-1] if chunks else []
            frames = len(audios[last[0]]) // self.stride + 1 if last else 0
            if not last or len(last) == self.batch_size or (len(last) + 1) * frames ** 2 > self.max_frames2:
                chunks.append(last := [])
            last.append(i)
        for chunk in chunks:
            inputs = [torch.as_tensor(np.asarray(self.prepare(np.asarray(audios[i], np.float32)),
                                                 np.float32), device=self.device) for i in chunk]
            with warnings.catch_warnings():  # transformers' bool padding mask beside its float position bias
                warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
                states, lengths = wavlm_hidden_states(self.wavlm, inputs)
            out.update(zip(chunk, self.head(states, lengths).float().cpu()))
        return torch.stack([out[i] for i in range(len(audios))]) if out else torch.zeros(0, 0)


def wavlm_hidden_states(wavlm, inputs):
    """The hidden states of a transformers WavLMModel for clips of different lengths, in one
    transformer pass: (list of [B, T, H], one per layer input and the encoder's output, as s3prl's
    hooks record them and transformers' output_hidden_states; frame lengths [B])."""
    features = [wavlm.feature_extractor(x[None])[0].transpose(0, 1) for x in inputs]  # [T_i, C], each alone
    lengths = torch.tensor([len(f) for f in features], device=features[0].device)
    mask = torch.arange(int(lengths.max()), device=lengths.device)[None] < lengths[:, None]  # [B, T]
    h, _ = wavlm.feature_projection(nn.utils.rnn.pad_sequence(features, batch_first=True))
    encoder, stable = wavlm.encoder, wavlm.config.do_stable_layer_norm
    h = h * mask[..., None]  # padding is zero before the positional convolution, as in transformers
    h = h + encoder.pos_conv_embed(h)
    if not stable:
        h = encoder.layer_norm(h)
    attention, bias, states = (None if bool(mask.all()) else mask), None, []
    for layer in encoder.layers:
        states.append(h)
        h, bias = layer(h, attention_mask=attention, position_bias=bias)
    states.append(encoder.layer_norm(h) if stable else h)
    return states, lengths


class XVectorHead(nn.Module):
    """WavLMForXVector's head (its modules, shared): the weighted layer sum (or the last layer),
    projector, TDNN layers, mean + std pooling over each clip's own frames, and the embedding
    layer (`feature_extractor`, xvector_output_dim); the classifier is left out."""

    def __init__(self, xvector):
        super().__init__()
        config = xvector.config
        self.layer_weights = xvector.layer_weights if config.use_weighted_layer_sum else None
        self.projector, self.tdnn = xvector.projector, xvector.tdnn
        self.embedding = xvector.feature_extractor
        self.shrink = sum(d * (k - 1) for k, d in zip(config.tdnn_kernel, config.tdnn_dilation))
        self.min_frames = self.shrink + 2  # two TDNN frames: a finite (unbiased) std

    def forward(self, states, lengths):
        if self.layer_weights is None:
            h = states[-1]
        else:
            h = (torch.stack(states, 1) * F.softmax(self.layer_weights, -1).view(-1, 1, 1)).sum(1)
        h = self.projector(h)
        for layer in self.tdnn:
            h = layer(h)
        n = (lengths - self.shrink).tolist()  # frames of each clip left after the valid convolutions
        stats = [torch.cat([h[b, :k].mean(0), h[b, :k].std(0)]) for b, k in enumerate(n)]
        return self.embedding(torch.stack(stats))


def _from_pretrained(spec, source):
    from transformers import AutoFeatureExtractor, WavLMForXVector
    try:
        model = WavLMForXVector.from_pretrained(source)
        extractor = AutoFeatureExtractor.from_pretrained(source)
    except OSError as e:  # not cached, no network; or not a model directory
        raise FileNotFoundError(f"speaker model {spec!r} ({source}) could not be found or downloaded "
                                f"({type(e).__name__}: {e}); pass --speaker-model wavlm-sv:PATH to a "
                                f"local copy of {WAVLM_SV} (a save_pretrained directory)") from e
    return model, extractor


def xvector_speaker(model, extractor, **kwargs) -> WavLMSpeaker:
    """A WavLMForXVector and its feature extractor as a WavLMSpeaker (kwargs: device, batch_size,
    name); the classifier and its loss are not kept."""
    def prepare(audio):
        return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
    return WavLMSpeaker(model.wavlm, XVectorHead(model), prepare, **kwargs)


def random_wavlm_sv(seed: int = 0):
    """A tiny WavLMForXVector (wavlm-base-plus's layout: GroupNorm front end, post-LN transformer,
    weighted layer sum) with seeded random weights, and its feature extractor, for tests and
    offline runs: (WavLMForXVector, Wav2Vec2FeatureExtractor). The caller's random state is left
    alone."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         tdnn_dim=(32, 32, 32, 32, 64), xvector_output_dim=16, use_weighted_layer_sum=True,
                         mask_time_prob=0.0, num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WavLMForXVector(config).eval()
        with torch.no_grad():
            model.layer_weights.normal_(0.0, 1.0)
    return model, Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)


# ---- Seed-TTS-eval's SIM model: WavLM-large + ECAPA-TDNN (wavlm_large_finetune.pth) ----------------

def load_seed_tts_sim(path, device="cpu", *, batch_size=16) -> WavLMSpeaker:
    """Seed-TTS-eval's WavLM-large + ECAPA-TDNN from its checkpoint (state_dict['model'] of their
    ECAPA_TDNN_SMALL(feat_dim=1024, feat_type='wavlm_large')). The WavLM config is read from the
    tensors' shapes, with WavLM-large's layout for a layer-norm front end (pre-LN transformer,
    input normalized per clip as s3prl does) and WavLM's conv strides and 800-frame bucket range."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"speaker model checkpoint {path!r} not found: pass a local path to "
                                f"Seed-TTS-eval's wavlm_large_finetune.pth ({SEED_TTS_SIM_CHECKPOINT})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    wavlm_state = {k[len(_WAVLM):]: v for k, v in state.items() if k.startswith(_WAVLM)}
    if not wavlm_state:
        raise ValueError(f"{path}: no {_WAVLM}* keys; not a Seed-TTS-eval WavLM + ECAPA-TDNN checkpoint")
    wavlm = wavlm_from_unispeech(wavlm_state, path)
    head_state = {k: v for k, v in state.items() if not k.startswith("feature_extract.")}
    head = ECAPAHead.from_state_dict(head_state, path)
    if head.feature_weight.numel() != wavlm.config.num_hidden_layers + 1:
        raise ValueError(f"{path}: feature_weight has {head.feature_weight.numel()} entries for a "
                         f"{wavlm.config.num_hidden_layers}-layer WavLM (expected layers + 1)")
    normalize = wavlm.config.feat_extract_norm == "layer"
    prepare = (lambda a: F.layer_norm(torch.from_numpy(a), a.shape).numpy()) if normalize else (lambda a: a)
    return WavLMSpeaker(wavlm, head, prepare, device=device, batch_size=batch_size, name=path)


_RENAMES = [  # UniSpeech/s3prl WavLM name -> transformers WavLMModel name (by substring, in order)
    (".self_attn.grep_linear.", ".attention.gru_rel_pos_linear."),
    (".self_attn.grep_a", ".attention.gru_rel_pos_const"),
    (".self_attn.relative_attention_bias.", ".attention.rel_attn_embed."),
    (".self_attn.", ".attention."), (".self_attn_layer_norm.", ".layer_norm."),
    (".fc1.", ".feed_forward.intermediate_dense."), (".fc2.", ".feed_forward.output_dense."),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("post_extract_proj.", "feature_projection.projection."),
]
_UNUSED = ("mask_emb", "label_embs_concat", "final_proj.", "project_q.", "quantizer.")  # pre-training only


def wavlm_from_unispeech(state: dict, source: str = "checkpoint"):
    """A transformers WavLMModel holding a UniSpeech/s3prl WavLM state dict, its config read from
    the shapes. Every weight of the model must come from `state`: a missing one is an error."""
    from transformers import WavLMConfig, WavLMModel
    convs = sorted(int(k.split(".")[2]) for k in state if k.startswith("feature_extractor.conv_layers.")
                   and k.endswith(".0.weight"))
    conv_w = [state[f"feature_extractor.conv_layers.{i}.0.weight"] for i in convs]
    layer_norm = "feature_extractor.conv_layers.0.2.1.weight" in state
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    bias = state["encoder.layers.0.self_attn.relative_attention_bias.weight"]  # [buckets, heads]
    pos = state["encoder.pos_conv.0.weight_v"]  # [H, H / groups, kernel]
    hidden = state["post_extract_proj.weight"].shape[0]
    config = WavLMConfig(
        hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=bias.shape[1],
        intermediate_size=state["encoder.layers.0.fc1.weight"].shape[0], num_buckets=bias.shape[0],
        conv_dim=tuple(w.shape[0] for w in conv_w), conv_kernel=tuple(w.shape[2] for w in conv_w),
        conv_stride=(5,) + (2,) * (len(conv_w) - 1), num_feat_extract_layers=len(conv_w),
        conv_bias="feature_extractor.conv_layers.0.0.bias" in state,
        feat_extract_norm="layer" if layer_norm else "group", do_stable_layer_norm=layer_norm,
        num_conv_pos_embeddings=pos.shape[2], num_conv_pos_embedding_groups=hidden // pos.shape[1],
        mask_time_prob=0.0, layerdrop=0.0)
    mapped, unused = {}, []
    for key, value in state.items():
        new = key
        if key.startswith("feature_extractor.conv_layers."):
            i, part, rest = key.split(".")[2], key.split(".")[3], key.split(".", 4)[4]
            new = {"0": f"feature_extractor.conv_layers.{i}.conv.{rest}",
                   "2": f"feature_extractor.conv_layers.{i}.layer_norm.{rest.split('.')[-1]}"}.get(part)
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
        raise ValueError(f"{source}: the WavLM weights do not fit transformers' WavLMModel "
                         f"(missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]})")
    unknown = [k for k in unused if not k.startswith(_UNUSED)]
    if unknown:
        warnings.warn(f"{source}: WavLM weights not used: {unknown[:8]}")
    return model.eval()


class ECAPAHead(nn.Module):
    """Seed-TTS-eval's ECAPA-TDNN (UniSpeech's ecapa_tdnn.ECAPA_TDNN, channels [C] * 4 + [1536]) on
    WavLM's hidden states, in plain torch, over padded batches: softmax-weighted layer sum, + 1e-6,
    instance norm, Conv-ReLU-BN (k 5), three SE-Res2Blocks (k 3, dilations 2, 3, 4, scale 8),
    1x1 conv of their concatenation, attentive statistics pooling, BN, linear. Its state dict has
    the reference's key names. `lengths` [B] are the clips' frame counts in the padded states."""
    min_frames = 1

    def __init__(self, n_states, feat_dim, channels=512, mfa_channels=1536, emb_dim=256, scale=8,
                 se_dim=128, attention_dim=128):
        super().__init__()
        self.feature_weight = nn.Parameter(torch.zeros(n_states))
        self.layer1 = _ConvReluBn(feat_dim, channels, kernel=5)
        self.layer2, self.layer3, self.layer4 = (_SERes2Block(channels, d, scale, se_dim) for d in (2, 3, 4))
        self.conv = nn.Conv1d(3 * channels, mfa_channels, kernel_size=1)
        self.pooling = _AttentiveStatsPool(mfa_channels, attention_dim)
        self.bn = nn.BatchNorm1d(2 * mfa_channels)
        self.linear = nn.Linear(2 * mfa_channels, emb_dim)

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "checkpoint") -> "ECAPAHead":
        """The head of a checkpoint, its sizes read from the shapes; every key must fit."""
        try:
            first = state["layer1.conv.weight"]  # [channels, feat_dim, 5]
            head = cls(n_states=state["feature_weight"].numel(), feat_dim=first.shape[1],
                       channels=first.shape[0], mfa_channels=state["conv.weight"].shape[0],
                       emb_dim=state["linear.weight"].shape[0],
                       scale=1 + sum(k.startswith("layer2.Res2Conv1dReluBn.convs.") and k.endswith(".weight")
                                     for k in state),
                       se_dim=state["layer2.SE_Connect.linear1.weight"].shape[0],
                       attention_dim=state["pooling.linear1.weight"].shape[0])
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            for key, value in head.state_dict().items():
                if key.endswith("num_batches_tracked"):  # BatchNorm's counter, unused in eval
                    state.setdefault(key, value)
            head.load_state_dict(state)
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"{source}: not Seed-TTS-eval's ECAPA-TDNN head "
                             f"({type(e).__name__}: {e})") from None
        return head.eval()

    def forward(self, states, lengths):
        mask = torch.arange(states[0].shape[1], device=lengths.device)[None] < lengths[:, None]  # [B, T]
        m = mask[:, None].to(states[0].dtype)  # [B, 1, T]
        weights = F.softmax(self.feature_weight, dim=-1)
        x = (torch.stack(states) * weights.view(-1, 1, 1, 1)).sum(0).transpose(1, 2) + 1e-6  # [B, D, T]
        n = m.sum(2, keepdim=True)
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
        self.conv = nn.Conv1d(cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation)
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
        self.width, self.n = channels // scale, (scale if scale == 1 else scale - 1)
        pad = dilation * (kernel - 1) // 2
        self.convs = nn.ModuleList(nn.Conv1d(self.width, self.width, kernel, padding=pad, dilation=dilation)
                                   for _ in range(self.n))
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(self.n))

    def forward(self, x, m):
        chunks, out, h = torch.split(x, self.width, dim=1), [], None
        for i in range(self.n):
            h = chunks[i] if i == 0 else h + chunks[i]
            h = self.bns[i](F.relu(self.convs[i](h * m)))
            out.append(h)
        return torch.cat(out + list(chunks[self.n:]), dim=1)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels, bottleneck):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(channels, bottleneck), nn.Linear(bottleneck, channels)

    def forward(self, x, m):
        s = (x * m).sum(2) / m.sum(2)  # the mean over the clip's own frames
        return x * torch.sigmoid(self.linear2(F.relu(self.linear1(s))))[..., None]


class _AttentiveStatsPool(nn.Module):
    def __init__(self, channels, attention_dim):
        super().__init__()
        self.linear1 = nn.Conv1d(channels, attention_dim, kernel_size=1)
        self.linear2 = nn.Conv1d(attention_dim, channels, kernel_size=1)

    def forward(self, x, mask):
        logits = self.linear2(torch.tanh(self.linear1(x))).masked_fill(~mask[:, None], float("-inf"))
        alpha = torch.softmax(logits, dim=2)
        mean = (alpha * x).sum(2)
        std = torch.sqrt(((alpha * x * x).sum(2) - mean ** 2).clamp(min=1e-9))
        return torch.cat([mean, std], dim=1)
