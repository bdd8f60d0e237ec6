"""The Whisper model the scorer runs: loading it, its window, its precision, its languages.

load_whisper takes an openai-whisper name, a checkpoint path, "random-tiny" (seeded random
multilingual weights, for offline smoke runs) or a whisper.model.Whisper. `windowed` cuts the
encoder to a window shorter than 30 s. model_languages and language_code check a dataset's
languages before any model is loaded.
"""

import copy
import dataclasses
import os

import torch
import whisper
from whisper.audio import N_SAMPLES, SAMPLE_RATE  # 480000 samples = the 30 s window, 16000 Hz
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

WINDOW_S = N_SAMPLES / SAMPLE_RATE  # 30.0: Whisper hears one window
SAMPLES_PER_AUDIO_FRAME = N_SAMPLES // 1500  # 320: one encoder position (two 10 ms mel frames)
RANDOM_TINY_DIMS = ModelDimensions(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=64,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=64,
    n_text_head=2,
    n_text_layer=1,
)


def model_languages(model) -> frozenset[str]:
    """The Whisper language codes that `model` (anything WhisperScorer takes) knows, without
    loading its weights: for checking a dataset at loading time. English-only models know {"en"};
    large-v3 and turbo 100 languages ("yue" the 100th); the other multilingual ones the first 99
    of whisper.tokenizer.LANGUAGES. A checkpoint file is opened lazily (mmap) for its dims only."""
    if isinstance(model, Whisper):
        n_vocab = model.dims.n_vocab
    elif model == "random-tiny":
        n_vocab = RANDOM_TINY_DIMS.n_vocab
    elif model in whisper.available_models():  # their vocabularies, known without downloading them
        n_vocab = _known_vocab_size(model)
    elif isinstance(model, (str, os.PathLike)) and os.path.isfile(model):
        checkpoint = torch.load(model, map_location="cpu", mmap=True, weights_only=True)
        n_vocab = checkpoint["dims"]["n_vocab"]
    else:
        raise FileNotFoundError(_unknown_model(model))
    if n_vocab < 51865:  # whisper.model.Whisper.is_multilingual
        return frozenset({"en"})
    return frozenset(list(LANGUAGES)[: n_vocab - 51765 - 1])  # its num_languages, multilingual


def _known_vocab_size(name: str) -> int:
    """n_vocab of one of whisper.available_models(), without downloading it."""
    if name.endswith(".en"):
        return 51864
    # "large" is large-v3's checkpoint in openai-whisper; v3's vocabulary has one more language.
    if name in ("large-v3", "large", "large-v3-turbo", "turbo"):
        return 51866
    return 51865


def language_code(language: str) -> str:
    """Whisper's code for a language code or name, in any case: "ko", "Korean", "korean" -> "ko".
    Whether a given model knows it is model_languages' question."""
    key = language.strip().lower() if isinstance(language, str) else None
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:  # names and aliases ("mandarin" -> "zh")
        return TO_LANGUAGE_CODE[key]
    raise ValueError(
        f"unknown language {language!r}: use a Whisper code such as 'en' or 'ko', "
        f"or a name such as 'korean'"
    )


def load_whisper(model, device, download_root=None) -> Whisper:
    """The Whisper `model` names, on `device`; FileNotFoundError for an unknown name or file, or
    a name that is neither cached nor downloadable."""
    if isinstance(model, Whisper):
        return model.to(device)
    if model == "random-tiny":
        return random_tiny_whisper().to(device)
    if model not in whisper.available_models() and not os.path.isfile(model):
        raise FileNotFoundError(_unknown_model(model))
    try:
        return whisper.load_model(model, device=device, download_root=download_root)
    except OSError as e:  # a name not cached yet, and no network (urllib's errors are OSErrors)
        if os.path.isfile(model):
            raise
        cache = download_root or os.path.join(os.path.expanduser("~"), ".cache", "whisper")
        raise FileNotFoundError(
            f"Whisper {model!r} is not in {cache} and could not be downloaded "
            f"({type(e).__name__}: {e}); pass --whisper PATH to a local checkpoint"
        ) from e


def windowed(model: Whisper, window_s: float) -> Whisper:
    """`model` hearing `window_s` seconds (a multiple of 0.02 s in (0, 30]) instead of 30: the
    same weights, the encoder's positions cut to the window, so that the padding of short clips
    is not computed. The model passed in is left unchanged; ValueError for a bad window."""
    n_ctx = window_s * SAMPLE_RATE / SAMPLES_PER_AUDIO_FRAME
    if not 0 < window_s <= WINDOW_S or abs(n_ctx - round(n_ctx)) > 1e-6:
        raise ValueError(
            f"Whisper window must be a multiple of 0.02 s in (0, {WINDOW_S:g}], got {window_s}"
        )
    n_ctx = round(n_ctx)
    if n_ctx == model.dims.n_audio_ctx:
        return model
    encoder = copy.copy(model.encoder)  # shallow: the blocks and weights are shared
    encoder._buffers = dict(encoder._buffers)  # ... but not the buffer table: the cut stays here
    encoder.positional_embedding = model.encoder.positional_embedding[:n_ctx]
    short = copy.copy(model)
    short._modules = dict(short._modules)
    short.encoder = encoder
    # whisper.decode checks the features' shape by dims.n_audio_ctx
    short.dims = dataclasses.replace(model.dims, n_audio_ctx=n_ctx)
    return short


def random_tiny_whisper(seed: int = 0) -> Whisper:
    """A small multilingual Whisper with seeded random weights: the same model for the same seed;
    the caller's random state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Whisper(RANDOM_TINY_DIMS)
        # Whisper leaves it torch.empty
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
    return model


def half_except_layernorm(model):
    """`model` in float16 in place, its LayerNorms kept float32."""
    # Whisper's LayerNorm computes in float32 (it upcasts its input); its Linear and Conv1d cast
    # their weights to the input's dtype on every call, which half-precision weights make free.
    model.half()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()


def _unknown_model(model) -> str:
    return (
        f"Whisper model {model!r} is neither a checkpoint file nor one of "
        f"{whisper.available_models()} nor 'random-tiny'"
    )
