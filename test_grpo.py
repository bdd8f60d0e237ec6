"""The llasa-grpo test suite: CPU, offline, seeded. Run with `python -m pytest -q test_grpo.py`.

Tiny random models stand in for the real ones (a tiny Llama with a LLASA-style tokenizer, a tiny
random Whisper, the tone codec, a small random XCodec2 decoder with a golden file). Tests that need
real speech recognition read Whisper tiny.en and spoken clips from $TEST_ASSETS (default
../shared/assets) and skip with a reason where it is absent.
"""
import ast
import json
import math
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile
import soundfile as sf
import torch
import torch.nn.functional as F
import whisper
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)
from whisper.tokenizer import get_tokenizer

import codec
import data
import sample
import whisper_worker as ww
from reward import RewardConfig, Score, char_error_rate, tts_reward

REPO = os.path.dirname(os.path.abspath(__file__))


# ==================================================================================================
# Reward: reward.py and whisper_worker.py (issue 2)
# ==================================================================================================

ASSETS = os.environ.get("TEST_ASSETS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "assets"))
TINY = {"model": "random-tiny", "device": "cpu", "language": "en", "batch_size": 3, "max_transcript_tokens": 6}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two CPU cores shared by this process and a worker process (started with threads=1): one thread
    # each, or OpenMP's spinning threads oversubscribe the cores and every op gets several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise(seconds, seed, scale=0.1):
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


# ---- reward.py --------------------------------------------------------------------------------------

def test_tts_reward_known_values():
    assert tts_reward(0.0, 0.0) == 1.0
    # U_cer = 1 - tanh(0.3) = 0.7086873, U_nll = exp(-1/3) = 0.7165313; 1 / (0.6 / U_cer + 0.4 / U_nll)
    assert tts_reward(0.1, 1.0) == pytest.approx(0.7118043, abs=1e-6)
    # U_cer = 1 - tanh(0.5) = 0.5378828, U_nll = exp(-3/2) = 0.2231302; (1 + 3) / (1 / U_cer + 3 / U_nll)
    assert tts_reward(0.25, 3.0, beta_c=2.0, tau_n=2.0, lambda_c=1.0, lambda_n=3.0) == pytest.approx(0.2613660, abs=1e-6)
    assert tts_reward(0.2, 5.0, lambda_n=0.0) == pytest.approx(1 - math.tanh(0.6))  # weight 0: NLL ignored
    assert tts_reward(1e6, 0.5) == 0.0  # U_cer underflows to 0: reward 0, no division by zero
    assert tts_reward(0.0, math.inf) == 0.0
    assert tts_reward(0.0, 0.0, **vars(RewardConfig(beta_c=1.0))) == 1.0


def test_tts_reward_decreases_with_cer_and_nll():
    grid = [0.0, 0.05, 0.2, 0.5, 1.0, 2.0]
    for x in grid:
        by_cer = [tts_reward(c, x) for c in grid]
        by_nll = [tts_reward(x, n) for n in grid]
        assert all(a > b for a, b in zip(by_cer, by_cer[1:])) and all(a > b for a, b in zip(by_nll, by_nll[1:]))
        assert all(0.0 <= r <= 1.0 for r in by_cer + by_nll)


def test_tts_reward_rejects_bad_values():
    for cer, nll, bad in [(math.nan, 1.0, "nan"), (-0.1, 1.0, "-0.1"), (0.1, -2.0, "-2.0"), (0.1, math.nan, "nan")]:
        with pytest.raises(ValueError, match=bad):
            tts_reward(cer, nll)
    with pytest.raises(ValueError, match="tau_n"):
        tts_reward(0.1, 1.0, tau_n=0.0)
    with pytest.raises(ValueError, match="lambda_c"):
        RewardConfig(lambda_c=-1.0)


def test_char_error_rate():
    assert char_error_rate("Hello, World!", "hello world") == 0.0  # case and punctuation
    assert char_error_rate("안녕 하세요", "안녕하세요") == 0.0  # Korean spacing
    assert char_error_rate("The cat.", "") == 1.0  # nothing said: all deleted, never 0
    assert char_error_rate("The cat.", " ... ") == 1.0
    assert char_error_rate("abcd", "abxd") == 0.25  # one substitution in 4 characters
    assert char_error_rate("hello world", "helo wor1d") == pytest.approx(2 / 10)  # a deletion and a substitution
    assert char_error_rate("Hello", "hello", normalize=False) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="no characters"):
        char_error_rate("?!", "anything")


def test_cer_normalizer_keeps_marks_across_scripts():
    from reward import normalize_text
    assert normalize_text("Hello, World! [music] (laughs) <i>Ok</i>.") == "helloworldok"  # Whisper's annotations
    assert normalize_text("안녕 하세요!") == "안녕하세요" and normalize_text("你好，世界。") == "你好世界"
    assert normalize_text("ＡＢＣ１２３") == "abc123"  # NFKC: full-width letters and digits
    # Combining marks (category M) are letters: Whisper's BasicTextNormalizer turned them into spaces.
    assert normalize_text("नमस्ते दुनिया") == "नमस्तेदुनिया" and normalize_text("สวัสดี ครับ") == "สวัสดีครับ"
    assert char_error_rate("नमस्ते दुनिया", "नमस्त दुनिया") == pytest.approx(1 / 12)  # one matra (े) missing
    assert char_error_rate("नमस्ते दुनिया", "नमसते दुनिया") == pytest.approx(1 / 12)  # the virama (्) missing
    assert char_error_rate("สวัสดีครับ", "สวสดครบ") == pytest.approx(3 / 10)  # three Thai vowel signs missing
    assert char_error_rate("你好，世界。", "你好世界") == 0.0 and char_error_rate("你好世界", "你好世") == 0.25
    assert char_error_rate("안녕하세요", "안녕하세오") == 0.2


# ---- WhisperScorer ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    return ww.random_tiny_whisper(seed=0)


def test_random_tiny_is_deterministic(tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = ww.random_tiny_whisper(seed=0)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is left alone
    for (name, a), b in zip(tiny_model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert tiny_model.is_multilingual and tiny_model.dims.n_mels == 80


def test_batched_nll_matches_clip_by_clip(tiny_model):
    audios = [noise(s, seed) for seed, s in enumerate([1.0, 2.5, 0.5, 4.0, 3.0])]
    texts = ["Hi.", "The quick brown fox jumps over the lazy dog.", "안녕하세요, 반갑습니다.", "One two three.", "네"]
    languages = ["en", "en", "ko", None, "ko"]  # None: the scorer's default, en
    scorer = ww.WhisperScorer(tiny_model, "cpu", "en", batch_size=3, max_transcript_tokens=6)
    results = scorer.score(audios, texts, languages)
    with torch.no_grad():
        for audio, text, language, result in zip(audios, texts, languages, results):
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), 80)[None]
            features = tiny_model.encoder(mel)
            tokenizer = get_tokenizer(True, num_languages=tiny_model.num_languages, language=language or "en",
                                      task="transcribe")
            prefix = list(tokenizer.sot_sequence_including_notimestamps)
            tokens = prefix + tokenizer.encode(" " + text) + [tokenizer.eot]
            logits = tiny_model.decoder(torch.tensor([tokens[:-1]]), features)[0]
            expected = F.cross_entropy(logits[len(prefix) - 1:], torch.tensor(tokens[len(prefix):])).item()
            assert isinstance(result, Score) and result.error is None and not result.too_long
            assert result.nll == pytest.approx(expected, abs=1e-4)
            assert result.reward == pytest.approx(tts_reward(result.cer, result.nll))
    one_by_one = ww.WhisperScorer(tiny_model, "cpu", "en", batch_size=1, max_transcript_tokens=6).score(audios, texts, languages)
    assert [r.transcript for r in one_by_one] == [r.transcript for r in results]


def test_bad_inputs_are_answered_not_fatal(tiny_model):
    good = [noise(1.0, 1), noise(2.0, 2)]
    long_clip = noise(31.0, 3)
    cases = [  # (audio, text, language, words expected in the error)
        (np.where(np.arange(16000) == 7, np.nan, good[0][:16000]).astype(np.float32), "hello", None, "NaN"),
        (np.where(np.arange(16000) == 7, np.inf, good[0][:16000]).astype(np.float32), "hello", None, "inf"),
        ((good[0] * 32767).astype(np.int16), "hello", None, "int16"),
        (np.stack([good[0], good[0]]), "hello", None, "1-D"),
        (good[0], "   ", None, "text is empty"),
        (good[0], "?!", None, "normalization"),
        (good[0], "hello", "klingon", "unknown language"),
        (long_clip, "a long clip", None, "the clip's 31.00 s is longer than Whisper's 30 s window"),
    ]
    exactly_30_s = long_clip[:whisper.audio.N_SAMPLES]
    audios = [good[0]] + [c[0] for c in cases] + [good[1], exactly_30_s, good[1].astype(np.float64)]
    texts = ["a good clip"] + [c[1] for c in cases] + ["another good clip", "a long clip", "another good clip"]
    languages = [None] + [c[2] for c in cases] + [None, None, None]
    scorer = ww.WhisperScorer(tiny_model, "cpu", "en", batch_size=4, max_transcript_tokens=6)
    results = scorer.score(audios, texts, languages)
    for (_, _, _, words), result in zip(cases, results[1:-3]):
        assert result.reward == 0.0 and result.cer is None and result.nll is None
        assert words in result.error, (words, result.error)
    assert [r.too_long for r in results[1:-3]] == [False] * (len(cases) - 1) + [True]  # refused, not cut to 30 s
    alone = scorer.score([good[0], good[1], exactly_30_s], ["a good clip", "another good clip", "a long clip"])
    for result, reference in zip([results[0], results[-3], results[-2]], alone):
        assert result.error is None and not result.too_long and result.nll == pytest.approx(reference.nll, abs=1e-4)
    assert results[-1].nll == pytest.approx(results[-3].nll, abs=1e-4)  # float64 is converted
    dims = whisper.model.ModelDimensions(**{**vars(tiny_model.dims), "n_vocab": 51864})  # an English-only vocabulary
    english_only = ww.WhisperScorer(whisper.model.Whisper(dims), "cpu", max_transcript_tokens=2)
    assert "English-only" in english_only.score([good[0]], ["hello"], ["ko"])[0].error
    with pytest.raises(ValueError, match="match one to one"):
        scorer.score(good, ["only one text"])


def test_silence_is_scored_not_refused(tiny_model, reward_module):
    """Empty or all-zero audio is the policy's answer: transcript "", CER 1, NLL of the zero window."""
    silences = [np.zeros(0, np.float32), np.zeros(16000, np.float32), np.zeros(48000, np.float32)]
    texts = ["hello", "hello there", "안녕하세요"]
    for language in ("en", None):  # None: no decode to read the language from, so it is detected
        scorer = ww.WhisperScorer(tiny_model, "cpu", language, batch_size=4, max_transcript_tokens=6)
        results = scorer.score(silences + [noise(1.0, 4)], texts + ["a clip"])
        with torch.no_grad():
            mel = whisper.log_mel_spectrogram(np.zeros(whisper.audio.N_SAMPLES, np.float32), 80)[None]
            features = tiny_model.encoder(mel)  # every silence pads to the same all-zero window
            detected = language or max(whisper.decoding.detect_language(tiny_model, features)[1][0].items(),
                                       key=lambda kv: kv[1])[0]
            tokenizer = get_tokenizer(True, num_languages=tiny_model.num_languages, language=detected)
            for text, result in zip(texts, results):
                prefix = list(tokenizer.sot_sequence_including_notimestamps)
                tokens = prefix + tokenizer.encode(" " + text) + [tokenizer.eot]
                logits = tiny_model.decoder(torch.tensor([tokens[:-1]]), features)[0]
                nll = F.cross_entropy(logits[len(prefix) - 1:], torch.tensor(tokens[len(prefix):])).item()
                assert result.error is None and not result.too_long, result
                assert result.transcript == "" and result.cer == 1.0
                assert result.nll == pytest.approx(nll, abs=1e-4)
                assert result.reward == pytest.approx(tts_reward(1.0, result.nll)) and result.reward < 0.01
        assert results[-1].error is None  # a clip beside them is scored as usual
    custom = ww.CustomRewardScorer(reward_module)  # a user's reward hears silence too: empty stays empty
    assert custom.score(silences[:2], ["empty?", "silent"]) == [Score(reward=0.75), Score(reward=0.0)]
    assert custom.score([np.full(40 * 16000, 0.5, np.float32)], ["x"]) == [Score(reward=0.5)]  # no 30 s limit


KOREAN_150 = ("오늘은 날씨가 정말 좋아서 가족과 함께 한강 공원에 가서 자전거를 타고 산책을 했습니다. 점심에는 근처 식당에서 "
              "맛있는 비빔밥과 된장찌개를 먹었고, 오후에는 도서관에 들러 읽고 싶었던 소설책을 몇 권 빌렸습니다. 저녁에는 "
              "친구들과 영화를 보며 즐거운 시간을 보냈습니다.")
CHINESE = ("今天天气非常好，我们一家人一起去公园散步，然后在附近的餐厅吃了午饭。"
           "下午我们去图书馆看书，晚上和朋友们一起看电影。")


def test_whisper_transcript_bound_follows_the_target(tiny_model, monkeypatch):
    """A long Korean or Chinese transcript is not cut by a fixed cap: the bound derives from the target."""
    assert ww.transcript_bound(10, limit=444) == 30 and ww.transcript_bound(10, limit=444, cap=16) == 16
    assert ww.transcript_bound(300, limit=444) == 444 and ww.transcript_bound(0, limit=444, cap=None) == 10
    tokenizer = get_tokenizer(True, num_languages=tiny_model.num_languages)
    n_target = {text: len(tokenizer.encode(" " + text)) for text in (KOREAN_150, CHINESE, "Hi.")}
    assert len(KOREAN_150) >= 150 and len(CHINESE) >= 50
    seen, decode = [], whisper.decode

    def spy(model, features, options):
        results = decode(model, features, options)
        seen.append((options.sample_len, [len(r.tokens) for r in results]))
        return results

    monkeypatch.setattr(ww.whisper, "decode", spy)
    scorer = ww.WhisperScorer(tiny_model, "cpu", batch_size=4)  # no cap; languages detected per clip
    audios = [noise(1.0, 7), noise(8.0, 8), noise(6.0, 9)]
    texts = ["Hi.", KOREAN_150, CHINESE]
    results = scorer.score(audios, texts, [None, "korean", "Chinese"])
    assert all(r.error is None for r in results), results
    (ko_len, ko_tokens), (zh_len, _), (en_len, _) = sorted(seen, key=lambda s: -s[0])
    # Room for the whole transcript, even spelled with twice the target's tokens (the old fixed cap was 128).
    assert ko_len >= 2 * n_target[KOREAN_150] > 128 and zh_len >= 2 * n_target[CHINESE]
    assert ko_len <= tiny_model.dims.n_text_ctx - 4 and en_len == 2 * n_target["Hi."] + 10
    assert all(n <= length for length, tokens in seen for n in tokens)  # random weights still stop

    def chatty(model, features, options):  # a model that never stops: the same word at every step
        seen.append((options.sample_len, None))
        return [whisper.DecodingResult(features, language="en", tokens=[tokenizer.encode(" la")[0]] * options.sample_len)
                for _ in features]

    seen.clear()
    monkeypatch.setattr(ww.whisper, "decode", chatty)
    mixed = ww.WhisperScorer(tiny_model, "cpu", "en", batch_size=4).score(audios, texts)  # one batch
    assert [length for length, _ in seen] == [2 * n_target[KOREAN_150] + 10]  # the batch decodes to its longest bound
    # Each transcript is cut at its own target's bound, as if decoded alone.
    assert [len(tokenizer.encode(" " + r.transcript)) for r in mixed] == [2 * n_target[t] + 10 for t in texts]
    seen.clear()
    ww.WhisperScorer(tiny_model, "cpu", "ko", max_transcript_tokens=16).score(audios[1:2], texts[1:2])
    assert [length for length, _ in seen] == [16]


def test_whisper_failed_batch_is_retried_clip_by_clip(tiny_model, monkeypatch):
    """One clip whose NLL overflows (or whose scoring raises) costs only its own score."""
    tokenizer = get_tokenizer(True, num_languages=tiny_model.num_languages)
    poison = tokenizer.encode(" poisoned clip") + [tokenizer.eot]
    audios = [noise(1.0 + i / 2, 20 + i) for i in range(5)]
    texts = ["first clip", "second clip", "poisoned clip", "fourth clip", "fifth clip"]
    scorer = ww.WhisperScorer(tiny_model, "cpu", "en", batch_size=4, max_transcript_tokens=6)
    expected = [scorer.score([a], [t])[0] for a, t in zip(audios, texts)]  # each clip alone, unpatched
    nll = ww.teacher_forced_nll
    for how, error in [("nan", "scoring failed: FloatingPointError: non-finite NLL (nan) of the text 'poisoned clip'"),
                       ("raise", "scoring failed: RuntimeError: decoder exploded")]:
        def failing(model, features, sequences, n_prefix):
            poisoned = [seq[-len(poison):] == poison for seq in sequences]
            if how == "raise" and any(poisoned):
                raise RuntimeError("decoder exploded")
            return [math.nan if p else v for p, v in zip(poisoned, nll(model, features, sequences, n_prefix))]

        monkeypatch.setattr(ww, "teacher_forced_nll", failing)
        results = scorer.score(audios, texts)
        assert results[2] == Score(reward=0.0, error=error)
        for result, reference in zip(results[:2] + results[3:], expected[:2] + expected[3:]):
            assert result.error is None and result.transcript == reference.transcript
            assert result.nll == pytest.approx(reference.nll, abs=1e-4)
            assert result.reward == pytest.approx(reference.reward, abs=1e-6)


def test_whisper_model_languages_and_language_code(tiny_model):
    languages = list(whisper.tokenizer.LANGUAGES)
    assert ww.model_languages("tiny.en") == ww.model_languages("medium.en") == frozenset({"en"})
    for name in ("large-v3", "large-v3-turbo", "turbo"):
        assert ww.model_languages(name) == frozenset(languages[:100]) and "yue" in ww.model_languages(name)
    for name in ("random-tiny", "tiny", "large-v2"):
        assert ww.model_languages(name) == frozenset(languages[:99]) and "yue" not in ww.model_languages(name)
    assert ww.model_languages(tiny_model) == frozenset(languages[:99])
    dims = whisper.model.ModelDimensions(**{**vars(tiny_model.dims), "n_vocab": 51866})  # large-v3's vocabulary
    assert "yue" in ww.model_languages(whisper.model.Whisper(dims))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ww.model_languages("no-such-model")
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if os.path.isfile(checkpoint):  # read from its dims, without loading the weights
        assert ww.model_languages(checkpoint) == frozenset({"en"})
    assert [ww.language_code(x) for x in ("korean", "Korean", " ko ", "KO", "Mandarin", "yue")] == \
        ["ko", "ko", "ko", "ko", "zh", "yue"]
    for bad in ("klingon", "", None):
        with pytest.raises(ValueError, match=f"unknown language {bad!r}"):
            ww.language_code(bad)
    scorer = ww.WhisperScorer(tiny_model, "cpu", "Korean", max_transcript_tokens=2)
    assert scorer.language == "ko" and scorer.languages == frozenset(languages[:99])
    assert "not one of this Whisper model's 99 languages" in scorer.score([noise(1.0, 0)], ["x"], ["yue"])[0].error
    if not os.path.isfile(checkpoint):
        pytest.skip(f"{checkpoint} not found (set TEST_ASSETS): the checkpoint-file case was not run")


# ---- WhisperWorker ------------------------------------------------------------------------------------

REWARD_MODULE = '''
import time
import numpy as np

def peak(audio, text):
    if text == "boom":
        raise ValueError("boom from the user's reward")
    if text == "sleep":
        time.sleep(60)
    if text == "exit":
        raise SystemExit(3)
    if text == "empty?":
        return 0.75 if audio.shape == (0,) and audio.dtype == np.float32 else 0.0
    return float("nan") if text == "nan" else float(np.abs(audio).max())
'''


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_reward")
    (folder / "user_reward_mod.py").write_text(REWARD_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))  # the spawned worker inherits sys.path
        yield "user_reward_mod:peak"


@pytest.fixture(scope="module")
def tiny_worker():
    with ww.WhisperWorker(TINY, start_timeout=120, threads=1, request_timeout=120) as worker:
        yield worker


def test_worker_serves_concurrent_clients(tiny_worker):
    requests = [([noise(1.0 + i, 10 * k + i) for i in range(3)], [f"clip {k} {i}" for i in range(3)]) for k in range(2)]
    scorer = ww.WhisperScorer(**TINY)
    expected = [scorer.score(audios, texts) for audios, texts in requests]
    info = pickle.loads(pickle.dumps(tiny_worker.connect_info()))  # as another rank receives it
    answers, errors = {}, []

    def client(k):
        try:
            c = ww.WorkerClient(info, request_timeout=120)
            answers[k] = [c.score(*requests[k]) for _ in range(2)]
            c.close()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for k in range(2):
        for answer in answers[k]:
            assert all(isinstance(r, Score) for r in answer)  # Scores pickle through the socket
            assert [r.transcript for r in answer] == [r.transcript for r in expected[k]]
            assert [r.nll for r in answer] == pytest.approx([r.nll for r in expected[k]], abs=1e-4)


def test_worker_survives_bad_clients(tiny_worker):
    audios, texts = [noise(2.0, i) for i in range(6)], [f"clip {i}" for i in range(6)]
    impatient = ww.WorkerClient(tiny_worker.connect_info(), request_timeout=0.01)
    with pytest.raises(TimeoutError, match="request_timeout=0.01"):
        impatient.score(audios, texts)
    impatient.close()
    address, _, folder, pid = tiny_worker.connect_info()
    with pytest.raises(multiprocessing.AuthenticationError):
        ww.WorkerClient((address, os.urandom(32), folder, pid))
    result = tiny_worker.score(audios[:1] + [np.zeros(0, np.float32), noise(31.0, 0)], texts[:1] + ["silence", "long"])
    assert result[0].error is None and result[0].nll > 0
    assert result[1].error is None and result[1].cer == 1.0 and result[1].transcript == ""  # silence is scored
    assert result[2].too_long and result[2].reward == 0.0 and "31.00 s is longer" in result[2].error


def test_custom_reward_worker(reward_module):
    with ww.WhisperWorker({}, reward=reward_module, start_timeout=120, threads=1, request_timeout=120) as worker:
        sine = (0.3 * np.sin(np.arange(16000) / 5.0)).astype(np.float64)  # converted to float32 on the way
        results = worker.score([sine, np.full(100, 0.5, np.float32), noise(1.0, 1), np.full(10, 1.5, np.float32),
                                np.zeros(10, np.float32), np.zeros(0, np.float32), np.full(31 * 16000, 0.5, np.float32)],
                               ["sine", "half", "nan", "too loud", "silent", "empty?", "long"])
        assert results[0].reward == pytest.approx(float(np.abs(sine.astype(np.float32)).max()))
        assert results[1] == Score(reward=0.5, transcript="", cer=None, nll=None, error=None, too_long=False)
        assert results[2].reward == 0.0 and "returned nan" in results[2].error
        assert results[3].reward == 0.0 and "returned 1.5, not a number in [0, 1]" in results[3].error
        assert results[4:] == [Score(reward=0.0), Score(reward=0.75), Score(reward=0.5)]  # silence heard; no 30 s limit
        with pytest.raises(ww.WorkerError, match="(?s)user_reward_mod.py.*ValueError: boom from the user's reward"):
            worker.score([noise(1.0, 0)], ["boom"])
        assert worker.score([np.full(10, 0.25, np.float32)], ["fine again"])[0].reward == 0.25


def test_worker_start_errors(reward_module):
    with pytest.raises(ww.WorkerError, match="No module named 'no_such_reward_module'"):
        ww.WhisperWorker({}, reward="no_such_reward_module:f", start_timeout=120, threads=1).start()
    with pytest.raises(AttributeError, match="has no function 'missing'"):
        ww.CustomRewardScorer(reward_module.replace("peak", "missing"))


def test_killed_worker_is_detected(reward_module):
    worker = ww.WhisperWorker({}, reward=reward_module, start_timeout=120, threads=1, request_timeout=300).start()
    outcomes = {}

    def call(name, score):
        start = time.monotonic()
        try:
            score([noise(1.0, 0)], ["sleep"])
        except Exception as e:  # noqa: BLE001 -- asserted below
            outcomes[name] = (e, time.monotonic() - start)

    other = ww.WorkerClient(worker.connect_info(), request_timeout=300)
    threads = [threading.Thread(target=call, args=(name, f)) for name, f in (("owner", worker.score), ("other", other.score))]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both requests in flight, the worker asleep in the user's function
    os.kill(worker.connect_info()[3], signal.SIGKILL)
    for t in threads:
        t.join(70)
    for name in ("owner", "other"):
        error, elapsed = outcomes[name]
        assert isinstance(error, ww.WorkerDiedError) and elapsed < 60, (name, error, elapsed)
        assert "exit code -9 (killed by SIGKILL)" in str(error)
    with pytest.raises(ww.WorkerDiedError):
        ww.WorkerClient(worker.connect_info())
    worker.close()
    worker.close()  # idempotent


def test_worker_death_by_exception_carries_traceback(reward_module):
    with ww.WhisperWorker({}, reward=reward_module, start_timeout=120, threads=1, request_timeout=120) as worker:
        start = time.monotonic()
        with pytest.raises(ww.WorkerDiedError, match="(?s)exit code 3.*SystemExit: 3"):
            worker.score([noise(1.0, 0)], ["exit"])
        assert time.monotonic() - start < 60


# ---- CLI and real Whisper -------------------------------------------------------------------------------

def test_cli_scores_a_jsonl(tmp_path, capsys):
    mono = noise(1.0, 5)
    sf.write(tmp_path / "mono.wav", mono, 16000)
    sf.write(tmp_path / "stereo.wav", np.stack([mono, 0.5 * mono], axis=1), 16000)
    sf.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), 16000)
    (tmp_path / "clips.jsonl").write_text('{"wav": "mono.wav", "text": "hello"}\n{"wav": "stereo.wav", "text": "hello"}\n'
                                          '\n{"wav": "silent.wav", "text": "hello", "language": "english"}\n')
    ww.main(["--model", "random-tiny", "--language", "en", "--jsonl", str(tmp_path / "clips.jsonl"),
             "--tau-n", "50"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [os.path.basename(r["wav"]) for r in rows] == ["mono.wav", "stereo.wav", "silent.wav"]
    assert all(list(r) == ["wav", "text", "reward", "transcript", "cer", "nll", "error", "too_long"] for r in rows)
    assert all(r["error"] is None and r["text"] == "hello" and r["nll"] > 0 and not r["too_long"] for r in rows)
    assert rows[0]["reward"] == pytest.approx(tts_reward(rows[0]["cer"], rows[0]["nll"], tau_n=50))
    assert rows[2]["cer"] == 1.0 and rows[2]["transcript"] == ""
    stereo_as_mono = ww.WhisperScorer("random-tiny", "cpu", "en").score([0.75 * mono], ["hello"])[0]
    assert rows[1]["nll"] == pytest.approx(stereo_as_mono.nll, abs=1e-4)
    sf.write(tmp_path / "narrow.wav", mono, 8000)
    with pytest.raises(ValueError, match="narrow.wav: sample rate 8000 Hz"):
        ww.read_wav(str(tmp_path / "narrow.wav"))
    for bad, why in [('{"wav": "mono.wav"}', "expected string fields 'wav' and 'text'"),
                     ('{"wav": "mono.wav", "text": "x", "language": 3}', "field 'language' must be a string"),
                     ('{"wav": "mono.wav", "text": }', r"not valid JSON \(Expecting value at column 29\)")]:
        (tmp_path / "bad.jsonl").write_text('{"wav": "mono.wav", "text": "fine"}\n\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {why}"):
            ww.main(["--model", "random-tiny", "--jsonl", str(tmp_path / "bad.jsonl")])


def test_whisper_worker_layout():
    """Public names first, in reading order; each private helper after the first public one it serves."""
    source = open(ww.__file__, encoding="utf-8").read()
    defs = [node for node in ast.parse(source).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    names = [node.name for node in defs]
    public = ["WhisperScorer", "model_languages", "language_code", "teacher_forced_nll", "load_whisper",
              "random_tiny_whisper", "check_audio", "check_text", "CustomRewardScorer", "WhisperWorker",
              "WorkerClient", "WorkerError", "WorkerDiedError", "read_wav", "main"]
    assert [n for n in names if n in public] == public
    for i, node in enumerate(defs):
        if node.name.startswith("_"):
            users = [j for j, user in enumerate(defs) if j != i and any(
                isinstance(n, ast.Name) and n.id == node.name for n in ast.walk(user))]
            assert users and min(users) < i, f"{node.name} is defined before the code that uses it"
    assert max(map(len, source.splitlines())) < 110


def test_real_whisper_ranks_clean_above_noisy_above_silence():
    checkpoint, clips_file = os.path.join(ASSETS, "whisper-tiny.en.pt"), os.path.join(ASSETS, "speech", "clips.jsonl")
    if not (os.path.isfile(checkpoint) and os.path.isfile(clips_file)):
        pytest.skip(f"real-Whisper assets not found in {ASSETS} (set TEST_ASSETS to the folder with "
                    "whisper-tiny.en.pt and speech/clips.jsonl)")
    rows = [json.loads(line) for line in open(clips_file)]
    audios = [ww.read_wav(os.path.join(ASSETS, "speech", r["wav"])) for r in rows]
    silences = [i for i, r in enumerate(rows) if r["kind"] == "silence"]
    assert all(not audios[i].any() for i in silences)  # all-zero clips, as a collapsed policy answers
    # With -80 dBFS dither, silence goes through Whisper's greedy decode as well.
    dithered = [audios[i] + noise(len(audios[i]) / 16000, i, scale=1e-4) for i in silences]
    clean = [i for i, r in enumerate(rows) if r["kind"] == "clean"]
    long_clip = np.concatenate([audios[clean[k % len(clean)]] for k in range(2 * len(clean))])
    while len(long_clip) <= whisper.audio.N_SAMPLES:  # enough clean speech to pass 30 s
        long_clip = np.concatenate([long_clip, audios[clean[0]]])
    results = ww.WhisperScorer(checkpoint, "cpu", "en").score(
        audios + dithered + [long_clip],
        [r["text"] for r in rows] + [rows[i]["text"] for i in silences] + [" ".join(rows[i]["text"] for i in clean)])
    by_kind = {}
    for row, result in zip(rows + [{"kind": "dithered silence"}] * len(silences) + [{"kind": "long"}], results):
        by_kind.setdefault(row["kind"], []).append(result)
    mean = {kind: float(np.mean([r.reward for r in rs])) for kind, rs in by_kind.items()}
    print("\nmean reward", {kind: round(m, 4) for kind, m in mean.items()},
          "\nclean CER", [round(r.cer, 3) for r in by_kind["clean"]], "NLL", [round(r.nll, 3) for r in by_kind["clean"]],
          "\nnoisy CER", [round(r.cer, 3) for r in by_kind["noisy"]], "NLL", [round(r.nll, 3) for r in by_kind["noisy"]],
          "\nsilence NLL", [round(r.nll, 2) for r in by_kind["silence"]],
          "\ndithered silence", [(r.transcript, round(r.nll, 2)) for r in by_kind["dithered silence"]])
    assert mean["clean"] > mean["noisy"] > mean["silence"]
    for r in by_kind["silence"]:  # scored, not refused: the policy's answer, CER 1
        assert r.error is None and r.transcript == "" and r.cer == 1.0 and math.isfinite(r.nll) and r.reward < 0.05
    assert all(c.reward > 10 * s.reward for c, s in zip(by_kind["clean"], by_kind["dithered silence"]))
    assert mean["noisy"] > mean["dithered silence"]
    assert np.mean([r.cer for r in by_kind["clean"]]) < 0.15
    [long] = by_kind["long"]  # clean speech, but past Whisper's window: refused, not judged on its first 30 s
    assert long.reward == 0.0 and long.too_long and long.cer is None
    assert f"{len(long_clip) / 16000:.2f} s is longer than Whisper's 30 s window" in long.error


# ==================================================================================================
# Rollouts: data.py and sample.py (issue 3)
# ==================================================================================================

def test_load_dataset_formats_and_errors(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": " Hello. ", "id": "a", "language": "en"}\n\n{"text": "안녕"}\n', encoding="utf-8")
    rows = data.load_dataset(str(jl))
    assert [(r.text, r.id, r.language) for r in rows] == [("Hello.", "a", "en"), ("안녕", "d.jsonl:3", None)]
    txt = tmp_path / "d.txt"
    txt.write_text("one\n\ntwo\n", encoding="utf-8")
    assert [r.text for r in data.load_dataset(str(txt))] == ["one", "two"]
    for i, (bad, why) in enumerate([('{"text": 3}', "string field 'text'"), ("{oops", "not valid JSON"),
                                    ('{"text": "  "}', "empty"), ('{"text": "x", "language": 1}', "language")]):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text('{"text": "fine"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"bad{i}\.jsonl:2: .*{why}"):
            data.load_dataset(str(f))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.load_dataset(str(tmp_path / "missing.jsonl"))
    assert len(data.load_dataset(data.SAMPLE_DATA)) >= 24  # the shipped sample data parses


def test_llasa_prompt_and_speech_vocab():
    tok = data.tiny_tokenizer(n_speech=300)
    ids = data.prompt_ids(tok, "Hi 안녕")
    text = tok.decode(ids)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nConvert the text to speech:"
                    "<|TEXT_UNDERSTANDING_START|>Hi 안녕<|TEXT_UNDERSTANDING_END|><|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n<|SPEECH_GENERATION_START|>")
    assert "<|eot_id|>" not in tok.decode(ids[-3:])  # continue_final_message: no end of turn after the start
    sv = data.speech_vocab(tok)
    assert sv.n == 300 and tok.convert_ids_to_tokens(sv.first + 7) == "<|s_7|>"
    assert sv.end_id == tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    assert set(sv.allowed_ids()) == set(range(sv.first, sv.first + 300)) | {sv.end_id}
    assert sv.to_codes([sv.first + 5, sv.first]) == [5, 0]
    with pytest.raises(ValueError, match="non-speech"):
        sv.to_codes([sv.end_id])
    with pytest.raises(ValueError, match="empty text"):
        data.prompt_ids(tok, "  ")
    assert data.tiny_tokenizer().get_vocab() == data.tiny_tokenizer().get_vocab()  # deterministic ids


VOCAB = 300
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 150, 40], [17] * 3 + list(range(60, 71))]
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def left_padded(prompts, pad=0):
    """HF's batched-generate input: left-padded ids [B, P] and attention mask [B, P]."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


def hf_greedy(model, prompts, n, eos=None):
    ids, mask = left_padded(prompts)
    kw = dict(eos_token_id=eos) if eos is not None else dict(min_new_tokens=n)  # min_new_tokens: no stop
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)],
                         ids=["untied", "tied-llama3rope"])
def test_greedy_equals_hf_generate(overrides):
    model = sample.tiny_llama(VOCAB, seed=1, **overrides)
    if overrides:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.config.rope_scaling["rope_type"] == "llama3"
    n = 40
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0)
    ref = hf_greedy(model, PROMPTS, n)
    assert torch.equal(ours.tokens, ref)
    assert ours.lengths.tolist() == [n] * len(PROMPTS) and not ours.finished.any()

    # A stop id that row 0 emits mid-way: that row ends there, the others run on (or stop too).
    stop = int(ref[0, 10])
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, stop_ids=(stop,))
    ref_stop = hf_greedy(model, PROMPTS, n, eos=stop)  # HF fills finished rows with pad_token_id 0
    assert torch.equal(ours.tokens, ref_stop)
    for i in range(len(PROMPTS)):
        hits = (ref[i] == stop).nonzero()
        expected_len = int(hits[0]) + 1 if len(hits) else n
        assert int(ours.lengths[i]) == expected_len
        assert bool(ours.finished[i]) == bool(len(hits))
    assert ours.lengths[0] <= 11 and ours.finished[0]



def test_greedy_repetition_penalty_equals_hf_generate():
    """The penalty covers prompt and generated ids, as HF's does. HF is run one prompt at a time:
    in a left-padded batch it would penalize the pad token too."""
    model = sample.tiny_llama(VOCAB, seed=1)
    n = 30
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, repetition_penalty=1.5)
    for i, p in enumerate(PROMPTS):
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             repetition_penalty=1.5, pad_token_id=0)[0, len(p):]
        assert ours.tokens[i].tolist() == ref.tolist()
    plain = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0)
    assert not torch.equal(ours.tokens, plain.tokens)  # the penalty changed something


def test_greedy_bf16_runs_and_logprobs_are_finite():
    model = sample.tiny_llama(VOCAB, seed=1).to(torch.bfloat16)
    out = sample.generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    assert out.tokens.shape == (len(PROMPTS), 12) and out.logprobs.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all() and (out.logprobs < 0).all()
    assert torch.equal(out.tokens, hf_greedy(model, PROMPTS, 12))


def test_logprobs_equal_teacher_forced_forward():
    """Rollout log-probs are log_softmax(logits / T) of the unfiltered policy, as the trainer recomputes
    them, even with top-k and the repetition penalty shaping what is sampled."""
    model = sample.tiny_llama(VOCAB, seed=2)
    T = 0.8
    g = torch.Generator().manual_seed(0)
    out = sample.generate(model, PROMPTS, max_new_tokens=30, temperature=T, top_k=40, repetition_penalty=1.3,
                          stop_ids=(7, 8, 9), generator=g)
    assert out.finished.any()  # some rows stop early, so the zero padding is exercised too
    # Computed under inference_mode, returned as ordinary tensors: autograd may save them (old log-probs).
    w = torch.ones((), requires_grad=True)
    (out.logprobs * w).sum().backward()
    for i, p in enumerate(PROMPTS):
        n = int(out.lengths[i])
        gen = out.tokens[i, :n]
        with torch.no_grad():
            logits = model(torch.tensor([p + gen.tolist()])).logits[0, len(p) - 1:len(p) - 1 + n]  # [n, V]
        expected = torch.log_softmax(logits.float() / T, dim=-1).gather(1, gen[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[i, :n], expected, atol=1e-4, rtol=0)
        assert (out.logprobs[i, n:] == 0).all() and (out.tokens[i, n:] == 0).all()


def test_seeded_sampling_is_reproducible():
    model = sample.tiny_llama(VOCAB, seed=3)

    def run(seed):
        return sample.generate(model, PROMPTS, max_new_tokens=20, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_sample_token_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.log().expand(40000, -1)  # 40000 independent draws in one batch
    draws = sample.sample_token(logits, greedy=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[4] == 0


def test_logits_processing_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, generator=g) * 3
    ids = torch.randint(0, 64, (6, 20), generator=g)
    seen = torch.zeros(6, 64, dtype=torch.bool).scatter_(1, ids, True)
    close = dict(atol=1e-6, rtol=1e-6)

    torch.testing.assert_close(sample.apply_repetition_penalty(logits, seen, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()), **close)
    for k in (1, 5, 64, 100):
        torch.testing.assert_close(sample.apply_top_k(logits, k), TopKLogitsWarper(k)(ids, logits.clone()), **close)
    for p in (0.05, 0.5, 0.9, 0.999):
        torch.testing.assert_close(sample.apply_top_p(logits, p), TopPLogitsWarper(p)(ids, logits.clone()), **close)
    torch.testing.assert_close(
        sample.process_logits(logits, temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
        TemperatureLogitsWarper(0.7)(ids, logits.clone()), **close)

    # The whole chain, in HF's order: repetition penalty, temperature, top-k, top-p.
    expected = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.9)):
        expected = proc(ids, expected)
    got = sample.process_logits(logits, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seen=seen)
    torch.testing.assert_close(got, expected, **close)
    assert torch.isinf(got).any() and torch.isfinite(got).any()  # the filters did something


def test_allowed_ids_and_stops():
    model = sample.tiny_llama(VOCAB, seed=4)
    stop = 299
    allowed = list(range(150, 170)) + [stop]
    # A near-uniform model over 21 tokens stops within 16 steps with p ~ 0.54 per row: among 24 rows,
    # "all stopped" or "none stopped" has probability ~1e-6 whatever the random stream.
    prompts = PROMPTS * 6
    n = 16

    def run(stop_ids):
        return sample.generate(model, prompts, max_new_tokens=n, temperature=1.0, stop_ids=stop_ids,
                               allowed_ids=allowed, generator=torch.Generator().manual_seed(0))

    free, out = run(()), run((stop,))
    assert set(free.tokens.flatten().tolist()) <= set(allowed)
    assert out.finished.any() and not out.finished.all()
    for i in range(len(prompts)):
        n_i = int(out.lengths[i])
        row = out.tokens[i, :n_i].tolist()
        assert set(row) <= set(allowed)
        if out.finished[i]:
            assert row[-1] == stop and stop not in row[:-1]
        else:
            assert n_i == n and stop not in row
        # Rows are independent and draw the same random numbers: up to its stop a row is exactly
        # the unstopped run's row; after it, nothing changes (zeros, log-prob 0).
        assert row == free.tokens[i, :n_i].tolist()
        assert (out.tokens[i, n_i:] == 0).all() and (out.logprobs[i, n_i:] == 0).all()
        assert (out.logprobs[i, :n_i] < 0).all()


def test_bad_inputs_raise_clear_errors():
    model = sample.tiny_llama(VOCAB, max_positions=64)
    gen = lambda prompts=PROMPTS, **kw: sample.generate(model, prompts, **{"max_new_tokens": 4, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="prompts is empty"):
        gen([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen([[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 has token ids outside the vocabulary"):
        gen([[1, VOCAB]])
    with pytest.raises(ValueError, match="prompt of 14 tokens \\+ max_new_tokens=60 exceeds .* context of 64"):
        gen(max_new_tokens=60)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        gen(max_new_tokens=0)
    for kw, msg in [(dict(top_p=0.0), "top_p must be in \\(0, 1\\], got 0.0"), (dict(top_p=1.5), "got 1.5"),
                    (dict(temperature=-0.1), "temperature must be >= 0"), (dict(top_k=-1), "top_k must be >= 0"),
                    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
                    (dict(allowed_ids=[1, VOCAB + 5]), f"allowed_ids has ids outside .*{VOCAB + 5}"),
                    (dict(stop_ids=[-1]), "stop_ids has ids outside"),
                    (dict(allowed_ids=[1, 2], stop_ids=[3]), "stop ids \\[3\\] are not in allowed_ids")]:
        with pytest.raises(ValueError, match=msg):
            gen(**kw)
    with pytest.raises(KeyError, match="<\\|s_9999\\|>"):
        data.token_id(data.tiny_tokenizer(), "<|s_9999|>")


def test_cli_tiny_model_writes_wav(tmp_path, capsys):
    out_path = tmp_path / "tts.wav"
    r = sample.main(["--model", "tiny", "--codec", "tone", "--text", "Hello there.", "--out", str(out_path),
                     "--max-new-tokens", "24", "--device", "cpu", "--seed", "3"])
    wav, sr = soundfile.read(out_path)
    n_speech = int(r.lengths[0]) - int(r.finished[0])
    assert sr == codec.SAMPLE_RATE and n_speech > 0
    assert len(wav) == 320 * n_speech
    assert "wrote" in capsys.readouterr().out
    vocab = data.speech_vocab(sample.load_model("tiny")[1])  # the CLI's tiny model: 64 speech tokens
    assert vocab.n == 64 and vocab.to_codes(r.tokens[0, :n_speech].tolist())  # all speech tokens


def test_load_model_round_trip(tmp_path):
    model, tok = sample.tiny_llama(len(data.tiny_tokenizer()), seed=5), data.tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = sample.load_model(str(tmp_path), "cpu", torch.float32)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    a = sample.generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    b = sample.generate(loaded, PROMPTS, max_new_tokens=8, temperature=0)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nope"):
        sample.load_model(str(tmp_path / "nope"), "cpu", torch.float32)


# -- the speech-only head (DESIGN.md §2): the policy restricted to allowed_ids and renormalized

ALLOWED = list(range(100, 160)) + [299]  # holds some prompt ids (100, 150) and one stop id


def masked_hf_greedy(model, prompts, n, allowed, **kw):
    """HF greedy with a logits processor that sets every id outside `allowed` to -inf."""
    from transformers import LogitsProcessorList

    def mask(input_ids, scores):
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
        keep[allowed] = True
        return scores.masked_fill(~keep, float("-inf"))

    ids, att = left_padded(prompts)
    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([mask]), **kw)
    return out[:, ids.shape[1]:]


def test_allowed_ids_greedy_equals_masked_hf_generate():
    """Logits of the allowed rows only pick the same tokens as masking the full logits, with a
    stop id, and with the repetition penalty over the allowed ids of prompt and output."""
    model = sample.tiny_llama(VOCAB, seed=1)
    n = 24
    free = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, allowed_ids=ALLOWED)
    assert torch.equal(free.tokens, masked_hf_greedy(model, PROMPTS, n, ALLOWED, min_new_tokens=n))
    stop = int(free.tokens[1, 5])  # a stop id row 1 emits mid-way
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, allowed_ids=ALLOWED, stop_ids=(stop,))
    assert torch.equal(ours.tokens, masked_hf_greedy(model, PROMPTS, n, ALLOWED, eos_token_id=stop))
    assert ours.finished[1] and int(ours.lengths[1]) <= 6
    pen = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, allowed_ids=ALLOWED,
                          repetition_penalty=1.5)
    for i, p in enumerate(PROMPTS):  # one at a time: in a left-padded batch HF would penalize the pads
        ref = masked_hf_greedy(model, [p], n, ALLOWED, min_new_tokens=n, repetition_penalty=1.5)[0]
        assert pen.tokens[i].tolist() == ref.tolist()
    assert not torch.equal(pen.tokens, free.tokens)  # the penalty changed something


def test_allowed_ids_logprobs_are_the_restricted_policy():
    """Rollout log-probs with allowed_ids are log_softmax over the allowed ids of a teacher-forced
    forward's logits / T, at the sampled token, whatever top-k and the penalty did to sampling."""
    model = sample.tiny_llama(VOCAB, seed=2)
    T = 0.8
    out = sample.generate(model, PROMPTS * 2, max_new_tokens=20, temperature=T, top_k=10, repetition_penalty=1.3,
                          stop_ids=(299, 150), allowed_ids=ALLOWED, generator=torch.Generator().manual_seed(0))
    assert out.finished.any() and not out.finished.all()
    allowed = torch.tensor(sorted(ALLOWED))
    for i, p in enumerate(PROMPTS * 2):
        n = int(out.lengths[i])
        gen = out.tokens[i, :n]
        assert set(gen.tolist()) <= set(ALLOWED)
        with torch.no_grad():
            logits = model(torch.tensor([p + gen.tolist()])).logits[0, len(p) - 1:len(p) - 1 + n]  # [n, V]
        restricted = torch.log_softmax(logits[:, allowed] / T, dim=-1)  # [n, A]
        expected = restricted.gather(1, torch.searchsorted(allowed, gen)[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[i, :n], expected, atol=1e-5, rtol=0)
        full = torch.log_softmax(logits / T, dim=-1).gather(1, gen[:, None])[:, 0]
        assert (out.logprobs[i, :n] > full + 1e-3).all()  # renormalized: not the full-vocabulary log-probs
        assert (out.logprobs[i, n:] == 0).all()


def direct_logprobs(hidden, weight, targets, temperature):
    """The unchunked reference: [B, T, A] logits at once."""
    return torch.log_softmax(hidden @ weight.T / temperature, dim=-1).gather(-1, targets[..., None])[..., 0]


def test_head_logprobs_chunks_equal_the_unchunked_computation():
    """Chunks of 8 over T = 37 (an uneven last chunk): the same log-probs, entropy and gradients
    (w.r.t. hidden and weight) as all logits at once, and backward keeps no [B, T, A] tensor."""
    g = torch.Generator().manual_seed(0)
    B, T, H, A, temp = 2, 37, 16, 50, 0.7
    targets = torch.randint(0, A, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        weight = torch.randn(A, H, generator=g, dtype=torch.float64).mul(0.3).to(dtype).requires_grad_()
        ref = direct_logprobs(hidden, weight, targets, temp)
        ref_grads = torch.autograd.grad(ref, (hidden, weight), upstream.to(dtype))
        logp, entropy = sample.head_logprobs(hidden, weight, targets, temp, chunk=8, with_entropy=True)
        grads = torch.autograd.grad(logp, (hidden, weight), upstream.to(dtype))
        assert logp.shape == (B, T) and logp.dtype == dtype
        torch.testing.assert_close(logp, ref, atol=tol, rtol=0)
        for got, want in zip(grads, ref_grads):  # fp32: summation order only, a few ulps of |grad| ~ 10
            torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=0)
        p = torch.softmax(hidden @ weight.T / temp, dim=-1)
        torch.testing.assert_close(entropy, -(p * p.log()).sum(-1).detach(), atol=tol, rtol=0)
        assert not entropy.requires_grad
        with torch.no_grad():  # the no-grad path (old and reference log-probs) is the same formula
            torch.testing.assert_close(sample.head_logprobs(hidden, weight, targets, temp, chunk=8), ref.detach(),
                                       atol=tol, rtol=0)

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            fn()
        return shapes

    # Checkpointed chunks: autograd keeps only the chunks' inputs, never logits ([..., A]).
    kept = saved_shapes(lambda: sample.head_logprobs(hidden, weight, targets, temp, chunk=8))
    assert kept and all(s[-1] != A for s in kept), kept
    assert (B, T, A) in saved_shapes(lambda: direct_logprobs(hidden, weight, targets, temp))  # the hook sees them


def test_head_rows_train_only_allowed_rows():
    """The trainer's recipe (hidden states of a teacher-forced forward -> head_logprobs over the
    allowed rows) gives the rollout policy's log-probs, and only allowed rows of lm_head get gradient."""
    model = sample.tiny_llama(VOCAB, seed=6)
    allowed_ids = [299] + list(range(159, 99, -1)) + [120]  # any order, duplicates allowed
    weight, index = sample.head_rows(model, allowed_ids)
    assert index.tolist() == sorted(ALLOWED) and weight.shape == (len(ALLOWED), model.config.hidden_size)
    assert torch.equal(weight, model.lm_head.weight[index])
    tokens = torch.tensor([[150, 101, 299, 0, 0], [100, 159, 159, 120, 299]])  # row 0 right-padded
    valid = tokens != 0
    rows = sample.to_rows(tokens, index, valid)
    assert torch.equal(index[rows][valid], tokens[valid]) and (rows[~valid] == 0).all()
    with pytest.raises(ValueError, match=r"token ids \[0\] are not among the 61 allowed ids"):
        sample.to_rows(tokens, index)  # pads not marked invalid are not allowed ids
    prompt = [5, 6, 7, 8]
    ids = torch.cat([torch.tensor([prompt] * 2), tokens], dim=1)  # [2, 9]
    hidden = model.model(input_ids=ids).last_hidden_state[:, len(prompt) - 1:-1]  # [2, 5, H]: predicts tokens
    logp = sample.head_logprobs(hidden, weight, rows, 0.9, chunk=2)
    with torch.no_grad():
        logits = model(ids).logits[:, len(prompt) - 1:-1, index] / 0.9
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, rows[..., None])[..., 0],
                               atol=1e-5, rtol=0)
    (logp * valid).sum().backward()
    grad = model.lm_head.weight.grad  # [V, H]
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[index] = False
    assert (grad[outside] == 0).all()
    assert (grad[index].abs().sum(-1) > 0).all()  # every allowed row is in the softmax's gradient
    full, full_index = sample.head_rows(model)  # None: the full head, no copy
    assert full is model.lm_head.weight and torch.equal(full_index, torch.arange(VOCAB))
    with pytest.raises(ValueError, match="allowed_ids must be a non-empty set of ids in \\[0, 300\\)"):
        sample.head_rows(model, [5, VOCAB])


def test_load_model_tiny():
    """'tiny' is the trainer's and the CLI's offline model: 64 speech tokens, a seeded tiny Llama."""
    model, tok = sample.load_model("tiny", "cpu", torch.float32, seed=7)
    assert data.speech_vocab(tok).n == 64 and model.config.vocab_size == len(tok)
    assert not model.training and model.config.max_position_embeddings == 4096
    ref = sample.tiny_llama(len(tok), seed=7, max_positions=4096)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    other, _ = sample.load_model("tiny", "cpu", torch.bfloat16, seed=8)
    assert next(other.parameters()).dtype == torch.bfloat16
    assert not torch.equal(other.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())


# ==================================================================================================
# Codecs: codec.py, the tone codec and the self-contained XCodec2 decoder (issues 3, 5)
# ==================================================================================================

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "xcodec2_golden.safetensors")


def _golden():
    """(config, codes [2, 1, 30], reference audio [2, 1, 9600]) from the golden file."""
    with safe_open(GOLDEN, framework="pt") as f:
        config = codec.XCodec2Config(**json.loads(f.metadata()["config"]))
        return config, f.get_tensor("test.codes"), f.get_tensor("test.audio")


@pytest.fixture(scope="module")
def golden_codec():
    config, _, _ = _golden()
    return codec.XCodec2Codec(GOLDEN, "cpu", config)


def test_xcodec2_decoder_matches_package_decode_code():
    config, codes, want = _golden()
    model = codec.XCodec2Decoder.from_pretrained(GOLDEN, config)
    with torch.no_grad():
        got = model(codes)
    assert got.shape == want.shape == (2, 1, 30 * codec.SAMPLES_PER_CODE)
    assert want.abs().max() > 0.05  # real audio, not silence that anything would match
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_xcodec2_codec_decode_matches_golden_audio(golden_codec):
    _, codes, want = _golden()
    clips = golden_codec.decode([codes[0, 0], codes[1, 0].tolist()])
    for clip, ref in zip(clips, want[:, 0].numpy()):
        assert clip.dtype == np.float32
        np.testing.assert_allclose(clip, ref, rtol=0, atol=1e-5)


def test_xcodec2_batched_equals_one_by_one(golden_codec):
    _, codes, _ = _golden()
    seqs = [codes[0, 0, :30], codes[1, 0, :7], codes[0, 0, 5:6], codes[0, 0, :0], codes[1, 0, 3:21]]
    batched = golden_codec.decode(seqs)
    alone = [golden_codec.decode([s])[0] for s in seqs]
    for s, b, a in zip(seqs, batched, alone):
        assert len(b) == len(a) == codec.SAMPLES_PER_CODE * len(s)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_xcodec2_padding_would_leak_without_the_mask(golden_codec):
    """Why decode passes lengths: unmasked right-padding changes a shorter clip (attention, GroupNorm)."""
    _, codes, _ = _golden()
    batch = codes.clone()
    batch[1, 0, 7:] = 0  # clip 1 is 7 codes, right-padded with code 0 as the decoder sees it
    with torch.no_grad():
        unmasked = golden_codec.model(batch)[1, 0, :7 * codec.SAMPLES_PER_CODE]
        masked = golden_codec.model(batch, torch.tensor([30, 7]))[1, 0, :7 * codec.SAMPLES_PER_CODE]
        alone = golden_codec.model(batch[1:, :, :7])[0, 0]
    torch.testing.assert_close(masked, alone, rtol=0, atol=1e-5)
    assert (unmasked - alone).abs().max() > 1e-3


def test_fsq_values_are_base4_digits():
    model = codec.XCodec2Decoder(codec.XCodec2Config(hidden_dim=32, depth=1, n_heads=4, vq_dim=64))
    codes = torch.tensor([[0, 65535, 1, 4 ** 7, 2 * 4 + 3]])
    values = model.fsq_values(codes)[0]  # [5, 8]; digit d of 4 levels -> (d - 2) / 2
    assert values[0].tolist() == [-1.0] * 8
    assert values[1].tolist() == [0.5] * 8
    assert values[2].tolist() == [-0.5] + [-1.0] * 7
    assert values[3].tolist() == [-1.0] * 7 + [-0.5]
    assert values[4].tolist() == [0.5, 0.0] + [-1.0] * 6


def test_from_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        codec.XCodec2Decoder.from_pretrained(str(tmp_path))  # a directory without model.safetensors
    with pytest.raises(ValueError, match=r"project_out.weight has shape \(64, 8\) .* \(2048, 8\)"):
        codec.XCodec2Decoder.from_pretrained(GOLDEN)  # the real model's shapes against the small file
    config, _, _ = _golden()
    with safe_open(GOLDEN, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "generator.backbone.transformers.1.mlp.fc2.weight"}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="no tensor 'generator.backbone.transformers.1.mlp.fc2.weight'"):
        codec.XCodec2Decoder.from_pretrained(str(tmp_path), config)

    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match="some-org/xcodec2.*--codec xcodec2:PATH"):
        codec.load_codec("xcodec2:some-org/xcodec2")


def test_load_codec_names(tmp_path):
    assert isinstance(codec.load_codec("tone"), codec.ToneCodec)
    with pytest.raises(FileNotFoundError):  # 'xcodec2:' is our decoder, reading the given path
        codec.load_codec(f"xcodec2:{tmp_path}")
    with pytest.raises(ValueError, match="unknown codec 'xcodec3'"):
        codec.load_codec("xcodec3")


def test_tone_codec_deterministic_and_length():
    seqs = [[1, 2, 3], [], list(range(50))]
    a, b = codec.ToneCodec().decode(seqs), codec.ToneCodec().decode(seqs)
    assert [len(x) for x in a] == [3 * 320, 0, 50 * 320]
    assert all(x.dtype == np.float32 for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0][:320], a[0][320:640])  # different codes, different sounds


@pytest.mark.parametrize("bad", [[-1], [codec.CODEBOOK_SIZE], [1.5], torch.tensor([1.0, 2.0]), [True]])
def test_bad_codes_name_the_clip(bad, golden_codec):
    for c in (codec.ToneCodec(), golden_codec):
        with pytest.raises(ValueError, match=r"clip 1: codes must be ints in \[0, 65536\)"):
            c.decode([[1, 2], bad])


# ==================================================================================================
# Trainer: grpo.py (issue 4)
# ==================================================================================================



# ------------------------------------------------------------------------- advantages and loss

def test_group_advantages_by_hand():
    from grpo import group_advantages
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = group_advantages(r, 4)
    g1 = torch.tensor([1.0, 0.0, 0.5, 0.5])
    std = math.sqrt(((g1 - 0.5) ** 2).sum().item() / 3)  # unbiased
    expect = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expect, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: 0, not NaN
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def _loss(logp, old, adv, mask, **kw):
    from grpo import policy_loss
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return policy_loss(t(logp), t(old), kw.pop("ref", None), t(adv), t(mask), **kw)


def test_policy_loss_aggregations_by_hand():
    # ratio 1 everywhere: per-token loss = -A. Row 0 has 2 tokens (A=1), row 1 one token (A=-0.5).
    logp = [[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]]
    mask, adv = [[1, 1, 0], [1, 0, 0]], [1.0, -0.5]
    loss, st = _loss(logp, logp, adv, mask, agg="token-mean", kl_coef=0.0)
    assert loss.item() == pytest.approx((-1 - 1 + 0.5) / 3)
    loss, _ = _loss(logp, logp, adv, mask, agg="seq-mean-token-mean", kl_coef=0.0)
    assert loss.item() == pytest.approx((-1 + 0.5) / 2)
    loss, _ = _loss(logp, logp, adv, mask, agg="seq-mean-token-sum-norm", kl_coef=0.0, norm_len=4)
    assert loss.item() == pytest.approx((-2 / 4 + 0.5 / 4) / 2)
    loss, _ = _loss(logp, logp, adv, mask, agg="token-mean", kl_coef=0.0, denom=10.0)
    assert loss.item() == pytest.approx(-1.5 / 10)
    assert st["clip_frac"] == 0.0 and st["kl"] == 0.0
    with pytest.raises(ValueError):
        _loss(logp, logp, adv, mask, agg="mean")


@pytest.mark.parametrize("log_ratio,adv,expect,clipped", [
    (0.5, 1.0, -1.2, 1.0),  # ratio 1.65 > 1+eps, positive advantage: clipped at 1.2
    (0.5, -1.0, math.exp(0.5), 0.0),  # negative advantage: the unclipped (pessimistic) branch
    (math.log(0.5), 1.0, -0.5, 0.0),  # ratio 0.5, positive advantage: unclipped
    (math.log(0.5), -1.0, 0.8, 1.0),  # ratio 0.5, negative advantage: clipped at 0.8
])
def test_policy_loss_clipping(log_ratio, adv, expect, clipped):
    loss, st = _loss([[log_ratio - 1.0]], [[-1.0]], [adv], [[1]], clip_eps=0.2, kl_coef=0.0)
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert st["clip_frac"] == clipped


def test_policy_loss_kl_k3_and_gradient():
    d = 0.3  # ref - logp
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = logp.detach() + d
    from grpo import policy_loss
    loss, st = policy_loss(logp, logp.detach(), ref, torch.tensor([0.0]), torch.tensor([[1.0, 0.0]]), kl_coef=0.04)
    k3 = math.exp(d) - d - 1
    assert st["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(0.04 * k3, rel=1e-5)
    loss.backward()  # d/dlogp of 0.04 * (e^(ref-logp) - (ref-logp) - 1) = 0.04 * (1 - e^d); masked token: 0
    assert logp.grad[0, 0].item() == pytest.approx(0.04 * (1 - math.exp(d)), rel=1e-5)
    assert logp.grad[0, 1].item() == 0.0


# ------------------------------------------------------------------------- the update on 1 vs 2 ranks

def _fixed_rollouts(seed=0, vocab=None):
    from grpo import Rollouts
    import data
    tok = data.tiny_tokenizer()
    g = torch.Generator().manual_seed(seed)
    sv = data.speech_vocab(tok)
    prompts = [data.prompt_ids(tok, t) for t in ["Hello.", "A longer sentence here.", "Hi", "안녕"] for _ in range(2)]
    B, T = len(prompts), 7
    tokens = torch.randint(sv.first, sv.first + sv.n, (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4])
    rewards = torch.rand(B, generator=g)
    from grpo import group_advantages
    return tok, Rollouts(prompts, tokens, lengths, group_advantages(rewards, 2))


def _one_update(rank, world, init_method, out_file, agg, updates=2):
    """One GRPO update over this rank's share of fixed rollouts; world 1 = all of them."""
    import contextlib
    import torch.distributed as dist
    from config import Config
    from grpo import Rollouts, update_policy
    from parallel import Dist
    from sample import tiny_llama
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    tok, ro = _fixed_rollouts()
    share = slice(rank * len(ro.prompts) // world, (rank + 1) * len(ro.prompts) // world)
    ro = Rollouts(ro.prompts[share], ro.tokens[share], ro.lengths[share], ro.advantages[share])
    policy = tiny_llama(len(tok), seed=1).train()
    ref = tiny_llama(len(tok), seed=2)  # a different reference, so the KL term has a gradient
    cfg = Config(kl_coef=0.1, micro_batch=3, updates_per_rollout=updates, loss_agg=agg, temperature=0.8, lr=1e-3,
                 grad_clip=1.0, max_new_tokens=7)
    # SGD, not AdamW: Adam divides by sqrt(v) + eps, which turns the float-rounding noise of a
    # different summation order (~1e-9) in near-zero gradients into ~1e-5 parameter noise.
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = update_policy(policy, ref, opt, sched, ro, cfg, Dist(rank=rank, world=world), contextlib.nullcontext)
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in policy.named_parameters()}, "stats": stats}, out_file)
    if world > 1:  # small buckets: several collectives, each gradient summed exactly once
        from parallel import sync_gradients
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (700, 5, 1300, 1)]
        for p in params:
            p.grad = torch.full_like(p, float(rank + 1)) * torch.arange(p.numel())
        sync_gradients(params, Dist(rank=rank, world=world), bucket_numel=1000)
        assert all(torch.equal(p.grad, 3.0 * torch.arange(p.numel()).float()) for p in params)
        dist.barrier()  # nobody tears gloo down while a peer is still talking to it
        dist.destroy_process_group()
        # Skip interpreter teardown: a gloo thread of this short-lived child has been seen to abort
        # there ("terminate called without an active exception") after all the work was done.
        sys.stdout.flush()
        os._exit(0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_two_ranks_equals_one(tmp_path, agg):
    import torch.multiprocessing as mp
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _one_update(0, 1, None, one, agg)
    import socket
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_one_update, args=(2, f"tcp://127.0.0.1:{port}", two, agg), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    for k in a["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], atol=1e-6, rtol=0), k
    assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], abs=1e-6)
    assert a["stats"]["kl"] == pytest.approx(b["stats"]["kl"], rel=1e-5)
    from sample import tiny_llama
    init = tiny_llama(len(_fixed_rollouts()[0]), seed=1).state_dict()
    assert any(not torch.equal(init[k], a["params"][k]) for k in init)  # the step did move the weights


def test_grad_checkpointing_gives_the_same_update():
    import contextlib
    from config import Config
    from grpo import update_policy
    from parallel import Dist
    from sample import tiny_llama
    tok, ro = _fixed_rollouts()
    params = []
    for checkpointing in (False, True):
        policy = tiny_llama(len(tok), seed=1).train()
        if checkpointing:
            getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
            assert policy.model.gradient_checkpointing
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        update_policy(policy, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), ro,
                      Config(kl_coef=0.0, micro_batch=4), Dist(), contextlib.nullcontext)
        params.append({k: p.detach().clone() for k, p in policy.named_parameters()})  # SGD: same step = same grads
    for k in params[0]:
        assert torch.allclose(params[0][k], params[1][k], atol=1e-7), k


def test_response_logprobs_match_generate():
    """The trainer's teacher-forced log-probs equal the rollout's: importance ratios start at 1."""
    import data
    from grpo import response_logprobs
    from sample import generate, tiny_llama
    tok = data.tiny_tokenizer()
    sv = data.speech_vocab(tok)
    model = tiny_llama(len(tok), seed=3)
    prompts = [data.prompt_ids(tok, t) for t in ["One.", "Two words here.", "셋"]]
    for allowed in (sv.allowed_ids(), None):  # the speech-only policy, and the whole vocabulary
        roll = generate(model, prompts, max_new_tokens=12, temperature=0.8, stop_ids=(sv.end_id,),
                        allowed_ids=allowed, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logp = response_logprobs(model, prompts, roll.tokens, 0.8, allowed_ids=allowed)
        mask = torch.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]
        assert torch.allclose(logp[mask], roll.logprobs[mask], atol=1e-4)


# ------------------------------------------------------------------------- the trainer end to end

def tone_reward(audio, text):
    """Toy reward with a known optimum: the fraction of 20 ms frames of the tone codec's audio whose
    pitch (by zero crossings) is below 400 Hz, i.e. codes below about 20 of 64.
    All-low speech earns 1; silence earns 0."""
    n = len(audio) // 320
    if n == 0:
        return 0.0
    frames = audio[:n * 320].reshape(n, 320)
    crossings = (np.diff(np.sign(frames), axis=1) != 0).sum(axis=1)  # ~ 2 * f * 0.02 s
    return float(np.mean(crossings / 2 / 0.02 < 400))


def _tiny(tmp_path, *flags):
    from config import parse_config
    return parse_config(["--preset", "tiny", "--out", str(tmp_path / "run"), *flags])


def test_tone_reward_knows_its_optimum():
    from codec import ToneCodec
    low, high = ToneCodec().decode([[0, 5, 15, 3], [40, 50, 63, 30]])
    assert tone_reward(low, "x") == 1.0 and tone_reward(high, "x") == 0.0
    assert tone_reward(np.zeros(0, np.float32), "x") == 0.0


def test_tiny_preset_learns_a_toy_reward(tmp_path):
    """On the tiny preset, GRPO raises the mean reward of a reward whose optimum is known."""
    from grpo import train
    cfg = _tiny(tmp_path, "--reward", f"{__name__}:tone_reward", "--steps", "30", "--val-data", "",
                "--kl-coef", "0", "--lr", "3e-3", "--sample-every", "100", "--save-every", "100")
    hist = train(cfg)
    rewards = [m["reward_mean"] for m in hist]
    assert all(math.isfinite(r) for r in rewards)
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.25, (first, last, rewards)


def test_resume_continues_exactly(tmp_path):
    """Stop after 2 steps, resume from that checkpoint: steps 3-4 equal an uninterrupted run's."""
    from grpo import train
    common = ["--reward", f"{__name__}:tone_reward", "--val-data", "", "--kl-coef", "0.04", "--save-every", "2"]
    full = train(_tiny(tmp_path / "a", *common, "--steps", "4"))
    train(_tiny(tmp_path / "b", *common, "--steps", "2"))
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step_2"
    resumed = train(_tiny(tmp_path / "b", *common, "--steps", "4", "--resume", str(ckpt)))
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("reward_mean", "loss", "kl", "entropy", "response_len", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    lines = [json.loads(x) for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


def test_checkpoint_loads_to_identical_logits(tmp_path):
    import data
    from outputs import save_checkpoint
    from sample import tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = data.tiny_tokenizer(n_speech=64)
    model = tiny_llama(len(tok), seed=5)
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, model, tok, {"step": 1})
    save_checkpoint(path, model, tok, {"step": 2})  # overwriting an existing checkpoint is atomic too
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([data.prompt_ids(AutoTokenizer.from_pretrained(path), "Hello there.")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)["step"] == 2
    with open(os.path.join(path, "tokenizer_config.json")) as f:  # loadable by transformers 4.x too
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_torchrun_two_ranks_tiny_preset(tmp_path):
    """The smoke test a new user runs: 2 ranks + the Whisper worker process, offline on CPU."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "grpo.py"), "--preset", "tiny", "--steps", "2", "--out", str(out),
           "--save-every", "2", "--sample-every", "2", "--val-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("reward_mean", "loss", "kl", "entropy", "cer", "nll", "tokens_per_s", "time_reward"):
            assert math.isfinite(m[key]), (key, m)
    assert "val_reward" in lines[-1]
    samples = out / "samples" / "step_2"
    assert (samples / "0.wav").exists() and len(open(samples / "samples.jsonl").readlines()) == 2
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_2")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------- failures are loud and safe

class _FakeScorer:
    def __init__(self, value):
        self.value = value

    def score(self, audios, texts, languages=None):
        return [Score(reward=self.value) for _ in audios]


def test_validation_in_training_sized_chunks(tmp_path):
    from grpo import Trainer
    from parallel import Dist
    cfg = _tiny(tmp_path, "--prompts-per-step", "1", "--group-size", "2")  # chunks of 2 of the 6 val texts
    calls = []

    class Counting(_FakeScorer):
        def score(self, audios, texts, languages=None):
            calls.append(len(audios))
            return super().score(audios, texts, languages)

    tr = Trainer(cfg, Dist(), torch.device("cpu"), Counting(0.5))
    val = tr.validate()
    assert calls == [2, 2, 2]
    assert 0 < val["val_finished"] <= 1 and val["val_reward"] == pytest.approx(0.5 * val["val_finished"])


def test_config_rejects_values_that_would_fail_later():
    from config import parse_config
    for flags in (["--temperature", "0"], ["--save-every", "0"], ["--micro-batch", "0"], ["--loss-agg", "sum"]):
        with pytest.raises(SystemExit):
            parse_config(["--preset", "tiny", *flags])


def test_nan_reward_stops_with_step(tmp_path):
    from grpo import Trainer
    from parallel import Dist
    cfg = _tiny(tmp_path, "--val-data", "")
    tr = Trainer(cfg, Dist(), torch.device("cpu"), _FakeScorer(float("nan")))
    with pytest.raises(FloatingPointError, match="step 1: non-finite reward"):
        tr.train_step(0)


def test_nan_gradient_skips_the_step():
    """A non-finite gradient raises before the optimizer step: the weights stay as they were."""
    import contextlib
    from config import Config
    from grpo import update_policy
    from parallel import Dist
    from sample import tiny_llama
    tok, ro = _fixed_rollouts()
    policy = tiny_llama(len(tok), seed=1).train()
    with torch.no_grad():
        policy.lm_head.weight[ro.tokens[0, 0]] = float("nan")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        update_policy(policy, None, opt, sched, ro, Config(kl_coef=0.0), Dist(), contextlib.nullcontext)
    after = policy.state_dict()
    assert all(torch.allclose(before[k], after[k], equal_nan=True) for k in before)


def test_bad_dataset_line_is_named(tmp_path):
    from grpo import train
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"txt": "oops"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        train(_tiny(tmp_path, "--data", str(bad)))


def dying_reward(audio, text):
    os._exit(3)


def test_dead_worker_stops_training_with_exit_code(tmp_path):
    import time
    from grpo import train
    from whisper_worker import WorkerDiedError
    t0 = time.time()
    with pytest.raises(WorkerDiedError, match="3"):
        train(_tiny(tmp_path, "--reward", f"{__name__}:dying_reward", "--val-data", ""))
    assert time.time() - t0 < 90


def test_help_explains_every_flag(capsys):
    import dataclasses
    from config import Config, parse_config
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text
    assert text.count("(default:") >= len(dataclasses.fields(Config))
    cfg = parse_config(["--preset", "tiny", "--group-size", "8", "--no-scale-rewards"])
    assert cfg.group_size == 8 and cfg.scale_rewards is False and cfg.codec == "tone"


# ------------------------------------------------------------------------- trust: failures, outputs, metrics

def test_policy_loss_dual_clip_by_hand():
    """verl's dual clip: for A < 0 the per-token loss is capped at -A * clip_ratio_c."""
    from grpo import policy_loss
    mask = torch.ones(1, 1)
    # A = -1, ratio = e^2 = 7.39: PPO alone gives max(7.39, 1.2) = 7.39; dual clip caps it at 3.
    loss, st = policy_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), None, torch.tensor([-1.0]), mask,
                           clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(3.0) and st["dual_clip_frac"] == 1.0 and st["clip_frac"] == 0.0
    # A = -1, ratio = 2: max(2, 1.2) = 2 < 3, no dual clip.
    loss, st = policy_loss(torch.tensor([[math.log(2.0)]]), torch.zeros(1, 1), None, torch.tensor([-1.0]), mask,
                           clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(2.0) and st["dual_clip_frac"] == 0.0
    # A = +2, ratio = e^2: the PPO clip alone: -min(2 * 7.39, 2 * 1.2) = -2.4, no dual clip for A > 0.
    loss, st = policy_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), None, torch.tensor([2.0]), mask,
                           clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(-2.4) and st["clip_frac"] == 1.0 and st["dual_clip_frac"] == 0.0
    # The log-ratio is clamped at 20: a huge one stays finite (and is dual-clipped for A < 0).
    loss, _ = policy_loss(torch.tensor([[80.0]]), torch.zeros(1, 1), None, torch.tensor([-0.5]), mask,
                          clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(1.5)
    # Gradient: zero where dual-clipped (the cap is a constant), -A * ratio where not.
    logp = torch.tensor([[2.0, math.log(2.0)]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), None, torch.tensor([-1.0]), torch.ones(1, 2),
                          clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 2.0 / 2])


class _ScriptedScorer:
    """Scores from a list, in order: a way to make errors, too-long clips and equal groups."""

    def __init__(self, make):
        self.make, self.calls = make, 0

    def score(self, audios, texts, languages=None):
        self.calls += 1
        return [self.make(i) for i in range(len(audios))]


def test_step_metrics_report_errors_too_long_zero_std_and_the_lr_used(tmp_path):
    from grpo import Trainer
    from parallel import Dist
    cfg = _tiny(tmp_path, "--val-data", "", "--warmup-steps", "4", "--lr", "1e-3", "--max-new-tokens", "200")

    def make(i):  # 4 groups of 4: group 0 all errors (zero std), group 1 too long at clip 4, others vary
        if i < 4:
            return Score(reward=0.0, error="audio has 3 NaN or inf samples")
        if i == 4:
            return Score(reward=0.0, error="31.0 s is longer than Whisper's 30 s window", too_long=True)
        return Score(reward=0.1 * (i % 4), transcript="x", cer=0.5, nll=1.0)

    tr = Trainer(cfg, Dist(), torch.device("cpu"), _ScriptedScorer(make))
    m, _ = tr.train_step(0)
    assert m["error_frac"] == pytest.approx(5 / 16) and m["too_long_frac"] == pytest.approx(1 / 16)
    assert m["cer"] == pytest.approx(0.5) and m["nll"] == pytest.approx(1.0)  # errors have no cer, not 0
    finished = torch.tensor(m["finished"])
    assert m["zero_std_frac"] >= 0.25  # group 0 at least (truncation may zero more)
    assert m["lr"] == pytest.approx(1e-3 / 4)  # warm-up: the first step runs at 1/4 of the rate
    m2, _ = tr.train_step(1)
    assert m2["lr"] == pytest.approx(2e-3 / 4)


def test_unknown_language_is_rejected_at_load(tmp_path):
    from grpo import train
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "language": "ko"}\n{"text": "oops", "language": "klingon"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: language 'klingon'"):
        train(_tiny(tmp_path, "--data", str(bad)))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: language 'ko' is not one Whisper 'tiny.en' knows"):
        train(_tiny(tmp_path, "--data", str(bad), "--whisper", "tiny.en"))
    with pytest.raises(ValueError, match=r"--language"):
        train(_tiny(tmp_path, "--language", "xx"))


def test_out_holding_a_run_is_refused_and_resume_auto_continues(tmp_path, capsys):
    from grpo import train
    common = ["--reward", f"{__name__}:tone_reward", "--val-data", "", "--save-every", "1", "--sample-every", "9"]
    train(_tiny(tmp_path, *common, "--steps", "2"))
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a run \(metrics.jsonl with 2 steps; checkpoints/"):
        train(_tiny(tmp_path, *common, "--steps", "3"))
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing was touched
    # An incomplete checkpoint (no trainer state) is never picked.
    (run / "checkpoints" / "step_7").mkdir()
    resumed = train(_tiny(tmp_path, *common, "--steps", "3", "--resume", "auto"))
    assert [m["step"] for m in resumed] == [3]
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [1, 2, 3]
    capsys.readouterr()
    assert train(_tiny(tmp_path, *common, "--steps", "3", "--resume", "auto")) == []
    assert "already complete" in capsys.readouterr().out
    # A fresh --out with --resume auto simply starts.
    assert len(train(_tiny(tmp_path / "new", *common, "--steps", "1", "--resume", "auto"))) == 1


def test_checkpoint_is_durable_trainer_state_last(tmp_path, monkeypatch):
    import data
    import outputs
    from sample import tiny_llama
    tok = data.tiny_tokenizer(n_speech=8)
    model = tiny_llama(len(tok), seed=0)
    events = []
    real_fsync, real_replace = outputs._fsync, os.replace
    monkeypatch.setattr(outputs, "_fsync", lambda p: (events.append(("fsync", os.path.relpath(p, tmp_path))),
                                                      real_fsync(p)))
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: (events.append(("rename", os.path.relpath(a, tmp_path))),
                                                            real_replace(a, b)))
    outputs.save_checkpoint(str(tmp_path / "ckpt"), model, tok, {"step": 1})
    synced = [p for kind, p in events if kind == "fsync"]
    files = [p for p in synced if p.startswith("ckpt.tmp/")]
    assert "ckpt.tmp/model.safetensors" in files and "ckpt.tmp/tokenizer_config.json" in files
    assert files[-1] == "ckpt.tmp/trainer_state.pt"  # written and synced after every other file
    rename = events.index(("rename", "ckpt.tmp"))
    assert events[rename - 1] == ("fsync", "ckpt.tmp")  # the directory itself, before the rename
    assert events[rename + 1] == ("fsync", ".")  # and the parent, so the rename is durable
    assert outputs.checkpoints(str(tmp_path / "x")) == []


def _failing_rank(rank: int, port: int, out: str, where: str):
    """One rank of a 2-rank tiny run (no torchrun agent: the ranks must stop by themselves)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import grpo
    import whisper_worker
    if rank == 1 and where == "reward":
        real, calls = whisper_worker.WorkerClient.score, []

        def score(self, *args):
            calls.append(1)
            if len(calls) == 2:
                raise TimeoutError("injected: the Whisper worker did not answer (rank 1, step 2)")
            return real(self, *args)
        whisper_worker.WorkerClient.score = score
    if rank == 1 and where == "validation":
        real_rollout = grpo.Trainer.rollout

        def rollout(self, texts, generator):
            if generator is not self.gen:
                raise RuntimeError("injected: validation broke on rank 1")
            return real_rollout(self, texts, generator)
        grpo.Trainer.rollout = rollout
    grpo.main(["--preset", "tiny", "--steps", "4", "--out", out, "--save-every", "1", "--val-every", "2",
               "--sample-every", "9"])


@pytest.mark.parametrize("where", ["reward", "validation"])
def test_one_failing_rank_stops_the_job(tmp_path, where):
    """Rank 1 fails at step 2; both ranks exit non-zero within 60 s (no torchrun agent to kill
    them), rank 1 prints its message, and the step-1 checkpoint on disk is whole."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "run")
    code = f"import sys; sys.path.insert(0, {REPO!r}); " \
           f"import test_grpo as t; t._failing_rank(int(sys.argv[1]), {port}, {out!r}, {where!r})"
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [p.communicate(timeout=120) for p in procs]
    elapsed = time.time() - t0
    codes = [p.returncode for p in procs]
    assert all(c != 0 for c in codes), (codes, results[0][1][-2000:], results[1][1][-2000:])
    assert elapsed < 60, elapsed
    assert "injected" in results[1][1] and "[rank 1]" in results[1][1]
    assert "rank 1 failed during" in results[0][1], results[0][1][-2000:]
    ckpt = os.path.join(out, "checkpoints", "step_1")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)["step"] == 1
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_2"))


def test_a_step_where_no_clip_could_be_scored_stops(tmp_path):
    from grpo import Trainer
    from parallel import Dist
    cfg = _tiny(tmp_path, "--val-data", "")
    tr = Trainer(cfg, Dist(), torch.device("cpu"),
                 _ScriptedScorer(lambda i: Score(reward=0.0, error="scoring failed: RuntimeError: CUDA error")))
    with pytest.raises(RuntimeError, match="step 1: not one of 16 clips could be scored: scoring failed"):
        tr.train_step(0)


# ------------------------------------------------------------------------- FSDP2 and the speech-only head

def _fsdp_update(rank, world, init_method, out_file, ckpt):
    """_one_update's rollouts and settings, with the policy and reference sharded by FSDP2."""
    import contextlib
    import torch.distributed as dist
    from config import Config
    from grpo import LogProbs, Rollouts, update_policy
    from outputs import save_checkpoint
    from parallel import Dist, full_model_state, shard
    from sample import tiny_llama
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    tok, ro = _fixed_rollouts()
    share = slice(rank * len(ro.prompts) // world, (rank + 1) * len(ro.prompts) // world)
    ro = Rollouts(ro.prompts[share], ro.tokens[share], ro.lengths[share], ro.advantages[share])
    policy = shard(LogProbs(tiny_llama(len(tok), seed=1)).train(), torch.device("cpu"))
    ref = shard(LogProbs(tiny_llama(len(tok), seed=2)), torch.device("cpu"))
    cfg = Config(kl_coef=0.1, micro_batch=3, updates_per_rollout=2, loss_agg="token-mean", temperature=0.8,
                 lr=1e-3, grad_clip=1.0, max_new_tokens=7, fsdp=True)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    d = Dist(rank=rank, world=world)
    stats = update_policy(policy, ref, opt, sched, ro, cfg, d, contextlib.nullcontext)
    weights = full_model_state(policy, d)
    if rank == 0:
        torch.save({"params": weights, "stats": stats}, out_file)
        save_checkpoint(ckpt, policy.lm, tok, {"step": 1}, weights=weights)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp_update_equals_replicated_and_checkpoints_whole_weights(tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM
    one, two, ckpt = str(tmp_path / "one.pt"), str(tmp_path / "fsdp.pt"), str(tmp_path / "ckpt")
    _one_update(0, 1, None, one, "token-mean")
    mp.spawn(_fsdp_update, args=(2, f"tcp://127.0.0.1:{_port()}", two, ckpt), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert set(a["params"]) == set(b["params"])
    for k in a["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], atol=1e-5, rtol=0), k
    assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], abs=1e-6)
    assert a["stats"]["grad_norm"] == pytest.approx(b["stats"]["grad_norm"], rel=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()  # whole weights, a plain HF model
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, b["params"][k]), k
    from sample import tiny_llama
    ref = tiny_llama(len(_fixed_rollouts()[0]), seed=1)
    ref.load_state_dict(b["params"])
    ids = torch.tensor([_fixed_rollouts()[1].prompts[0]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def _torchrun(out, *flags, steps):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "grpo.py"), "--preset", "tiny", "--fsdp", "--steps", str(steps), "--out", str(out),
           "--reward", "test_grpo:tone_reward", "--val-data", "", "--save-every", "2", "--sample-every", "9", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in open(out / "metrics.jsonl")]


def test_fsdp_tiny_preset_runs_and_resumes_exactly(tmp_path):
    """torchrun --nproc_per_node=2 grpo.py --preset tiny --fsdp; a run stopped at step 2 and resumed
    (--resume auto) gives steps 3-4 equal to an uninterrupted run's."""
    full = _torchrun(tmp_path / "a", steps=4)
    assert [m["step"] for m in full] == [1, 2, 3, 4]
    for m in full:
        for key in ("reward_mean", "loss", "entropy", "grad_norm", "kl"):
            assert math.isfinite(m[key]), (key, m)
    _torchrun(tmp_path / "b", steps=2)
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "step_2" / "optimizer")
    resumed = _torchrun(tmp_path / "b", "--resume", "auto", steps=4)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        for key in ("reward_mean", "loss", "kl", "entropy", "response_len", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "checkpoints" / "step_4")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_disallowed_lm_head_rows_never_change(tmp_path):
    """The policy is speech-only: after a training step, lm_head rows of text tokens are untouched
    (AdamW with no gradient moves nothing), and some speech rows did move."""
    from grpo import Trainer
    from parallel import Dist
    from reward import Score

    class Varied(_FakeScorer):
        def score(self, audios, texts, languages=None):
            return [Score(reward=float(len(a) % 7) / 7) for a in audios]

    cfg = _tiny(tmp_path, "--val-data", "", "--kl-coef", "0")
    tr = Trainer(cfg, Dist(), torch.device("cpu"), Varied(0.0))
    before = tr.policy.lm.lm_head.weight.detach().clone()
    tr.train_step(0)
    after = tr.policy.lm.lm_head.weight.detach()
    allowed = torch.zeros(len(before), dtype=torch.bool)
    allowed[tr.allowed_ids] = True
    assert torch.equal(before[~allowed], after[~allowed])
    assert not torch.equal(before[allowed], after[allowed])
