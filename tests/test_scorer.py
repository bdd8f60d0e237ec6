"""scorer.py: WhisperScorer (batched NLL and transcript, bad inputs, transcript bounds, retries,
languages, loading, the window, speaker similarity) and the custom reward beside it."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import whisper
from whisper.tokenizer import get_tokenizer

import config
import prosody
import scorer as scoring
import speaker
from helpers import ASSETS, noise
from reward import Score, tts_reward


@pytest.fixture(scope="module")
def tiny_model():
    return scoring.random_tiny_whisper(seed=0)


def test_random_tiny_is_deterministic(tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = scoring.random_tiny_whisper(seed=0)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is left alone
    for (name, a), b in zip(tiny_model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert tiny_model.is_multilingual and tiny_model.dims.n_mels == 80


def test_batched_nll_matches_clip_by_clip(tiny_model):
    audios = [noise(s, seed) for seed, s in enumerate([1.0, 2.5, 0.5, 4.0, 3.0])]
    texts = [
        "Hi.",
        "The quick brown fox jumps over the lazy dog.",
        "안녕하세요, 반갑습니다.",
        "One two three.",
        "네",
    ]
    languages = ["en", "en", "ko", None, "ko"]  # None: the scorer's default, en
    scorer = scoring.WhisperScorer(tiny_model, "cpu", "en", batch_size=3, max_transcript_tokens=6)
    results = scorer.score(audios, texts, languages)
    with torch.no_grad():
        for audio, text, language, result in zip(audios, texts, languages, results):
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), 80)[None]
            features = tiny_model.encoder(mel)
            tokenizer = get_tokenizer(
                True,
                num_languages=tiny_model.num_languages,
                language=language or "en",
                task="transcribe",
            )
            prefix = list(tokenizer.sot_sequence_including_notimestamps)
            tokens = prefix + tokenizer.encode(" " + text) + [tokenizer.eot]
            logits = tiny_model.decoder(torch.tensor([tokens[:-1]]), features)[0]
            expected = F.cross_entropy(
                logits[len(prefix) - 1 :], torch.tensor(tokens[len(prefix) :])
            ).item()
            assert isinstance(result, Score) and result.error is None and not result.too_long
            assert result.nll == pytest.approx(expected, abs=1e-4)
            assert result.reward == pytest.approx(tts_reward(result.cer, result.nll))
    one_by_one = scoring.WhisperScorer(
        tiny_model, "cpu", "en", batch_size=1, max_transcript_tokens=6
    ).score(audios, texts, languages)
    assert [r.transcript for r in one_by_one] == [r.transcript for r in results]


def test_bad_inputs_are_answered_not_fatal(tiny_model):
    good = [noise(1.0, 1), noise(2.0, 2)]
    long_clip = noise(31.0, 3)
    cases = [  # (audio, text, language, words expected in the error)
        (
            np.where(np.arange(16000) == 7, np.nan, good[0][:16000]).astype(np.float32),
            "hello",
            None,
            "NaN",
        ),
        (
            np.where(np.arange(16000) == 7, np.inf, good[0][:16000]).astype(np.float32),
            "hello",
            None,
            "inf",
        ),
        ((good[0] * 32767).astype(np.int16), "hello", None, "int16"),
        (np.stack([good[0], good[0]]), "hello", None, "1-D"),
        (good[0], "   ", None, "text is empty"),
        (good[0], "?!", None, "normalization"),
        (good[0], "hello", "klingon", "unknown language"),
        (long_clip, "a long clip", None, "the clip's 31.00 s is longer than Whisper's 30 s window"),
    ]
    exactly_30_s = long_clip[: whisper.audio.N_SAMPLES]
    audios = [good[0]] + [c[0] for c in cases] + [good[1], exactly_30_s, good[1].astype(np.float64)]
    texts = (
        ["a good clip"]
        + [c[1] for c in cases]
        + ["another good clip", "a long clip", "another good clip"]
    )
    languages = [None] + [c[2] for c in cases] + [None, None, None]
    scorer = scoring.WhisperScorer(tiny_model, "cpu", "en", batch_size=4, max_transcript_tokens=6)
    results = scorer.score(audios, texts, languages)
    for (_, _, _, words), result in zip(cases, results[1:-3]):
        assert result.reward == 0.0 and result.cer is None and result.nll is None
        assert words in result.error, (words, result.error)
    # refused, not cut to 30 s
    assert [r.too_long for r in results[1:-3]] == [False] * (len(cases) - 1) + [True]
    alone = scorer.score(
        [good[0], good[1], exactly_30_s], ["a good clip", "another good clip", "a long clip"]
    )
    for result, reference in zip([results[0], results[-3], results[-2]], alone):
        assert (
            result.error is None
            and not result.too_long
            and result.nll == pytest.approx(reference.nll, abs=1e-4)
        )
    assert results[-1].nll == pytest.approx(results[-3].nll, abs=1e-4)  # float64 is converted
    # an English-only vocabulary
    dims = whisper.model.ModelDimensions(**{**vars(tiny_model.dims), "n_vocab": 51864})
    english_only = scoring.WhisperScorer(
        whisper.model.Whisper(dims), "cpu", max_transcript_tokens=2
    )
    assert "English-only" in english_only.score([good[0]], ["hello"], ["ko"])[0].error
    with pytest.raises(ValueError, match="match one to one"):
        scorer.score(good, ["only one text"])


def test_silence_is_scored_not_refused(tiny_model, reward_module):
    """Empty or all-zero audio is the policy's answer: transcript "", CER 1, NLL of the zero
    window."""
    silences = [np.zeros(0, np.float32), np.zeros(16000, np.float32), np.zeros(48000, np.float32)]
    texts = ["hello", "hello there", "안녕하세요"]
    for language in ("en", None):  # None: no decode to read the language from, so it is detected
        scorer = scoring.WhisperScorer(
            tiny_model, "cpu", language, batch_size=4, max_transcript_tokens=6
        )
        results = scorer.score(silences + [noise(1.0, 4)], texts + ["a clip"])
        with torch.no_grad():
            mel = whisper.log_mel_spectrogram(np.zeros(whisper.audio.N_SAMPLES, np.float32), 80)[
                None
            ]
            features = tiny_model.encoder(mel)  # every silence pads to the same all-zero window
            detected = (
                language
                or max(
                    whisper.decoding.detect_language(tiny_model, features)[1][0].items(),
                    key=lambda kv: kv[1],
                )[0]
            )
            tokenizer = get_tokenizer(
                True, num_languages=tiny_model.num_languages, language=detected
            )
            for text, result in zip(texts, results):
                prefix = list(tokenizer.sot_sequence_including_notimestamps)
                tokens = prefix + tokenizer.encode(" " + text) + [tokenizer.eot]
                logits = tiny_model.decoder(torch.tensor([tokens[:-1]]), features)[0]
                nll = F.cross_entropy(
                    logits[len(prefix) - 1 :], torch.tensor(tokens[len(prefix) :])
                ).item()
                assert result.error is None and not result.too_long, result
                assert result.transcript == "" and result.cer == 1.0
                assert result.nll == pytest.approx(nll, abs=1e-4)
                assert (
                    result.reward == pytest.approx(tts_reward(1.0, result.nll))
                    and result.reward < 0.01
                )
        assert results[-1].error is None  # a clip beside them is scored as usual
    custom = scoring.CustomRewardScorer(
        reward_module
    )  # a user's reward hears silence too: empty stays empty
    # prosody of silence
    no_speech = dict(f0_std_semitones=0.0, voiced_frac=0.0, chars_per_s=0.0, f0_median_hz=0.0)
    assert custom.score(silences[:2], ["empty?", "silent"]) == [
        Score(reward=0.75, **no_speech),
        Score(reward=0.0, **no_speech),
    ]
    long = np.full(40 * 16000, 0.5, np.float32)
    assert custom.score([long], ["x"]) == [
        Score(reward=0.5, **prosody.measure(long, "x"))
    ]  # no 30 s limit


KOREAN_150 = (
    "오늘은 날씨가 정말 좋아서 가족과 함께 한강 공원에 가서 "
    "자전거를 타고 산책을 했습니다. 점심에는 근처 식당에서 "
    "맛있는 비빔밥과 된장찌개를 먹었고, 오후에는 도서관에 들러 "
    "읽고 싶었던 소설책을 몇 권 빌렸습니다. 저녁에는 "
    "친구들과 영화를 보며 즐거운 시간을 보냈습니다."
)
CHINESE = (
    "今天天气非常好，我们一家人一起去公园散步，然后在附近的餐厅吃了午饭。"
    "下午我们去图书馆看书，晚上和朋友们一起看电影。"
)


def test_whisper_transcript_bound_follows_the_target(tiny_model, monkeypatch):
    """A long Korean or Chinese transcript is not cut by a fixed cap: the bound derives from the
    target."""
    assert (
        scoring.transcript_bound(10, limit=444) == 30
        and scoring.transcript_bound(10, limit=444, cap=16) == 16
    )
    assert (
        scoring.transcript_bound(300, limit=444) == 444
        and scoring.transcript_bound(0, limit=444, cap=None) == 10
    )
    tokenizer = get_tokenizer(True, num_languages=tiny_model.num_languages)
    n_target = {text: len(tokenizer.encode(" " + text)) for text in (KOREAN_150, CHINESE, "Hi.")}
    assert len(KOREAN_150) >= 150 and len(CHINESE) >= 50
    seen = []
    verified = scoring.verified_decode

    def spy(model, features, targets, languages, bounds, stats=None):
        results = verified(model, features, targets, languages, bounds, stats)
        seen.extend((bound, len(r.tokens)) for bound, r in zip(bounds, results))
        return results

    monkeypatch.setattr(scoring, "verified_decode", spy)
    # No cap; languages detected per clip.
    scorer = scoring.WhisperScorer(tiny_model, "cpu", batch_size=4)
    audios = [noise(1.0, 7), noise(8.0, 8), noise(6.0, 9)]
    texts = ["Hi.", KOREAN_150, CHINESE]
    results = scorer.score(audios, texts, [None, "korean", "Chinese"])
    assert all(r.error is None for r in results), results
    (ko_len, _), (zh_len, _), (en_len, _) = sorted(seen, key=lambda s: -s[0])
    # Room for the whole transcript, even spelled with twice the target's tokens (the old fixed
    # cap was 128).
    assert ko_len >= 2 * n_target[KOREAN_150] > 128 and zh_len >= 2 * n_target[CHINESE]
    assert ko_len <= tiny_model.dims.n_text_ctx - 4 and en_len == 2 * n_target["Hi."] + 10
    assert all(n <= length for length, n in seen)  # random weights still stop

    def chatty(model, features, options):  # a model that never stops: the same word at every step
        seen.append((options.sample_len, None))
        return [
            whisper.DecodingResult(
                features, language="en", tokens=[tokenizer.encode(" la")[0]] * options.sample_len
            )
            for _ in features
        ]

    seen.clear()
    monkeypatch.setattr(scoring.whisper, "decode", chatty)
    mixed = scoring.WhisperScorer(
        tiny_model,
        "cpu",
        "en",
        batch_size=4,  # one batch
        transcripts="whisper.decode",
    ).score(audios, texts)
    # whisper.decode's batch decodes to its longest bound
    assert [length for length, _ in seen] == [2 * n_target[KOREAN_150] + 10]
    # Each transcript is cut at its own target's bound, as if decoded alone.
    assert [len(tokenizer.encode(" " + r.transcript)) for r in mixed] == [
        2 * n_target[t] + 10 for t in texts
    ]
    seen.clear()
    scoring.WhisperScorer(tiny_model, "cpu", "ko", max_transcript_tokens=16).score(
        audios[1:2], texts[1:2]
    )
    assert seen == [(16, 16)]
    with pytest.raises(ValueError, match=r"transcripts must be 'verified' or 'whisper.decode'"):
        scoring.WhisperScorer(tiny_model, "cpu", transcripts="beam")


def test_whisper_failed_batch_is_retried_clip_by_clip(tiny_model, monkeypatch):
    """One clip whose NLL overflows (or whose scoring raises) costs only its own score."""
    tokenizer = get_tokenizer(True, num_languages=tiny_model.num_languages)
    poison = tokenizer.encode(" poisoned clip") + [tokenizer.eot]
    audios = [noise(1.0 + i / 2, 20 + i) for i in range(5)]
    texts = ["first clip", "second clip", "poisoned clip", "fourth clip", "fifth clip"]
    scorer = scoring.WhisperScorer(tiny_model, "cpu", "en", batch_size=4, max_transcript_tokens=6)
    expected = [scorer.score([a], [t])[0] for a, t in zip(audios, texts)]  # each alone, unpatched
    verified = scoring.verified_decode
    for how, error in [
        (
            "nan",
            "scoring failed: FloatingPointError: non-finite NLL (nan) of the text 'poisoned clip'",
        ),
        ("raise", "scoring failed: RuntimeError: decoder exploded"),
    ]:

        def failing(model, features, targets, languages, bounds, stats=None, how=how):
            poisoned = [target + [tokenizer.eot] == poison for target in targets]
            if how == "raise" and any(poisoned):
                raise RuntimeError("decoder exploded")
            results = verified(model, features, targets, languages, bounds, stats)
            return [
                dataclasses.replace(r, nll=math.nan) if p else r for p, r in zip(poisoned, results)
            ]

        monkeypatch.setattr(scoring, "verified_decode", failing)
        results = scorer.score(audios, texts)
        assert results[2] == Score(reward=0.0, error=error)
        for result, reference in zip(results[:2] + results[3:], expected[:2] + expected[3:]):
            assert result.error is None and result.transcript == reference.transcript
            assert result.nll == pytest.approx(reference.nll, abs=1e-4)
            assert result.reward == pytest.approx(reference.reward, abs=1e-6)


def test_whisper_model_languages_and_language_code(tiny_model):
    languages = list(whisper.tokenizer.LANGUAGES)
    assert (
        scoring.model_languages("tiny.en")
        == scoring.model_languages("medium.en")
        == frozenset({"en"})
    )
    for name in ("large-v3", "large-v3-turbo", "turbo"):
        assert scoring.model_languages(name) == frozenset(
            languages[:100]
        ) and "yue" in scoring.model_languages(name)
    for name in ("random-tiny", "tiny", "large-v2"):
        assert scoring.model_languages(name) == frozenset(
            languages[:99]
        ) and "yue" not in scoring.model_languages(name)
    assert scoring.model_languages(tiny_model) == frozenset(languages[:99])
    # large-v3's vocabulary
    dims = whisper.model.ModelDimensions(**{**vars(tiny_model.dims), "n_vocab": 51866})
    assert "yue" in scoring.model_languages(whisper.model.Whisper(dims))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        scoring.model_languages("no-such-model")
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if os.path.isfile(checkpoint):  # read from its dims, without loading the weights
        assert scoring.model_languages(checkpoint) == frozenset({"en"})
    assert [
        scoring.language_code(x) for x in ("korean", "Korean", " ko ", "KO", "Mandarin", "yue")
    ] == ["ko", "ko", "ko", "ko", "zh", "yue"]
    for bad in ("klingon", "", None):
        with pytest.raises(ValueError, match=f"unknown language {bad!r}"):
            scoring.language_code(bad)
    scorer = scoring.WhisperScorer(tiny_model, "cpu", "Korean", max_transcript_tokens=2)
    assert scorer.language == "ko" and scorer.languages == frozenset(languages[:99])
    assert (
        "not one of this Whisper model's 99 languages"
        in scorer.score([noise(1.0, 0)], ["x"], ["yue"])[0].error
    )
    if not os.path.isfile(checkpoint):
        pytest.skip(
            f"{checkpoint} not found (set TEST_ASSETS): the checkpoint-file case was not run"
        )


def test_whisper_name_without_network_says_to_pass_a_path(monkeypatch, tmp_path):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(whisper, "load_model", offline)
    with pytest.raises(
        FileNotFoundError, match=r"'tiny.en' is not in .*could not be downloaded.*--whisper PATH"
    ):
        scoring.load_whisper("tiny.en", "cpu", download_root=str(tmp_path))


def test_whisper_window_cuts_the_encoder_to_the_window_and_leaves_the_model_alone(tiny_model):
    model = tiny_model  # random-tiny: 1500 encoder positions, as every Whisper
    short = scoring.windowed(model, 10.0)
    assert scoring.windowed(model, 30.0) is model
    assert short.dims.n_audio_ctx == 500 and short.encoder.positional_embedding.shape[0] == 500
    assert model.dims.n_audio_ctx == 1500 and model.encoder.positional_embedding.shape[0] == 1500
    assert short.encoder.conv1.weight is model.encoder.conv1.weight  # the same weights, not a copy
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(noise(2.0, 0), 10 * 16000), 80)
    with torch.no_grad():
        assert short.encoder(mel[None]).shape == (1, 500, model.dims.n_audio_state)
    for bad in (0.0, -1.0, 30.02, 0.015):
        with pytest.raises(ValueError, match=r"multiple of 0.02 s"):
            scoring.windowed(model, bad)
    with pytest.raises(SystemExit):
        config.parse_config(["--whisper-window", "0.015"])
    scorer = scoring.WhisperScorer(model, window_s=2.0, max_transcript_tokens=4)
    ok, long = scorer.score([noise(1.5, 1), noise(2.5, 2)], ["short", "long"])
    assert ok.error is None and math.isfinite(ok.nll)
    assert (
        long.too_long
        and long.reward == 0.0
        and "2.50 s is longer than Whisper's 2 s window" in long.error
    )


def test_prosody_threads_give_the_same_scores(tiny_model):
    """Prosody measured by several threads (a GPU worker serving every rank) equals one thread's."""
    audios = [noise(s, seed) for seed, s in enumerate([1.0, 2.0, 0.5, 1.5, 3.0])]
    texts = ["Hi.", "One two three four.", "Yes.", "A short one.", "The last clip here."]
    kw = dict(batch_size=2, max_transcript_tokens=4)
    one = scoring.WhisperScorer(tiny_model, "cpu", "en", prosody_threads=1, **kw)
    four = scoring.WhisperScorer(tiny_model, "cpu", "en", prosody_threads=4, **kw)
    assert (
        one.prosody_threads == 1
        and scoring.WhisperScorer(tiny_model, "cpu", "en").prosody_threads == 1
    )
    a, b = one.score(audios, texts), four.score(audios, texts)
    assert a == b and all(s.chars_per_s is not None for s in a)
    with pytest.raises(ValueError, match="prosody_threads"):
        scoring.WhisperScorer(tiny_model, "cpu", "en", prosody_threads=0)


def test_sim_only_where_a_prompt_is_given(tiny_model, reward_module):
    """With a speaker model, a clip sent with a voice prompt gets its sim (as speaker.similarity of
    the two embeddings); without a prompt, failed or refused, None; silence 0.0. The other fields
    are those of a call without prompts; without a speaker model prompts are ignored."""
    sv = speaker.load_speaker_model("random-tiny")
    voice_a, voice_b = (
        noise(1.2, 50),
        (noise(0.9, 51) + 0.2 * np.sin(np.arange(14400) / 9)).astype(np.float32),
    )
    nan_clip = np.where(np.arange(16000) == 3, np.nan, noise(1.0, 5)).astype(np.float32)
    audios = [
        noise(1.0, 1),
        noise(1.5, 2),
        nan_clip,
        np.zeros(16000, np.float32),
        noise(2.5, 3),
        noise(0.8, 4),
    ]
    texts = ["one", "two", "three", "four", "five", "six"]
    prompts = [voice_a, None, voice_a, voice_b, voice_a, voice_b]
    kw = dict(batch_size=3, max_transcript_tokens=4, window_s=2.0)
    results = scoring.WhisperScorer(tiny_model, "cpu", "en", speaker_model=sv, **kw).score(
        audios, texts, prompts=prompts
    )
    expected = speaker.similarity(
        sv.embed([audios[0], audios[5]]), sv.embed([voice_a, voice_b])
    ).tolist()
    assert [r.sim for r in results[:1] + results[5:]] == pytest.approx(expected, abs=1e-5)
    assert (
        results[1].sim is None and results[2].error and results[2].sim is None
    )  # no prompt; failed
    assert results[3].sim == 0.0 and results[3].error is None  # silence: scored, no voice
    assert results[4].too_long and results[4].sim is None  # refused
    plain = scoring.WhisperScorer(tiny_model, "cpu", "en", **kw)
    assert (
        plain.score(audios, texts, prompts=prompts)
        == plain.score(audios, texts)
        == [dataclasses.replace(r, sim=None) for r in results]
    )
    custom = scoring.CustomRewardScorer(reward_module, speaker_model=sv)
    answers = custom.score(audios, texts, prompts=prompts)
    assert [a.sim for a in answers[:1] + answers[5:]] == pytest.approx(expected, abs=1e-5)
    assert [a.sim for a in answers[1:4]] == [None, None, 0.0]
    assert -1.0 <= answers[4].sim <= 1.0  # a custom reward has no window: the 2.5 s clip is heard
    assert answers[2].error and custom.score(audios[:1], texts[:1]) == [
        dataclasses.replace(answers[0], sim=None)
    ]
    with pytest.raises(ValueError, match="voice prompt: audio must be 1-D"):
        custom.score(audios[:1], texts[:1], prompts=[np.zeros((2, 100), np.float32)])
    with pytest.raises(ValueError, match="2 prompts; they must match"):
        custom.score(audios[:1], texts[:1], prompts=[voice_a, voice_b])
