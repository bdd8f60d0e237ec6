"""Whisper scoring of TTS clips: transcript, CER, NLL and reward, in this process.

WhisperScorer batches clips, runs the Whisper encoder once per clip, and uses those features for
the teacher-forced NLL of the intended text (DESIGN.md §2) and for the greedy transcript (bounded
by the target's length), both from the same decoder passes (whisper_decode.py: whisper.decode's
tokens, the text as their draft). Every scorer answers a reward.Score per clip. Silence (empty or
all-zero audio) is an answer: transcript "", CER 1, its NLL measured, reward about 0. A clip over
Whisper's 30 s window is refused (too_long, reward 0), never scored on its first 30 s.
`window_s` below 30 runs the encoder on that many seconds only (whisper_model.windowed), and
refuses clips longer than it the same way. A bad clip, or one whose scoring fails in a batch, gets
reward 0 and `error`; the others are scored as if alone. CustomRewardScorer takes a user's
`module:function` reward instead. With a speaker model (speaker.py), either scorer also gives each
clip that has a voice prompt its speaker similarity `sim` (speaker.SpeakerSimilarity: prompt
embeddings cached by content, silence 0.0, a failed or refused clip None). The model's loading
and its languages (model_languages, language_code) are whisper_model.py's, re-exported here.
whisper_worker.py serves these scorers from a process of their own.
"""

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.audio import SAMPLE_RATE
from whisper.tokenizer import get_tokenizer

import dnsmos
from prosody import measure
from reward import RewardConfig, Score, char_error_rate, import_function, normalize_text, tts_reward
from speaker import SpeakerSimilarity, load_speaker_model
from whisper_decode import DraftStats, Verified, greedy_options, verified_decode
from whisper_model import RANDOM_TINY_DIMS as RANDOM_TINY_DIMS  # re-exported for the tests
from whisper_model import (
    SAMPLES_PER_AUDIO_FRAME,
    WINDOW_S,
    half_except_layernorm,
    language_code,
    load_whisper,
    model_languages,
    windowed,
)
from whisper_model import random_tiny_whisper as random_tiny_whisper  # re-exported likewise


class WhisperScorer:
    """Scores clips against their intended texts with one Whisper model on one device.

    model: an openai-whisper name ("large-v3", "tiny.en", ...), a checkpoint path, "random-tiny"
    (seeded random multilingual weights, for offline smoke runs) or a whisper.model.Whisper.
    language: default language code or name (None: detected per clip; English-only models use "en").
    max_transcript_tokens: None, or a cap on every greedy transcript below the bound that each
    clip's target sets (transcript_bound), which is what stops random-weight Whisper.
    fp16: None = half precision on CUDA (the weights converted, LayerNorms kept float32), float32
    on CPU.
    window_s: seconds of audio Whisper hears, in (0, 30]; below 30 the encoder runs on that window
    only (`windowed`), and longer clips are refused as too long.
    prosody_threads: CPU threads measuring prosody while Whisper runs; None: 1 beside a CPU
    Whisper (which wants the cores), up to 8 beside a GPU one, which serves every rank's clips and
    would otherwise wait for one thread's pitch tracking.
    speaker_model: None, or a speaker.load_speaker_model spec (or SpeakerModel) on the same device,
    for `sim` (embedded in batches of batch_size).
    quality: None, or "dnsmos" for the dnsmos_* ratings of every clip heard (dnsmos.py).
    transcripts: "verified" (whisper_decode.verified_decode: the greedy transcript checked against
    the text in the NLL's decoder pass, decoded on only where it leaves it) or "whisper.decode"
    (the batched whisper.decode, then an NLL pass of its own: the same tokens, slower)."""

    def __init__(
        self,
        model,
        device="cpu",
        language=None,
        *,
        batch_size=16,
        max_transcript_tokens=None,
        fp16=None,
        reward_config=None,
        download_root=None,
        window_s=WINDOW_S,
        prosody_threads=None,
        speaker_model=None,
        quality=None,
        transcripts="verified",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_transcript_tokens is not None and max_transcript_tokens < 1:
            raise ValueError(
                f"max_transcript_tokens must be None (no cap) or >= 1, got {max_transcript_tokens}"
            )
        self.batch_size = batch_size
        self.max_transcript_tokens = max_transcript_tokens
        if not isinstance(reward_config, RewardConfig):
            reward_config = RewardConfig(**(reward_config or {}))
        self.reward_config = reward_config
        self.device = torch.device(device)
        if prosody_threads is None:
            prosody_threads = min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 1
        if prosody_threads < 1:
            raise ValueError(f"prosody_threads must be None or >= 1, got {prosody_threads}")
        self.prosody_threads = prosody_threads
        self.model = windowed(load_whisper(model, self.device, download_root).eval(), window_s)
        self.window_s = window_s
        self.n_samples = self.model.dims.n_audio_ctx * SAMPLES_PER_AUDIO_FRAME
        self.fp16 = self.device.type == "cuda" if fp16 is None else bool(fp16)
        if self.fp16 and self.device.type != "cuda":
            raise ValueError(f"fp16=True needs a CUDA device, got device={device!r}")
        if self.fp16:
            half_except_layernorm(self.model)
        self.languages = model_languages(self.model)
        self.language = self._language_code(language)
        tokenizer = self._tokenizer(self.language)
        self._eot = tokenizer.eot
        self._n_prefix = len(tokenizer.sot_sequence_including_notimestamps)
        self.speaker = _speaker_similarity(speaker_model, self.device, batch_size)
        self.quality = _quality_model(quality)
        if transcripts not in ("verified", "whisper.decode"):
            raise ValueError(
                f"transcripts must be 'verified' or 'whisper.decode', got {transcripts!r}"
            )
        self.transcripts = transcripts
        self.draft_stats = DraftStats()  # verified_decode's running totals

    def score(self, audios, texts, languages=None, prompts=None) -> list[Score]:
        """One reward.Score per clip, in order.

        audios: float32 arrays [S] at 16 kHz; texts: what each should say; languages: None or one
        code or name per clip (None entries use the default); prompts: None or one voice prompt
        (float32 [S] at 16 kHz) or None per clip, for `sim` (ignored without a speaker model).
        Clips that cannot be scored get reward 0 and `error` (too_long over the window, 30 s) and
        no sim; the others are scored as if alone."""
        languages = check_lengths(audios, texts, languages)
        prompts = check_prompts(prompts, len(audios)) if self.speaker else None
        results = [None] * len(audios)
        groups = {}  # language -> indices of its clips
        clips = {}  # index -> (audio, text, target token ids), the clips Whisper hears
        for i, (audio, text, language) in enumerate(zip(audios, texts, languages)):
            try:
                language = self._language_code(self.language if language is None else language)
                audio, text = check_audio(audio), check_text(text)
                target = self._tokenizer(language).encode(" " + text)
                if self._n_prefix + len(target) + 1 > self.model.dims.n_text_ctx:
                    raise _BadInput(
                        f"text is {len(target)} tokens, too long for Whisper's "
                        f"{self.model.dims.n_text_ctx}-token context"
                    )
            except _BadInput as e:
                results[i] = _failed(str(e))
                continue
            # Too long: its first window scored against the whole text would mislead.
            if len(audio) > self.n_samples:
                results[i] = _failed(
                    f"the clip's {len(audio) / SAMPLE_RATE:.2f} s is longer than Whisper's "
                    f"{self.window_s:g} s window: refused, not scored",
                    too_long=True,
                )
                continue
            clips[i] = (audio, text, target)
            groups.setdefault(language, []).append(i)
        # Prosody in threads (numpy releases the GIL in its FFTs) while Whisper runs.
        with ThreadPoolExecutor(max_workers=self.prosody_threads) as pool:
            prosody = {
                i: pool.submit(measure, audio, text) for i, (audio, text, _) in clips.items()
            }
            quality = {}  # the same threads: onnxruntime releases the GIL too
            if self.quality is not None:
                quality = {i: pool.submit(self.quality.rate, clip[0]) for i, clip in clips.items()}
            for language, indices in groups.items():  # whisper.decode pins one language per call
                # Similar targets together: similar transcript bounds.
                indices.sort(key=lambda i: len(clips[i][2]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    for i, result in zip(
                        batch, self._score_or_retry([clips[i] for i in batch], language)
                    ):
                        results[i] = result
            for i, measures in prosody.items():
                if results[i].error is None:
                    extra = measures.result()
                    if i in quality:
                        extra.update(quality[i].result())
                    results[i] = dataclasses.replace(results[i], **extra)
        if prompts is not None:
            heard = [
                clips[i][0] if i in clips and results[i].error is None else None
                for i in range(len(audios))
            ]
            results = _with_sims(results, self.speaker.sims(heard, prompts))
        return results

    def _score_or_retry(self, clips, language) -> list[Score]:
        """_score_batch; where it fails, clip by clip, so that one failing clip (an fp16 overflow,
        say) costs only its own score and not its batch's."""
        try:
            return self._score_batch(clips, language)
        except Exception as e:
            if len(clips) == 1:
                return [_failed(f"scoring failed: {type(e).__name__}: {e}")]
        return [self._score_or_retry([clip], language)[0] for clip in clips]

    @torch.inference_mode()
    def _score_batch(self, clips, language) -> list[Score]:
        """clips: (audio float32 [S <= self.n_samples], text, target token ids) of one language
        (None: detected). Raises FloatingPointError on a non-finite NLL rather than answer it."""
        dtype = torch.float16 if self.fp16 else torch.float32
        # Per clip: log_mel_spectrogram clamps to (max - 8) over its whole input, so a batched call
        # would let one clip's loudness change another's features. Empty audio is zero-padded.
        mel = torch.stack(
            [
                whisper.log_mel_spectrogram(
                    whisper.pad_or_trim(audio, self.n_samples),
                    self.model.dims.n_mels,
                    device=self.device,
                )
                for audio, _, _ in clips
            ]
        )
        # The one encoder pass: [B, n_audio_ctx, n_audio_state].
        features = self.model.encoder(mel.to(dtype))
        targets = [target for _, _, target in clips]
        # Silence says nothing: not decoded (a decode of it would be a hallucination or a loop).
        bounds = [
            self._transcript_bound(len(target)) if audio.any() else None
            for audio, _, target in clips
        ]
        languages = [language] * len(clips)
        if self.transcripts == "verified":
            decoded = verified_decode(
                self.model, features, targets, languages, bounds, self.draft_stats
            )
        else:
            decoded = self._whisper_decode(features, targets, language, bounds)
        results = []
        for (_, text, _), clip in zip(clips, decoded):
            if not math.isfinite(clip.nll):  # e.g. fp16 overflow: no reward can be read from it
                raise FloatingPointError(f"non-finite NLL ({clip.nll}) of the text {text!r}")
            # Text tokens only: a weak model may emit special tokens, which decode() would spell.
            tokens = [t for t in clip.tokens if t < self._eot]
            transcript = self._tokenizer(clip.language).decode(tokens).strip()
            cer = char_error_rate(text, transcript)  # 1.0 for silence's "" transcript
            reward = tts_reward(cer, clip.nll, **vars(self.reward_config))
            score = Score(
                reward=reward, transcript=transcript, cer=cer, nll=clip.nll, language=clip.language
            )
            results.append(score)
        return results

    def _whisper_decode(self, features, targets, language, bounds) -> list[Verified]:
        """What verified_decode answers, the way before it (kept for bench.py reward):
        whisper.decode on the decoded clips at the batch's largest bound, each cut at its own (as
        if decoded alone), then teacher_forced_nll in a decoder pass of its own."""
        tokens = [[] for _ in targets]
        languages = [language] * len(targets)
        heard = [b for b, bound in enumerate(bounds) if bound is not None]
        if heard:
            options = greedy_options(language, max(bounds[b] for b in heard), self.fp16)
            for b, d in zip(heard, whisper.decode(self.model, features[heard], options)):
                tokens[b] = d.tokens[: bounds[b]]
                languages[b] = d.language
        # Silence, no language given:
        unknown = [b for b, lang in enumerate(languages) if lang is None]
        if unknown:  # the NLL's prefix needs one: what Whisper detects in that window
            _, probs = whisper.decoding.detect_language(self.model, features[unknown])
            for b, p in zip(unknown, probs):
                languages[b] = max(p, key=p.get)
        sequences = []
        n_prefix = []
        for target, lang in zip(targets, languages):
            tokenizer = self._tokenizer(lang)
            prefix = list(tokenizer.sot_sequence_including_notimestamps)
            sequences.append(prefix + target + [tokenizer.eot])
            n_prefix.append(len(prefix))
        nlls = teacher_forced_nll(self.model, features, sequences, n_prefix)
        return [
            Verified(tokens=clip_tokens, language=lang, nll=nll)
            for clip_tokens, lang, nll in zip(tokens, languages, nlls)
        ]

    def _transcript_bound(self, n_target: int) -> int:
        limit = self.model.dims.n_text_ctx - self._n_prefix
        return transcript_bound(n_target, limit, self.max_transcript_tokens)

    def _tokenizer(self, language):
        return get_tokenizer(
            self.model.is_multilingual,
            num_languages=self.model.num_languages,
            language=language,
            task="transcribe",
        )

    def _language_code(self, language):
        """The code of a language code or name, checked against this model; None stays None
        (detected per clip) on a multilingual model and is "en" on an English-only one."""
        if language is None:
            return None if self.model.is_multilingual else "en"
        try:
            code = language_code(language)
        except ValueError as e:
            raise _BadInput(str(e)) from None
        if code not in self.languages:
            raise _BadInput(
                f"language {language!r}: this Whisper model is English-only"
                if not self.model.is_multilingual
                else f"language {language!r} ({code}) is not one of this Whisper model's "
                f"{len(self.languages)} languages"
            )
        return code


def teacher_forced_nll(model, features, sequences, n_prefix) -> list[float]:
    """Mean cross-entropy (nats/token) of each sequence's tokens after its prefix, in one decoder
    pass.

    features [B, n_audio_ctx, n_audio_state]; sequences: B token lists (SOT prefix + text + eot) of
    different lengths, right-padded here to [B, L + 1]; n_prefix[b]: prefix length of sequence b."""
    batch = len(sequences)
    length = max(map(len, sequences)) - 1
    tokens = torch.zeros(batch, length + 1, dtype=torch.long)
    scored = torch.zeros(batch, length, dtype=torch.bool)  # [B, L]: next token is text or eot
    for b, sequence in enumerate(sequences):
        tokens[b, : len(sequence)] = torch.tensor(sequence)
        scored[b, n_prefix[b] - 1 : len(sequence) - 1] = True
    tokens = tokens.to(features.device)
    scored = scored.to(features.device)
    # [B, L, n_vocab], float32; causal, so the padding is inert
    logits = model.decoder(tokens[:, :-1], features)
    ce = torch.zeros(batch, length, device=features.device)
    ce[scored] = F.cross_entropy(logits[scored], tokens[:, 1:][scored], reduction="none")
    return (ce.sum(1) / scored.sum(1)).tolist()


def transcript_bound(n_target: int, limit: int, cap: int | None = None) -> int:
    """Most tokens the greedy transcript of a clip may take, from its target's token count
    n_target.

    2 * n_target + 10 leaves room for a transcript spelled otherwise than the target (digits read
    out, other spacing or tokenization) but not for a loop: a transcript twice the target's length
    has a CER near 1 already (U_cer(1) = 0.005), so cutting it there changes no reward. `cap`
    (max_transcript_tokens, None = none) lowers it; `limit`, the tokens that fit in Whisper's
    context after the SOT prefix (whisper.decode stops once its tokens exceed n_text_ctx), always
    bounds it. A fixed cap instead would cut long Korean or Chinese transcripts into deletions."""
    bound = 2 * n_target + 10
    if cap is not None:
        bound = min(bound, cap)
    return max(1, min(bound, limit))


def check_audio(audio) -> np.ndarray:
    """The clip as float32 [S], or _BadInput saying why it cannot be scored. Silence (empty or all
    zeros) passes: it is an answer to be scored, not a broken input."""
    try:
        audio = np.asarray(audio)
    except (TypeError, ValueError) as e:  # a ragged list, a CUDA tensor, ...
        raise _BadInput(f"audio is not an array of samples ({type(audio).__name__}: {e})") from None
    if audio.dtype.kind != "f":
        raise _BadInput(
            f"audio dtype {audio.dtype} is not floating point (expected float32 samples at 16 kHz)"
        )
    if audio.ndim != 1:
        raise _BadInput(f"audio must be 1-D (mono samples), got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise _BadInput(f"audio has {int((~np.isfinite(audio)).sum())} NaN or inf samples")
    return audio.astype(np.float32, copy=False)


def check_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise _BadInput(f"text is empty ({text!r})")
    if not normalize_text(text):
        raise _BadInput(
            f"text {text!r} has no characters left after normalization "
            f"(punctuation, symbols removed)"
        )
    return text.strip()


class _BadInput(ValueError):
    """One clip cannot be scored; the scorer answers it with reward 0 and this reason."""


def _quality_model(quality):
    """The per-clip quality model `quality` names: None (off) or "dnsmos" (dnsmos.DNSMOS)."""
    if quality is None:
        return None
    if quality != "dnsmos":
        raise ValueError(f"quality must be None or 'dnsmos', got {quality!r}")
    return dnsmos.DNSMOS(threads=1)  # one thread per clip: the pool runs several clips at once


def _speaker_similarity(speaker_model, device, batch_size=16) -> SpeakerSimilarity | None:
    if speaker_model is None:
        return None
    return SpeakerSimilarity(load_speaker_model(speaker_model, device, batch_size=batch_size))


def check_prompts(prompts, n: int) -> list | None:
    """The voice prompts as float32 [S] arrays (None kept), one per clip; a malformed prompt (the
    trainer's data, not the policy's answer) is a ValueError. None: no prompts at all."""
    if prompts is None:
        return None
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} audios and {len(prompts)} prompts; they must match one to one")
    try:
        return [None if p is None else check_audio(p) for p in prompts]
    except _BadInput as e:
        raise ValueError(f"voice prompt: {e}") from None


def _with_sims(results: list[Score], sims: list) -> list[Score]:
    return [r if sim is None else dataclasses.replace(r, sim=sim) for r, sim in zip(results, sims)]


def check_lengths(audios, texts, languages) -> list:
    languages = [None] * len(audios) if languages is None else list(languages)
    if not len(audios) == len(texts) == len(languages):
        raise ValueError(
            f"got {len(audios)} audios, {len(texts)} texts and {len(languages)} languages; "
            "they must match one to one"
        )
    return languages


def _failed(reason: str, too_long: bool = False) -> Score:
    return Score(reward=0.0, error=reason, too_long=too_long)


class CustomRewardScorer:
    """A user's reward instead of Whisper: spec "module:function", function(audio float32 [S] at
    16 kHz, text) -> float in [0, 1]. Silence is passed on like any clip (an empty array stays
    empty); there is no 30 s limit. Bad clips and non-finite or out-of-range values get reward 0
    (and no sim). speaker_model, device: as WhisperScorer's, for `sim`."""

    def __init__(self, spec: str, speaker_model=None, device="cpu", quality=None):
        self.function = import_function(spec, "reward", "'whisper' or 'module:function'")
        self.spec = spec
        self.speaker = _speaker_similarity(speaker_model, device)
        self.quality = _quality_model(quality)

    def score(self, audios, texts, languages=None, prompts=None) -> list[Score]:
        check_lengths(audios, texts, languages)
        prompts = check_prompts(prompts, len(audios)) if self.speaker else None
        results = [self._score_one(audio, text) for audio, text in zip(audios, texts)]
        if prompts is not None:
            heard = [check_audio(a) if r.error is None else None for a, r in zip(audios, results)]
            results = _with_sims(results, self.speaker.sims(heard, prompts))
        return results

    def _score_one(self, audio, text) -> Score:
        try:
            audio, text = check_audio(audio), check_text(text)
        except _BadInput as e:
            return _failed(str(e))
        returned = self.function(audio, text)
        try:
            value = float(returned)
        except (TypeError, ValueError):
            value = math.nan
        if not 0.0 <= value <= 1.0:  # NaN fails too
            return _failed(f"reward {self.spec} returned {returned!r}, not a number in [0, 1]")
        measures = measure(audio, text)
        if self.quality is not None:
            measures.update(self.quality.rate(audio))
        return Score(reward=value, **measures)
