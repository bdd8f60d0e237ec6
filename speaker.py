"""Speaker similarity: how much a generated clip sounds like its voice prompt (DESIGN.md §2).

sim = cosine of two speaker embeddings, generated clip vs prompt audio, in [-1, 1]. A speaker
model (load_speaker_model) is one of:
  "wavlm-sv"        transformers' WavLMForXVector, microsoft/wavlm-base-plus-sv (the default);
                    "wavlm-sv:PATH" a local copy (save_pretrained directory, feature extractor too)
  "PATH.pth"        Seed-TTS-eval's SIM model, wavlm_large_finetune.pth: WavLM-large (transformers'
                    WavLMModel, weights mapped from the checkpoint's feature_extract.model.* keys)
                    and the ECAPA-TDNN head of ecapa.py (ECAPAHead), so that figures follow
                    the published SIM protocol
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

from ecapa import ECAPAHead, wavlm_from_unispeech
from reward import import_function

SAMPLE_RATE = 16000
WAVLM_SV = "microsoft/wavlm-base-plus-sv"
SEED_TTS_SIM_CHECKPOINT = "https://drive.google.com/file/d/1-aE1NfzpRCLxA4GUxX9ITI3F9LlbtEGP"
# The WavLM's keys in Seed-TTS-eval's ECAPA_TDNN (s3prl's UpstreamExpert.model)
_WAVLM = "feature_extract.model."


def load_speaker_model(spec, device="cpu", *, batch_size=16) -> "SpeakerModel":
    """The speaker model of `spec` (see the module docstring) on `device`; a SpeakerModel passes
    through. A model that cannot be found or downloaded is one FileNotFoundError naming it."""
    if isinstance(spec, SpeakerModel):
        return spec
    kw = dict(device=device, batch_size=batch_size)
    if spec == "random-tiny":
        return xvector_speaker(*random_wavlm_sv(), name=spec, **kw)
    if isinstance(spec, str) and (spec == "wavlm-sv" or spec.startswith("wavlm-sv:")):
        source = spec.partition(":")[2] or WAVLM_SV
        model, extractor = _from_pretrained(spec, source)
        return xvector_speaker(model, extractor, name=spec, **kw)
    if isinstance(spec, str) and spec.endswith(".pth"):
        return load_seed_tts_sim(spec, **kw)
    if isinstance(spec, str) and ":" in spec and not os.path.exists(spec):
        return FunctionSpeaker(spec)
    raise ValueError(
        f"speaker model {spec!r} is not 'wavlm-sv', 'wavlm-sv:PATH', a .pth checkpoint "
        "(Seed-TTS-eval's wavlm_large_finetune.pth), 'module:function' or 'random-tiny'"
    )


def similarity(a, b) -> torch.Tensor:
    """Cosine similarity of embeddings a and b along their last dimension ([D] -> a 0-d tensor,
    [N, D] -> [N]), in float64 and clamped to [-1, 1]; a zero embedding has similarity 0."""
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    return F.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)


class SpeakerModel:
    """embed(audios) -> float32 [N, D] on the CPU, one row per float32 16 kHz clip. Clips shorter
    than min_samples cannot be embedded (SpeakerSimilarity does not send them)."""

    name = "speaker model"
    min_samples = 1  # the shortest clip embed takes, in samples

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
        self.model = model
        self.cache_size = cache_size
        self._cache = collections.OrderedDict()  # sha1 -> embedding [D], or None (unusable prompt)

    def sims(self, clips, prompts) -> list:
        if len(clips) != len(prompts):
            raise ValueError(
                f"got {len(clips)} clips and {len(prompts)} prompts; they must match 1 to 1"
            )
        keys = [None if p is None else _content_key(p) for p in prompts]
        known = {key: self._cache[key] for key in keys if key in self._cache}  # key -> embedding
        new = {}  # new prompt key -> its row in the one batch embedded
        batch = []  # float32 clips: the new prompts, then the clips
        for key, prompt in zip(keys, prompts):
            if key is None or key in known or key in new:
                continue
            if self._hearable(prompt):
                new[key] = len(batch)
                batch.append(np.asarray(prompt, np.float32))
            else:
                warnings.warn(
                    f"a voice prompt of {len(prompt)} samples is silent or shorter than "
                    f"{self.model.name}'s {self.model.min_samples}: its clips get no sim",
                    stacklevel=2,
                )
                self._remember(key, known.setdefault(key, None))
        out = [None] * len(clips)  # sims
        rows = {}  # clip index -> its row in the batch
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
            embedding = embeddings[row].clone()  # not a view of the batch
            self._remember(key, known.setdefault(key, embedding))
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
        self.function = import_function(spec, "speaker model")
        self.name = spec

    def embed(self, audios) -> torch.Tensor:
        rows = []
        for audio in audios:
            embedding = self.function(np.asarray(audio, np.float32))
            row = torch.as_tensor(np.asarray(embedding, np.float32))
            ok = row.ndim == 1 and len(row) and (not rows or row.shape == rows[0].shape)
            if not ok or not row.isfinite().all():
                raise ValueError(
                    f"speaker model {self.name} returned an embedding of shape "
                    f"{tuple(row.shape)}: expected one finite 1-D vector, one length for all"
                )
            rows.append(row)
        return torch.stack(rows) if rows else torch.zeros(0, 0)


class WavLMSpeaker(SpeakerModel):
    """A WavLM (transformers' WavLMModel) and a head on its hidden states: XVectorHead (wavlm-sv)
    or ECAPAHead (Seed-TTS-eval). prepare(audio float32 numpy) -> the model's input samples (the
    feature extractor's normalization, or s3prl's layer norm of the whole clip). A batch holds at
    most batch_size clips and max_frames2 padded frames squared (the size of its attention maps;
    docs/voice-cloning.md gives the memory)."""

    max_frames2 = 4 * 1500**2  # four 30 s clips, or 36 of 10 s

    def __init__(self, wavlm, head, prepare, *, device="cpu", batch_size=16, name="wavlm"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = name
        self.prepare = prepare
        self.stride = math.prod(wavlm.config.conv_stride)  # samples per frame
        self.wavlm = wavlm.to(self.device).eval().requires_grad_(False)
        self.head = head.to(self.device).eval().requires_grad_(False)
        receptive = 1  # samples one frame of the conv front end sees
        convs = list(zip(wavlm.config.conv_kernel, wavlm.config.conv_stride))
        for kernel, stride in reversed(convs):
            receptive = (receptive - 1) * stride + kernel
        self.min_samples = receptive + (head.min_frames - 1) * self.stride

    @torch.inference_mode()
    def embed(self, audios) -> torch.Tensor:
        # Longest first, so that a batch holds clips of similar lengths: little padding
        order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))
        chunks = []  # lists of clip indices, one batch each; a chunk's first clip is its longest
        for i in order:
            if chunks and self._has_room(chunks[-1], audios):
                chunks[-1].append(i)
            else:
                chunks.append([i])
        out = {}  # clip index -> embedding [D]
        for chunk in chunks:
            inputs = []
            for i in chunk:
                samples = self.prepare(np.asarray(audios[i], np.float32))
                inputs.append(torch.as_tensor(np.asarray(samples, np.float32), device=self.device))
            # transformers warns of its bool padding mask beside its float position bias
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
                states, lengths = wavlm_hidden_states(self.wavlm, inputs)
            out.update(zip(chunk, self.head(states, lengths).float().cpu()))
        return torch.stack([out[i] for i in range(len(audios))]) if out else torch.zeros(0, 0)

    def _has_room(self, chunk, audios) -> bool:
        """Whether one more clip fits in `chunk`: at most batch_size clips, and the padded
        frames squared within max_frames2."""
        frames = len(audios[chunk[0]]) // self.stride + 1  # of its longest clip, the padded length
        if len(chunk) == self.batch_size:
            return False
        return (len(chunk) + 1) * frames**2 <= self.max_frames2


def wavlm_hidden_states(wavlm, inputs):
    """The hidden states of a transformers WavLMModel for clips of different lengths, in one
    transformer pass: (list of [B, T, H], one per layer input and the encoder's output, as s3prl's
    hooks record them and transformers' output_hidden_states; frame lengths [B])."""
    # The conv front end clip by clip: [T_i, C] each
    features = [wavlm.feature_extractor(x[None])[0].transpose(0, 1) for x in inputs]
    lengths = torch.tensor([len(f) for f in features], device=features[0].device)  # [B]
    T = int(lengths.max())
    mask = torch.arange(T, device=lengths.device)[None] < lengths[:, None]  # [B, T]
    h, _ = wavlm.feature_projection(nn.utils.rnn.pad_sequence(features, batch_first=True))
    encoder = wavlm.encoder
    stable = wavlm.config.do_stable_layer_norm  # pre-LN transformer (WavLM-large)
    h = h * mask[..., None]  # padding is zero before the positional convolution, as in transformers
    h = h + encoder.pos_conv_embed(h)
    if not stable:
        h = encoder.layer_norm(h)
    attention = None if bool(mask.all()) else mask  # no padding, no mask
    bias = None  # the relative position bias: the first layer computes it, the rest reuse it
    states = []  # [B, T, H] each
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
        self.projector = xvector.projector
        self.tdnn = xvector.tdnn
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
        n = (lengths - self.shrink).tolist()  # frames of each clip left after the TDNN's convs
        stats = [torch.cat([h[b, :k].mean(0), h[b, :k].std(0)]) for b, k in enumerate(n)]
        return self.embedding(torch.stack(stats))


def _from_pretrained(spec, source):
    from transformers import AutoFeatureExtractor, WavLMForXVector

    try:
        model = WavLMForXVector.from_pretrained(source)
        extractor = AutoFeatureExtractor.from_pretrained(source)
    except OSError as e:  # not cached, no network; or not a model directory
        raise FileNotFoundError(
            f"speaker model {spec!r} ({source}) could not be found or downloaded "
            f"({type(e).__name__}: {e}); pass --speaker-model wavlm-sv:PATH to a "
            f"local copy of {WAVLM_SV} (a save_pretrained directory)"
        ) from e
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

    config = WavLMConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        tdnn_dim=(32, 32, 32, 32, 64),
        xvector_output_dim=16,
        use_weighted_layer_sum=True,
        mask_time_prob=0.0,
        num_labels=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WavLMForXVector(config).eval()
        with torch.no_grad():
            model.layer_weights.normal_(0.0, 1.0)
    return model, Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)


# ---- Seed-TTS-eval's SIM model: WavLM-large + ECAPA-TDNN (wavlm_large_finetune.pth) -------------


def load_seed_tts_sim(path, device="cpu", *, batch_size=16) -> WavLMSpeaker:
    """Seed-TTS-eval's WavLM-large + ECAPA-TDNN from its checkpoint (state_dict['model'] of their
    ECAPA_TDNN_SMALL(feat_dim=1024, feat_type='wavlm_large')). The WavLM config is read from the
    tensors' shapes, with WavLM-large's layout for a layer-norm front end (pre-LN transformer,
    input normalized per clip as s3prl does) and WavLM's conv strides and 800-frame bucket range.
    A missing file: FileNotFoundError; a file that is not this checkpoint: ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"speaker model checkpoint {path!r} not found: pass a local path to "
            f"Seed-TTS-eval's wavlm_large_finetune.pth ({SEED_TTS_SIM_CHECKPOINT})"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    wavlm_state = {k[len(_WAVLM) :]: v for k, v in state.items() if k.startswith(_WAVLM)}
    if not wavlm_state:
        raise ValueError(
            f"{path}: no {_WAVLM}* keys; not a Seed-TTS-eval WavLM + ECAPA-TDNN checkpoint"
        )
    wavlm = wavlm_from_unispeech(wavlm_state, path)
    head_state = {k: v for k, v in state.items() if not k.startswith("feature_extract.")}
    head = ECAPAHead.from_state_dict(head_state, path)
    if head.feature_weight.numel() != wavlm.config.num_hidden_layers + 1:
        raise ValueError(
            f"{path}: feature_weight has {head.feature_weight.numel()} entries for a "
            f"{wavlm.config.num_hidden_layers}-layer WavLM (expected layers + 1)"
        )
    if wavlm.config.feat_extract_norm == "layer":
        prepare = _normalize_clip
    else:
        prepare = _unchanged
    return WavLMSpeaker(wavlm, head, prepare, device=device, batch_size=batch_size, name=path)


def _normalize_clip(audio):
    """s3prl's input to a layer-norm WavLM: the whole clip normalized (float32 numpy [S])."""
    return F.layer_norm(torch.from_numpy(audio), audio.shape).numpy()


def _unchanged(audio):
    return audio
