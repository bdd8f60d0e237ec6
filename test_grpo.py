"""The llasa-grpo test suite: CPU, offline, seeded. Run with `python -m pytest -q test_grpo.py`.

Tiny random models stand in for the real ones (a tiny Llama with a LLASA-style tokenizer, a tiny
random Whisper, the tone codec, a small random XCodec2 decoder with a golden file). Tests that need
real speech recognition read Whisper tiny.en and spoken clips from $TEST_ASSETS (default
../shared/assets) and skip with a reason where it is absent.

One section per project file, in this order: reward.py, whisper_worker.py, data.py, sample.py,
codec.py, config.py, grpo.py (advantages and loss; log-probs and the update on 1 vs 2 ranks; the
trainer end to end), parallel.py (rank agreement, FSDP2), outputs.py (checkpoints, the --out and
--resume rules, metrics), then the failure tests. Each test sits in the section of what it mainly
exercises; helpers and fixtures sit at the top of their section or next to the tests that use them.
Some must stay at module level under their names: child processes import `_failing_rank`,
`_one_update` and `_fsdp_update` from test_grpo, and runs name `test_grpo:tone_reward` and
`test_grpo:dying_reward` as their --reward.
"""
import ast
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter

import huggingface_hub
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
import torch._inductor.config
import torch.multiprocessing as mp
import torch.nn.functional as F
import whisper
from safetensors import safe_open
from safetensors.torch import save_file
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)
from whisper.tokenizer import get_tokenizer

import codec
import config
import data
import decode
import demo
import grpo
import memory
import models
import outputs
import parallel
import plot
import llama
import prosody
import sample
import scorer as scoring
import whisper_worker as ww
from reward import RewardConfig, Score, char_error_rate, normalize_text, tts_reward

REPO = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two CPU cores shared by this process and a worker process (started with threads=1): one thread
    # each, or OpenMP's spinning threads oversubscribe the cores and every op gets several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Inductor (the compiled decode step's tests) builds its C++ kernels in this process, scalar:
    # vectorized C++ takes longer to build, and GPU kernels are Triton's anyway.
    with torch._inductor.config.patch({"compile_threads": 1, "cpp.vec_isa_ok": False}):
        yield
    torch.set_num_threads(threads)


# ==================================================================================================
# reward.py: the reward formula and the character error rate
# ==================================================================================================

def test_tts_reward_known_values():
    assert tts_reward(0.0, 0.0) == 1.0
    # U_cer = 1 - tanh(0.3) = 0.7086873, U_nll = exp(-1/3) = 0.7165313; 1 / (0.6 / U_cer + 0.4 / U_nll)
    assert tts_reward(0.1, 1.0) == pytest.approx(0.7118043, abs=1e-6)
    # U_cer = 1 - tanh(0.5) = 0.5378828, U_nll = exp(-3/2) = 0.2231302; (1 + 3) / (1 / U_cer + 3 / U_nll)
    assert tts_reward(0.25, 3.0, beta_c=2.0, tau_n=2.0, lambda_c=1.0, lambda_n=3.0) == \
        pytest.approx(0.2613660, abs=1e-6)
    assert tts_reward(0.2, 5.0, lambda_n=0.0) == pytest.approx(1 - math.tanh(0.6))  # weight 0: NLL ignored
    assert tts_reward(1e6, 0.5) == 0.0  # U_cer underflows to 0: reward 0, no division by zero
    assert tts_reward(0.0, math.inf) == 0.0
    assert tts_reward(0.0, 0.0, **vars(RewardConfig(beta_c=1.0))) == 1.0


def test_tts_reward_decreases_with_cer_and_nll():
    grid = [0.0, 0.05, 0.2, 0.5, 1.0, 2.0]
    for x in grid:
        by_cer = [tts_reward(c, x) for c in grid]
        by_nll = [tts_reward(x, n) for n in grid]
        assert all(a > b for a, b in zip(by_cer, by_cer[1:])) and \
            all(a > b for a, b in zip(by_nll, by_nll[1:]))
        assert all(0.0 <= r <= 1.0 for r in by_cer + by_nll)


def test_tts_reward_rejects_bad_values():
    for cer, nll, bad in [(math.nan, 1.0, "nan"), (-0.1, 1.0, "-0.1"), (0.1, -2.0, "-2.0"),
                          (0.1, math.nan, "nan")]:
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
    # a deletion and a substitution
    assert char_error_rate("hello world", "helo wor1d") == pytest.approx(2 / 10)
    assert char_error_rate("Hello", "hello", normalize=False) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="no characters"):
        char_error_rate("?!", "anything")


def test_cer_normalizer_keeps_marks_across_scripts():
    # Whisper's annotations
    assert normalize_text("Hello, World! [music] (laughs) <i>Ok</i>.") == "helloworldok"
    assert normalize_text("안녕 하세요!") == "안녕하세요" and normalize_text("你好，世界。") == "你好世界"
    assert normalize_text("ＡＢＣ１２３") == "abc123"  # NFKC: full-width letters and digits
    # Combining marks (category M) are letters: Whisper's BasicTextNormalizer turned them into spaces.
    assert normalize_text("नमस्ते दुनिया") == "नमस्तेदुनिया" and normalize_text("สวัสดี ครับ") == "สวัสดีครับ"
    assert char_error_rate("नमस्ते दुनिया", "नमस्त दुनिया") == pytest.approx(1 / 12)  # one matra (े) missing
    assert char_error_rate("नमस्ते दुनिया", "नमसते दुनिया") == pytest.approx(1 / 12)  # the virama (्) missing
    assert char_error_rate("สวัสดีครับ", "สวสดครบ") == pytest.approx(3 / 10)  # three Thai vowel signs missing
    assert char_error_rate("你好，世界。", "你好世界") == 0.0 and char_error_rate("你好世界", "你好世") == 0.25
    assert char_error_rate("안녕하세요", "안녕하세오") == 0.2


# ==================================================================================================
# whisper_worker.py: the Whisper scorer, the worker process, the CLI
# ==================================================================================================

ASSETS = os.environ.get("TEST_ASSETS", os.path.join(REPO, "..", "shared", "assets"))


def noise(seconds, seed, scale=0.1):
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


REWARD_MODULE = '''
import time
import zlib
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
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))  # the spawned worker inherits sys.path
        yield "user_reward_mod:peak"


# ---- WhisperScorer -------------------------------------------------------------------------------

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
    texts = ["Hi.", "The quick brown fox jumps over the lazy dog.", "안녕하세요, 반갑습니다.", "One two three.", "네"]
    languages = ["en", "en", "ko", None, "ko"]  # None: the scorer's default, en
    scorer = scoring.WhisperScorer(tiny_model, "cpu", "en", batch_size=3, max_transcript_tokens=6)
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
    one_by_one = scoring.WhisperScorer(tiny_model, "cpu", "en", batch_size=1, max_transcript_tokens=6).score(
        audios, texts, languages)
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
    texts = (["a good clip"] + [c[1] for c in cases]
             + ["another good clip", "a long clip", "another good clip"])
    languages = [None] + [c[2] for c in cases] + [None, None, None]
    scorer = scoring.WhisperScorer(tiny_model, "cpu", "en", batch_size=4, max_transcript_tokens=6)
    results = scorer.score(audios, texts, languages)
    for (_, _, _, words), result in zip(cases, results[1:-3]):
        assert result.reward == 0.0 and result.cer is None and result.nll is None
        assert words in result.error, (words, result.error)
    # refused, not cut to 30 s
    assert [r.too_long for r in results[1:-3]] == [False] * (len(cases) - 1) + [True]
    alone = scorer.score([good[0], good[1], exactly_30_s],
                         ["a good clip", "another good clip", "a long clip"])
    for result, reference in zip([results[0], results[-3], results[-2]], alone):
        assert result.error is None and not result.too_long and \
            result.nll == pytest.approx(reference.nll, abs=1e-4)
    assert results[-1].nll == pytest.approx(results[-3].nll, abs=1e-4)  # float64 is converted
    # an English-only vocabulary
    dims = whisper.model.ModelDimensions(**{**vars(tiny_model.dims), "n_vocab": 51864})
    english_only = scoring.WhisperScorer(whisper.model.Whisper(dims), "cpu", max_transcript_tokens=2)
    assert "English-only" in english_only.score([good[0]], ["hello"], ["ko"])[0].error
    with pytest.raises(ValueError, match="match one to one"):
        scorer.score(good, ["only one text"])


def test_silence_is_scored_not_refused(tiny_model, reward_module):
    """Empty or all-zero audio is the policy's answer: transcript "", CER 1, NLL of the zero window."""
    silences = [np.zeros(0, np.float32), np.zeros(16000, np.float32), np.zeros(48000, np.float32)]
    texts = ["hello", "hello there", "안녕하세요"]
    for language in ("en", None):  # None: no decode to read the language from, so it is detected
        scorer = scoring.WhisperScorer(tiny_model, "cpu", language, batch_size=4, max_transcript_tokens=6)
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
    custom = scoring.CustomRewardScorer(reward_module)  # a user's reward hears silence too: empty stays empty
    no_speech = dict(f0_std_semitones=0.0, voiced_frac=0.0, chars_per_s=0.0)  # prosody of silence
    assert custom.score(silences[:2], ["empty?", "silent"]) == [Score(reward=0.75, **no_speech),
                                                                 Score(reward=0.0, **no_speech)]
    long = np.full(40 * 16000, 0.5, np.float32)
    assert custom.score([long], ["x"]) == [Score(reward=0.5, **prosody.measure(long, "x"))]  # no 30 s limit


KOREAN_150 = ("오늘은 날씨가 정말 좋아서 가족과 함께 한강 공원에 가서 자전거를 타고 산책을 했습니다. 점심에는 근처 식당에서 "
              "맛있는 비빔밥과 된장찌개를 먹었고, 오후에는 도서관에 들러 읽고 싶었던 소설책을 몇 권 빌렸습니다. 저녁에는 "
              "친구들과 영화를 보며 즐거운 시간을 보냈습니다.")
CHINESE = ("今天天气非常好，我们一家人一起去公园散步，然后在附近的餐厅吃了午饭。"
           "下午我们去图书馆看书，晚上和朋友们一起看电影。")


def test_whisper_transcript_bound_follows_the_target(tiny_model, monkeypatch):
    """A long Korean or Chinese transcript is not cut by a fixed cap: the bound derives from the target."""
    assert scoring.transcript_bound(10, limit=444) == 30 and scoring.transcript_bound(10, limit=444, cap=16) == 16
    assert scoring.transcript_bound(300, limit=444) == 444 and scoring.transcript_bound(0, limit=444, cap=None) == 10
    tokenizer = get_tokenizer(True, num_languages=tiny_model.num_languages)
    n_target = {text: len(tokenizer.encode(" " + text)) for text in (KOREAN_150, CHINESE, "Hi.")}
    assert len(KOREAN_150) >= 150 and len(CHINESE) >= 50
    seen, decode = [], whisper.decode

    def spy(model, features, options):
        results = decode(model, features, options)
        seen.append((options.sample_len, [len(r.tokens) for r in results]))
        return results

    monkeypatch.setattr(scoring.whisper, "decode", spy)
    scorer = scoring.WhisperScorer(tiny_model, "cpu", batch_size=4)  # no cap; languages detected per clip
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
        return [whisper.DecodingResult(features, language="en",
                                       tokens=[tokenizer.encode(" la")[0]] * options.sample_len)
                for _ in features]

    seen.clear()
    monkeypatch.setattr(scoring.whisper, "decode", chatty)
    mixed = scoring.WhisperScorer(tiny_model, "cpu", "en", batch_size=4).score(audios, texts)  # one batch
    # the batch decodes to its longest bound
    assert [length for length, _ in seen] == [2 * n_target[KOREAN_150] + 10]
    # Each transcript is cut at its own target's bound, as if decoded alone.
    assert [len(tokenizer.encode(" " + r.transcript)) for r in mixed] == [2 * n_target[t] + 10 for t in texts]
    seen.clear()
    scoring.WhisperScorer(tiny_model, "cpu", "ko", max_transcript_tokens=16).score(audios[1:2], texts[1:2])
    assert [length for length, _ in seen] == [16]


def test_whisper_failed_batch_is_retried_clip_by_clip(tiny_model, monkeypatch):
    """One clip whose NLL overflows (or whose scoring raises) costs only its own score."""
    tokenizer = get_tokenizer(True, num_languages=tiny_model.num_languages)
    poison = tokenizer.encode(" poisoned clip") + [tokenizer.eot]
    audios = [noise(1.0 + i / 2, 20 + i) for i in range(5)]
    texts = ["first clip", "second clip", "poisoned clip", "fourth clip", "fifth clip"]
    scorer = scoring.WhisperScorer(tiny_model, "cpu", "en", batch_size=4, max_transcript_tokens=6)
    expected = [scorer.score([a], [t])[0] for a, t in zip(audios, texts)]  # each clip alone, unpatched
    nll = scoring.teacher_forced_nll
    for how, error in [("nan", "scoring failed: FloatingPointError: "
                               "non-finite NLL (nan) of the text 'poisoned clip'"),
                       ("raise", "scoring failed: RuntimeError: decoder exploded")]:
        def failing(model, features, sequences, n_prefix):
            poisoned = [seq[-len(poison):] == poison for seq in sequences]
            if how == "raise" and any(poisoned):
                raise RuntimeError("decoder exploded")
            return [math.nan if p else v for p, v in zip(poisoned, nll(model, features, sequences, n_prefix))]

        monkeypatch.setattr(scoring, "teacher_forced_nll", failing)
        results = scorer.score(audios, texts)
        assert results[2] == Score(reward=0.0, error=error)
        for result, reference in zip(results[:2] + results[3:], expected[:2] + expected[3:]):
            assert result.error is None and result.transcript == reference.transcript
            assert result.nll == pytest.approx(reference.nll, abs=1e-4)
            assert result.reward == pytest.approx(reference.reward, abs=1e-6)


def test_whisper_model_languages_and_language_code(tiny_model):
    languages = list(whisper.tokenizer.LANGUAGES)
    assert scoring.model_languages("tiny.en") == scoring.model_languages("medium.en") == frozenset({"en"})
    for name in ("large-v3", "large-v3-turbo", "turbo"):
        assert scoring.model_languages(name) == frozenset(languages[:100]) and "yue" in scoring.model_languages(name)
    for name in ("random-tiny", "tiny", "large-v2"):
        assert scoring.model_languages(name) == frozenset(languages[:99]) and "yue" not in scoring.model_languages(name)
    assert scoring.model_languages(tiny_model) == frozenset(languages[:99])
    # large-v3's vocabulary
    dims = whisper.model.ModelDimensions(**{**vars(tiny_model.dims), "n_vocab": 51866})
    assert "yue" in scoring.model_languages(whisper.model.Whisper(dims))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        scoring.model_languages("no-such-model")
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if os.path.isfile(checkpoint):  # read from its dims, without loading the weights
        assert scoring.model_languages(checkpoint) == frozenset({"en"})
    assert [scoring.language_code(x) for x in ("korean", "Korean", " ko ", "KO", "Mandarin", "yue")] == \
        ["ko", "ko", "ko", "ko", "zh", "yue"]
    for bad in ("klingon", "", None):
        with pytest.raises(ValueError, match=f"unknown language {bad!r}"):
            scoring.language_code(bad)
    scorer = scoring.WhisperScorer(tiny_model, "cpu", "Korean", max_transcript_tokens=2)
    assert scorer.language == "ko" and scorer.languages == frozenset(languages[:99])
    assert "not one of this Whisper model's 99 languages" in \
        scorer.score([noise(1.0, 0)], ["x"], ["yue"])[0].error
    if not os.path.isfile(checkpoint):
        pytest.skip(f"{checkpoint} not found (set TEST_ASSETS): the checkpoint-file case was not run")


# ---- WhisperWorker and WorkerClient --------------------------------------------------------------

TINY = {"model": "random-tiny", "device": "cpu", "language": "en", "batch_size": 3,
        "max_transcript_tokens": 6}


@pytest.fixture(scope="module")
def tiny_worker():
    with ww.WhisperWorker(TINY, start_timeout=120, threads=1, request_timeout=120) as worker:
        yield worker


def test_worker_serves_concurrent_clients(tiny_worker):
    requests = [([noise(1.0 + i, 10 * k + i) for i in range(3)], [f"clip {k} {i}" for i in range(3)])
                for k in range(2)]
    scorer = scoring.WhisperScorer(**TINY)
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
    result = tiny_worker.score(audios[:1] + [np.zeros(0, np.float32), noise(31.0, 0)],
                               texts[:1] + ["silence", "long"])
    assert result[0].error is None and result[0].nll > 0
    # silence is scored
    assert result[1].error is None and result[1].cer == 1.0 and result[1].transcript == ""
    assert result[2].too_long and result[2].reward == 0.0 and "31.00 s is longer" in result[2].error


def test_custom_reward_worker(reward_module):
    with ww.WhisperWorker({}, reward=reward_module, start_timeout=120, threads=1,
                          request_timeout=120) as worker:
        sine = (0.3 * np.sin(np.arange(16000) / 5.0)).astype(np.float64)  # converted to float32 on the way
        results = worker.score([sine, np.full(100, 0.5, np.float32), noise(1.0, 1),
                                np.full(10, 1.5, np.float32), np.zeros(10, np.float32),
                                np.zeros(0, np.float32), np.full(31 * 16000, 0.5, np.float32)],
                               ["sine", "half", "nan", "too loud", "silent", "empty?", "long"])
        assert results[0].reward == pytest.approx(float(np.abs(sine.astype(np.float32)).max()))
        assert results[1] == Score(reward=0.5, transcript="", cer=None, nll=None, error=None, too_long=False,
                                   **prosody.measure(np.full(100, 0.5, np.float32), "half"))
        assert results[2].reward == 0.0 and "returned nan" in results[2].error
        assert results[3].reward == 0.0 and "returned 1.5, not a number in [0, 1]" in results[3].error
        # silence heard; no 30 s limit
        assert results[4:] == [Score(reward=0.0, **prosody.measure(np.zeros(10), "silent")),
                               Score(reward=0.75, **prosody.measure(np.zeros(0), "empty?")),
                               Score(reward=0.5, **prosody.measure(np.full(31 * 16000, 0.5), "long"))]
        with pytest.raises(ww.WorkerError,
                           match="(?s)user_reward_mod.py.*ValueError: boom from the user's reward"):
            worker.score([noise(1.0, 0)], ["boom"])
        assert worker.score([np.full(10, 0.25, np.float32)], ["fine again"])[0].reward == 0.25


def test_worker_start_errors(reward_module):
    with pytest.raises(ww.WorkerError, match="No module named 'no_such_reward_module'"):
        ww.WhisperWorker({}, reward="no_such_reward_module:f", start_timeout=120, threads=1).start()
    with pytest.raises(AttributeError, match="has no function 'missing'"):
        scoring.CustomRewardScorer(reward_module.replace("peak", "missing"))


def test_killed_worker_is_detected(reward_module):
    worker = ww.WhisperWorker({}, reward=reward_module, start_timeout=120, threads=1,
                              request_timeout=300).start()
    outcomes = {}

    def call(name, score):
        start = time.monotonic()
        try:
            score([noise(1.0, 0)], ["sleep"])
        except Exception as e:  # noqa: BLE001 -- asserted below
            outcomes[name] = (e, time.monotonic() - start)

    other = ww.WorkerClient(worker.connect_info(), request_timeout=300)
    threads = [threading.Thread(target=call, args=(name, f))
               for name, f in (("owner", worker.score), ("other", other.score))]
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
    with ww.WhisperWorker({}, reward=reward_module, start_timeout=120, threads=1,
                          request_timeout=120) as worker:
        start = time.monotonic()
        with pytest.raises(ww.WorkerDiedError, match="(?s)exit code 3.*SystemExit: 3"):
            worker.score([noise(1.0, 0)], ["exit"])
        assert time.monotonic() - start < 60


# ---- the CLI, the file's layout, real Whisper ----------------------------------------------------

def test_cli_scores_a_jsonl(tmp_path, capsys):
    mono = noise(1.0, 5)
    sf.write(tmp_path / "mono.wav", mono, 16000)
    sf.write(tmp_path / "stereo.wav", np.stack([mono, 0.5 * mono], axis=1), 16000)
    sf.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), 16000)
    (tmp_path / "clips.jsonl").write_text('{"wav": "mono.wav", "text": "hello"}\n'
                                          '{"wav": "stereo.wav", "text": "hello"}\n'
                                          '\n{"wav": "silent.wav", "text": "hello", "language": "english"}\n')
    ww.main(["--model", "random-tiny", "--language", "en", "--jsonl", str(tmp_path / "clips.jsonl"),
             "--tau-n", "50"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [os.path.basename(r["wav"]) for r in rows] == ["mono.wav", "stereo.wav", "silent.wav"]
    assert all(list(r) == ["wav", "text", "reward", "transcript", "cer", "nll", "error", "too_long",
                           "f0_std_semitones", "voiced_frac", "chars_per_s"] for r in rows)
    assert all(r["error"] is None and r["text"] == "hello" and r["nll"] > 0 and not r["too_long"]
               for r in rows)
    assert rows[0]["reward"] == pytest.approx(tts_reward(rows[0]["cer"], rows[0]["nll"], tau_n=50))
    assert rows[2]["cer"] == 1.0 and rows[2]["transcript"] == ""
    stereo_as_mono = scoring.WhisperScorer("random-tiny", "cpu", "en").score([0.75 * mono], ["hello"])[0]
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


@pytest.mark.parametrize("module, public", [
    (scoring, ["WhisperScorer", "model_languages", "language_code", "teacher_forced_nll", "load_whisper",
               "random_tiny_whisper", "check_audio", "check_text", "CustomRewardScorer"]),
    (ww, ["WhisperWorker", "WorkerClient", "WorkerError", "WorkerDiedError", "read_wav", "main"])])
def test_scorer_and_worker_layout(module, public):
    """Public names first, in reading order; each private helper after the first public one it serves."""
    source = open(module.__file__, encoding="utf-8").read()
    defs = [node for node in ast.parse(source).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    names = [node.name for node in defs]
    assert [n for n in names if n in public] == public
    for i, node in enumerate(defs):
        if node.name.startswith("_"):
            users = [j for j, user in enumerate(defs) if j != i and any(
                isinstance(n, ast.Name) and n.id == node.name for n in ast.walk(user))]
            assert users and min(users) < i, f"{node.name} is defined before the code that uses it"
    assert max(map(len, source.splitlines())) < 110


def test_whisper_name_without_network_says_to_pass_a_path(monkeypatch, tmp_path):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(whisper, "load_model", offline)
    with pytest.raises(FileNotFoundError, match=r"'tiny.en' is not in .*could not be downloaded.*--whisper PATH"):
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
        with pytest.raises(ValueError, match="multiple of 0.02 s"):
            scoring.windowed(model, bad)
    with pytest.raises(SystemExit):
        config.parse_config(["--whisper-window", "0.015"])
    scorer = scoring.WhisperScorer(model, window_s=2.0, max_transcript_tokens=4)
    ok, long = scorer.score([noise(1.5, 1), noise(2.5, 2)], ["short", "long"])
    assert ok.error is None and math.isfinite(ok.nll)
    assert long.too_long and long.reward == 0.0 and "2.50 s is longer than Whisper's 2 s window" in long.error


def test_real_whisper_ranks_clean_above_noisy_above_silence():
    checkpoint, clips_file = (os.path.join(ASSETS, "whisper-tiny.en.pt"),
                              os.path.join(ASSETS, "speech", "clips.jsonl"))
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
    results = scoring.WhisperScorer(checkpoint, "cpu", "en").score(
        audios + dithered + [long_clip],
        [r["text"] for r in rows] + [rows[i]["text"] for i in silences]
        + [" ".join(rows[i]["text"] for i in clean)])
    by_kind = {}
    for row, result in zip(rows + [{"kind": "dithered silence"}] * len(silences) + [{"kind": "long"}],
                           results):
        by_kind.setdefault(row["kind"], []).append(result)
    mean = {kind: float(np.mean([r.reward for r in rs])) for kind, rs in by_kind.items()}
    print("\nmean reward", {kind: round(m, 4) for kind, m in mean.items()},
          "\nclean CER", [round(r.cer, 3) for r in by_kind["clean"]],
          "NLL", [round(r.nll, 3) for r in by_kind["clean"]],
          "\nnoisy CER", [round(r.cer, 3) for r in by_kind["noisy"]],
          "NLL", [round(r.nll, 3) for r in by_kind["noisy"]],
          "\nsilence NLL", [round(r.nll, 2) for r in by_kind["silence"]],
          "\ndithered silence", [(r.transcript, round(r.nll, 2)) for r in by_kind["dithered silence"]])
    assert mean["clean"] > mean["noisy"] > mean["silence"]
    for r in by_kind["silence"]:  # scored, not refused: the policy's answer, CER 1
        assert r.error is None and r.transcript == "" and r.cer == 1.0 and math.isfinite(r.nll) and \
            r.reward < 0.05
    assert all(c.reward > 10 * s.reward for c, s in zip(by_kind["clean"], by_kind["dithered silence"]))
    assert mean["noisy"] > mean["dithered silence"]
    assert np.mean([r.cer for r in by_kind["clean"]]) < 0.15
    [long] = by_kind["long"]  # clean speech, but past Whisper's window: refused, not judged on its first 30 s
    assert long.reward == 0.0 and long.too_long and long.cer is None
    assert f"{len(long_clip) / 16000:.2f} s is longer than Whisper's 30 s window" in long.error
    # A 10 s window (faster on a CPU) hears the clean clips (3-5 s) as well, and silence as silence.
    short = scoring.WhisperScorer(checkpoint, "cpu", "en", window_s=10.0).score(
        [audios[i] for i in clean + silences], [rows[i]["text"] for i in clean + silences])
    print("10 s window: clean CER", [round(r.cer, 3) for r in short[:len(clean)]])
    assert np.mean([r.cer for r in short[:len(clean)]]) < np.mean([r.cer for r in by_kind["clean"]]) + 0.05
    assert all(r.cer == 1.0 and r.reward < 0.05 for r in short[len(clean):])


# ==================================================================================================
# data.py: datasets, the LLASA prompt, the speech vocabulary
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
                                    ('{"text": "  "}', "empty"),
                                    ('{"text": "x", "language": 1}', "language")]):
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


# ==================================================================================================
# sample.py: batched generation, log-probs, the speech-only head
# ==================================================================================================

# ---- generation against transformers' generate ---------------------------------------------------

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
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                         do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)],
                         ids=["untied", "tied-llama3rope"])
def test_greedy_equals_hf_generate(overrides):
    model = models.tiny_llama(VOCAB, seed=1, **overrides)
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
    model = models.tiny_llama(VOCAB, seed=1)
    n = 30
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, repetition_penalty=1.5)
    for i, p in enumerate(PROMPTS):
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             repetition_penalty=1.5, pad_token_id=0)[0, len(p):]
        assert ours.tokens[i].tolist() == ref.tolist()
    plain = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0)
    assert not torch.equal(ours.tokens, plain.tokens)  # the penalty changed something


def test_greedy_bf16_runs_and_logprobs_are_finite():
    model = models.tiny_llama(VOCAB, seed=1).to(torch.bfloat16)
    out = sample.generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    assert out.tokens.shape == (len(PROMPTS), 12) and out.logprobs.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all() and (out.logprobs < 0).all()
    assert torch.equal(out.tokens, hf_greedy(model, PROMPTS, 12))


def test_logprobs_equal_teacher_forced_forward():
    """Rollout log-probs are log_softmax(logits / T) of the unfiltered policy, as the trainer recomputes
    them, even with top-k and the repetition penalty shaping what is sampled."""
    model = models.tiny_llama(VOCAB, seed=2)
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
    model = models.tiny_llama(VOCAB, seed=3)

    def run(seed):
        return sample.generate(model, PROMPTS, max_new_tokens=20, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_sample_token_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.log().expand(40000, -1)  # 40000 independent draws in one batch
    draws = llama.sample_token(logits, greedy=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[4] == 0


def test_logits_processing_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, generator=g) * 3
    ids = torch.randint(0, 64, (6, 20), generator=g)
    seen = torch.zeros(6, 64, dtype=torch.bool).scatter_(1, ids, True)
    close = dict(atol=1e-6, rtol=1e-6)

    torch.testing.assert_close(llama.apply_repetition_penalty(logits, seen, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()), **close)
    for k in (1, 5, 64, 100):
        torch.testing.assert_close(llama.apply_top_k(logits, k), TopKLogitsWarper(k)(ids, logits.clone()),
                                   **close)
    for p in (0.05, 0.5, 0.9, 0.999):
        torch.testing.assert_close(llama.apply_top_p(logits, p), TopPLogitsWarper(p)(ids, logits.clone()),
                                   **close)
    torch.testing.assert_close(
        llama.process_logits(logits, temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
        TemperatureLogitsWarper(0.7)(ids, logits.clone()), **close)

    # The whole chain, in HF's order: repetition penalty, temperature, top-k, top-p.
    expected = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.9)):
        expected = proc(ids, expected)
    got = llama.process_logits(logits, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2,
                                seen=seen)
    torch.testing.assert_close(got, expected, **close)
    assert torch.isinf(got).any() and torch.isfinite(got).any()  # the filters did something


def test_allowed_ids_and_stops():
    model = models.tiny_llama(VOCAB, seed=4)
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
    model = models.tiny_llama(VOCAB, max_positions=64)
    gen = lambda prompts=PROMPTS, **kw: \
        sample.generate(model, prompts, **{"max_new_tokens": 4, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="prompts is empty"):
        gen([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen([[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 has token ids outside the vocabulary"):
        gen([[1, VOCAB]])
    with pytest.raises(ValueError,
                       match="prompt of 14 tokens \\+ max_new_tokens=60 exceeds .* context of 64"):
        gen(max_new_tokens=60)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        gen(max_new_tokens=0)
    for kw, msg in [(dict(top_p=0.0), "top_p must be in \\(0, 1\\], got 0.0"), (dict(top_p=1.5), "got 1.5"),
                    (dict(temperature=-0.1), "temperature must be >= 0"),
                    (dict(top_k=-1), "top_k must be >= 0"),
                    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
                    (dict(allowed_ids=[1, VOCAB + 5]), f"allowed_ids has ids outside .*{VOCAB + 5}"),
                    (dict(stop_ids=[-1]), "stop_ids has ids outside"),
                    (dict(allowed_ids=[1, 2], stop_ids=[3]), "stop ids \\[3\\] are not in allowed_ids")]:
        with pytest.raises(ValueError, match=msg):
            gen(**kw)
    with pytest.raises(KeyError, match="<\\|s_9999\\|>"):
        data.token_id(data.tiny_tokenizer(), "<|s_9999|>")


# ---- loading models and the CLI ------------------------------------------------------------------

def test_cli_tiny_model_writes_wav(tmp_path, capsys):
    out_path = tmp_path / "tts.wav"
    r = sample.main(["--model", "tiny", "--codec", "tone", "--text", "Hello there.", "--out", str(out_path),
                     "--max-new-tokens", "24", "--device", "cpu", "--seed", "3"])
    wav, sr = sf.read(out_path)
    n_speech = int(r.lengths[0]) - int(r.finished[0])
    assert sr == codec.SAMPLE_RATE and n_speech > 0
    assert len(wav) == 320 * n_speech
    assert "wrote" in capsys.readouterr().out
    vocab = data.speech_vocab(models.load_model("tiny")[1])  # the CLI's tiny model: 64 speech tokens
    assert vocab.n == 64 and vocab.to_codes(r.tokens[0, :n_speech].tolist())  # all speech tokens


def test_load_model_round_trip(tmp_path):
    model, tok = models.tiny_llama(len(data.tiny_tokenizer()), seed=5), data.tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(str(tmp_path), "cpu", torch.float32)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    a = sample.generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    b = sample.generate(loaded, PROMPTS, max_new_tokens=8, temperature=0)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nope"):
        models.load_model(str(tmp_path / "nope"), "cpu", torch.float32)


def test_load_model_tiny():
    """'tiny' is the trainer's and the CLI's offline model: 64 speech tokens, a seeded tiny Llama."""
    model, tok = models.load_model("tiny", "cpu", torch.float32, seed=7)
    assert data.speech_vocab(tok).n == 64 and model.config.vocab_size == len(tok)
    assert not model.training and model.config.max_position_embeddings == 4096
    ref = models.tiny_llama(len(tok), seed=7, max_positions=4096)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    other, _ = models.load_model("tiny", "cpu", torch.bfloat16, seed=8)
    assert next(other.parameters()).dtype == torch.bfloat16
    assert not torch.equal(other.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())


# ---- the speech-only head: the policy restricted to allowed_ids and renormalized (DESIGN.md §2) --

ALLOWED = list(range(100, 160)) + [299]  # holds some prompt ids (100, 150) and one stop id


def masked_hf_greedy(model, prompts, n, allowed, **kw):
    """HF greedy with a logits processor that sets every id outside `allowed` to -inf."""

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
    model = models.tiny_llama(VOCAB, seed=1)
    n = 24
    free = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, allowed_ids=ALLOWED)
    assert torch.equal(free.tokens, masked_hf_greedy(model, PROMPTS, n, ALLOWED, min_new_tokens=n))
    stop = int(free.tokens[1, 5])  # a stop id row 1 emits mid-way
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, allowed_ids=ALLOWED,
                           stop_ids=(stop,))
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
    model = models.tiny_llama(VOCAB, seed=2)
    T = 0.8
    out = sample.generate(model, PROMPTS * 2, max_new_tokens=20, temperature=T, top_k=10,
                          repetition_penalty=1.3, stop_ids=(299, 150), allowed_ids=ALLOWED,
                          generator=torch.Generator().manual_seed(0))
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
        logp, entropy = llama.head_logprobs(hidden, weight, targets, temp, chunk=8, with_entropy=True)
        grads = torch.autograd.grad(logp, (hidden, weight), upstream.to(dtype))
        assert logp.shape == (B, T) and logp.dtype == dtype
        torch.testing.assert_close(logp, ref, atol=tol, rtol=0)
        for got, want in zip(grads, ref_grads):  # fp32: summation order only, a few ulps of |grad| ~ 10
            torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=0)
        p = torch.softmax(hidden @ weight.T / temp, dim=-1)
        torch.testing.assert_close(entropy, -(p * p.log()).sum(-1).detach(), atol=tol, rtol=0)
        assert not entropy.requires_grad
        with torch.no_grad():  # the no-grad path (old and reference log-probs) is the same formula
            torch.testing.assert_close(llama.head_logprobs(hidden, weight, targets, temp, chunk=8),
                                       ref.detach(), atol=tol, rtol=0)

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            fn()
        return shapes

    # Checkpointed chunks: autograd keeps only the chunks' inputs, never logits ([..., A]).
    kept = saved_shapes(lambda: llama.head_logprobs(hidden, weight, targets, temp, chunk=8))
    assert kept and all(s[-1] != A for s in kept), kept
    # the hook sees them
    assert (B, T, A) in saved_shapes(lambda: direct_logprobs(hidden, weight, targets, temp))


def test_head_rows_train_only_allowed_rows():
    """The trainer's recipe (hidden states of a teacher-forced forward -> head_logprobs over the
    allowed rows) gives the rollout policy's log-probs, and only allowed rows of lm_head get gradient."""
    model = models.tiny_llama(VOCAB, seed=6)
    allowed_ids = [299] + list(range(159, 99, -1)) + [120]  # any order, duplicates allowed
    weight, index = llama.head_rows(model, allowed_ids)
    assert index.tolist() == sorted(ALLOWED) and weight.shape == (len(ALLOWED), model.config.hidden_size)
    assert torch.equal(weight, model.lm_head.weight[index])
    tokens = torch.tensor([[150, 101, 299, 0, 0], [100, 159, 159, 120, 299]])  # row 0 right-padded
    valid = tokens != 0
    rows = llama.to_rows(tokens, index, valid)
    assert torch.equal(index[rows][valid], tokens[valid]) and (rows[~valid] == 0).all()
    with pytest.raises(ValueError, match=r"token ids \[0\] are not among the 61 allowed ids"):
        llama.to_rows(tokens, index)  # pads not marked invalid are not allowed ids
    prompt = [5, 6, 7, 8]
    ids = torch.cat([torch.tensor([prompt] * 2), tokens], dim=1)  # [2, 9]
    hidden = model.model(input_ids=ids).last_hidden_state[:, len(prompt) - 1:-1]  # [2, 5, H]: predicts tokens
    logp = llama.head_logprobs(hidden, weight, rows, 0.9, chunk=2)
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
    full, full_index = llama.head_rows(model)  # None: the full head, no copy
    assert full is model.lm_head.weight and torch.equal(full_index, torch.arange(VOCAB))
    with pytest.raises(ValueError, match="allowed_ids must be a non-empty set of ids in \\[0, 300\\)"):
        llama.head_rows(model, [5, VOCAB])


# ---- the static decode step and --compile --------------------------------------------------------
# Compiled graphs are costly on a CPU (inductor builds C++ kernels: ~20-30 s per graph on 2 cores,
# cold), so the compiled tests use a one-layer model, build each graph once per module and compare
# against the eager references (the dynamic loop, and the same static step uncompiled).

COMPILE_TEXTS = ["Hi.", "Hello there, how are you today?", "Speech, please!",
                 "A much longer sentence than the others, to pad."]


@pytest.fixture(scope="module")
def tok():
    return data.tiny_tokenizer(n_speech=64)


@pytest.fixture(scope="module")
def prompts(tok):
    out = [data.prompt_ids(tok, t) for t in COMPILE_TEXTS]
    assert len({len(p) for p in out}) == len(out)  # left padding differs per row
    return out


def graphs():
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    return counters["stats"]["unique_graphs"]


def assert_same(a, b, atol=1e-5):
    assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


def test_static_step_eager_equals_dynamic_loop(tok, prompts):
    """The static step run eagerly (the function that gets compiled) gives the dynamic loop's
    tokens and log-probs: greedy with and without the speech head, with stops, seeded sampling with
    every knob, a bf16 cache; one Decoder reused across calls of other batches and lengths."""
    sv = data.speech_vocab(tok)
    model = models.tiny_llama(len(tok), seed=3)
    dec = decode.Decoder(model)
    free = sample.generate(model, prompts, max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids())
    stop = int(free.tokens[2, 8])  # rows meet it at different steps (or never)
    sampled = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    cases_0_kw = dict(max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids(), stop_ids=(stop,))
    cases = [
        (prompts, cases_0_kw),
        (prompts, dict(max_new_tokens=24, temperature=0)),
        (prompts[:2], dict(max_new_tokens=30, temperature=0, stop_ids=(int(free.tokens[0, 3]),))),  # new batch
        (prompts * 2, dict(max_new_tokens=24, allowed_ids=sv.allowed_ids(), stop_ids=(sv.end_id, sv.first + 1),
                           **sampled)),
        (prompts[::-1], dict(max_new_tokens=150, temperature=1.0, top_p=0.8, stop_ids=(5, 6))),  # a longer cache
        (prompts, dict(max_new_tokens=20, temperature=0, repetition_penalty=1.5, cache_dtype=torch.bfloat16)),
        (prompts[1:] + prompts[:1], dict(cases_0_kw, max_new_tokens=150)),  # case 0's buffers, grown
    ]
    finished_some, slots = False, []
    for ps, kw in cases:
        def seeded():
            return dict(generator=torch.Generator().manual_seed(7)) if kw.get("temperature", 1) else {}
        ref = sample.generate(model, ps, **kw, **seeded())
        ours = sample.generate(model, ps, decoder=dec, **kw, **seeded())
        # A bf16 cache: bf16 attention over the whole cache vs over its filled prefix rounds differently.
        assert_same(ours, ref, atol=1e-3 if "cache_dtype" in kw else 1e-5)
        finished_some |= bool(ref.finished.any() and not ref.finished.all())
        slots.append(sorted((key[0], st.cache.k.shape[3]) for key, st in dec.states.items()))
    assert finished_some
    # Buffers per batch size (and knobs on or off), P + N slots rounded up to 128, grown when a call needs more.
    assert slots[0] == [(4, 128)] and slots[2] == [(2, 128), (4, 128), (4, 128)], slots
    before, after = Counter(slots[-2]), Counter(slots[-1])
    assert after - before == Counter({(4, 256): 1}) and before - after == Counter({(4, 128): 1})  # replaced
    # fp32 weights under bf16 autocast (the trainer on CUDA): the step reads bf16 copies of the
    # weights, made once per call, where eager autocast casts them at each use: the same values, so
    # the same results as the step reading the fp32 weights (and the dynamic loop's tokens).
    uncast = decode.Decoder(model)
    uncast.layer_weights = lambda dtype, f=uncast.layer_weights: f(None)  # the parameters themselves
    for kw in (cases_0_kw, dict(cases[3][1], cache_dtype=torch.bfloat16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = sample.generate(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
            ours = sample.generate(model, prompts, generator=torch.Generator().manual_seed(3), decoder=dec, **kw)
            plain = sample.generate(model, prompts, generator=torch.Generator().manual_seed(3), decoder=uncast, **kw)
        assert_same(ours, plain, atol=0)
        assert_same(ours, ref, atol=5e-3)  # attention runs in bf16 under autocast: see the bf16 cache above
    assert dec.weight_copies[0].q[0].dtype == torch.bfloat16 and uncast.weight_copies is None
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    dec.release()
    assert not dec.states and dec.weight_copies is None
    with pytest.raises(ValueError, match="another model"):
        sample.generate(models.tiny_llama(len(tok), seed=4), prompts, max_new_tokens=2, decoder=dec)


@pytest.fixture(scope="module")
def small(tok):
    """A one-layer model (fewer kernels to build) and its speech head."""
    return models.tiny_llama(len(tok), seed=3, num_layers=1), data.speech_vocab(tok)


def test_compiled_greedy_equals_eager_and_compiles_once(small, prompts):
    """Inductor-compiled step == the dynamic loop token for token, log-probs within 1e-5, with the
    speech head, prompts of different lengths and a stop id that ends rows early; later calls of the
    same batch (other prompts, other lengths, a fresh Decoder) compile nothing more."""
    model, sv = small
    free = sample.generate(model, prompts, max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids())
    kw = dict(max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids(), stop_ids=(int(free.tokens[2, 8]),))
    ref = sample.generate(model, prompts, **kw)
    assert ref.finished.any() and not ref.finished.all() and len(set(ref.lengths.tolist())) > 1

    dec = decode.Decoder(model, compile=True)
    before = graphs()
    out = sample.generate(model, prompts, decoder=dec, **kw)
    assert graphs() == before + 1  # it really compiled (not a silent fallback to eager)
    assert_same(out, ref)
    assert torch.equal(out.tokens, sample.generate(model, prompts, decoder=decode.Decoder(model), **kw).tokens)

    others = prompts[1:] + prompts[:1]  # the same batch, other rows and lengths: same shapes
    again = sample.generate(model, others, decoder=dec, **kw)
    assert_same(again, sample.generate(model, others, **kw))
    assert_same(sample.generate(model, prompts, compile=True, **kw), ref)  # a Decoder per call: no recompile either
    assert graphs() == before + 1


def test_compiled_full_vocab_greedy_equals_eager(small, prompts):
    """Without allowed_ids the step reads lm_head.weight itself (all rows)."""
    model, _ = small
    free = sample.generate(model, prompts, max_new_tokens=16, temperature=0)
    kw = dict(max_new_tokens=16, temperature=0, stop_ids=(int(free.tokens[0, 5]),))
    ref = sample.generate(model, prompts, **kw)
    assert ref.finished.any()
    before = graphs()
    assert_same(sample.generate(model, prompts, compile=True, **kw), ref)
    assert graphs() == before + 1


def test_compiled_seeded_sampling_equals_eager(small, prompts):
    """Sampling draws its uniforms from the caller's generator outside the compiled step, in the
    same order as the dynamic loop: the same seed gives the same tokens, compiled or not."""
    model, sv = small
    kw = dict(max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3,
              allowed_ids=sv.allowed_ids(), stop_ids=(sv.end_id, sv.first + 1, sv.first + 2))
    ref = sample.generate(model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    before = graphs()
    out = sample.generate(model, prompts, generator=torch.Generator().manual_seed(1), compile=True, **kw)
    assert_same(out, ref)
    assert ref.finished.any()
    other = sample.generate(model, prompts, generator=torch.Generator().manual_seed(2), compile=True, **kw)
    assert not torch.equal(other.tokens, out.tokens)
    assert_same(other, sample.generate(model, prompts, generator=torch.Generator().manual_seed(2), **kw))
    assert graphs() == before + 1


def test_bench_gpu_smoke_runs_on_cpu():
    """`bench.py gpu --smoke`: every part of the GPU benchmark at tiny shapes on a CPU, one JSON line
    each and no error line (the script's crashes show up here, not on a rented GPU)."""
    import json
    t0 = time.time()
    r = subprocess.run([sys.executable, "bench.py", "gpu", "--smoke"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows and not [x for x in rows if "error" in x], r.stdout + r.stderr[-3000:]
    names = {x["name"] for x in rows}
    assert {"gpu/decode", "gpu/decode_ratios", "gpu/grpo_step", "gpu/reward"} <= names, names
    assert {x["engine"] for x in rows if x["name"] == "gpu/decode"} == {"ours_eager", "ours_compiled", "hf_generate",
                                                                        "hf_static_compiled"}
    print(f"bench.py gpu --smoke: {time.time() - t0:.1f} s")


def test_bench_gpu_without_cuda_says_so(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.syspath_prepend(REPO)
    import bench
    with pytest.raises(SystemExit, match="no CUDA device is visible"):  # before any model is built
        bench.main(["gpu"])
    assert capsys.readouterr().out == ""


# ==================================================================================================
# codec.py: the tone codec and the self-contained XCodec2 decoder
# ==================================================================================================

GOLDEN = os.path.join(REPO, "tests", "xcodec2_golden.safetensors")


def _golden():
    """(config, codes [2, 1, 30], reference audio [2, 1, 9600]) from the golden file."""
    with safe_open(GOLDEN, framework="pt") as f:
        cfg = codec.XCodec2Config(**json.loads(f.metadata()["config"]))
        return cfg, f.get_tensor("test.codes"), f.get_tensor("test.audio")


@pytest.fixture(scope="module")
def golden_codec():
    cfg, _, _ = _golden()
    return codec.XCodec2Codec(GOLDEN, "cpu", cfg)


def test_xcodec2_decoder_matches_package_decode_code():
    cfg, codes, want = _golden()
    model = codec.XCodec2Decoder.from_pretrained(GOLDEN, cfg)
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
    cfg, _, _ = _golden()
    with safe_open(GOLDEN, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()
                   if k != "generator.backbone.transformers.1.mlp.fc2.weight"}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="no tensor 'generator.backbone.transformers.1.mlp.fc2.weight'"):
        codec.XCodec2Decoder.from_pretrained(str(tmp_path), cfg)

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
# prosody.py: pitch, voicing, speaking rate, and the guard
# ==================================================================================================

SR = prosody.SAMPLE_RATE



def harmonic_tone(freq_hz, amplitude=0.3):
    """A voice-like tone with 4 harmonics (1/k amplitudes) following the instantaneous frequency
    freq_hz [S] (Hz per sample): phase = 2 pi cumsum(f) / sr, so glides and vibrato are exact."""
    phase = 2 * np.pi * np.cumsum(np.asarray(freq_hz, dtype=np.float64)) / SR
    return (amplitude * sum(np.sin(k * phase) / k for k in (1, 2, 3, 4))).astype(np.float32)


@pytest.mark.parametrize("f0", [120.0, 220.0])
def test_f0_track_steady_tone(f0):
    f0s, voiced = prosody.f0_track(harmonic_tone(np.full(2 * SR, f0)))
    assert f0s.shape == voiced.shape == (200,)  # one frame per 10 ms hop
    # 0.1%, tighter than integer lags allow (220 Hz is a period of 72.7 samples; lag 73 reads 219.2 Hz):
    # this holds only with the parabolic interpolation between lags.
    assert abs(np.median(f0s[voiced]) - f0) < 0.001 * f0
    assert prosody.f0_std_semitones(f0s, voiced) < 0.1
    assert prosody.voiced_frac(voiced) > 0.9
    assert np.all(f0s[~voiced] == 0.0)


def test_f0_std_vibrato():
    # 150 Hz +/- 1 semitone, sinusoidal at 5 Hz over 2 s (10 whole cycles): pitch in semitones is
    # c + sin(2 pi 5 t), whose standard deviation is 1/sqrt(2) = 0.707 semitones.
    t = np.arange(2 * SR) / SR
    f0s, voiced = prosody.f0_track(harmonic_tone(150.0 * 2 ** (np.sin(2 * np.pi * 5 * t) / 12)))
    assert prosody.voiced_frac(voiced) > 0.9
    assert abs(prosody.f0_std_semitones(f0s, voiced) - 1 / np.sqrt(2)) < 0.3


def test_f0_std_glide():
    # 110 Hz to 220 Hz over 2 s, linear in semitones: pitch uniform over a 12-semitone range, whose
    # standard deviation is 12 / sqrt(12) = 3.46 semitones.
    t = np.arange(2 * SR) / SR
    f0s, voiced = prosody.f0_track(harmonic_tone(110.0 * 2 ** (t / 2)))
    assert prosody.voiced_frac(voiced) > 0.9
    assert abs(prosody.f0_std_semitones(f0s, voiced) - 12 / np.sqrt(12)) < 0.3
    assert f0s[voiced][0] < 0.6 * f0s[voiced][-1]  # it tracks the rise, not one average pitch


def test_f0_track_noise_silence_empty_unvoiced():
    white = (0.1 * np.random.default_rng(0).standard_normal(2 * SR)).astype(np.float32)
    f0s, voiced = prosody.f0_track(white)
    assert prosody.voiced_frac(voiced) < 0.05  # aperiodic: YIN's dip never reaches the threshold
    for audio in (np.zeros(2 * SR, np.float32), np.zeros(0, np.float32)):
        f0s, voiced = prosody.f0_track(audio)
        assert f0s.shape == voiced.shape == (len(audio) // 160,)
        assert prosody.voiced_frac(voiced) == 0.0 and prosody.f0_std_semitones(f0s, voiced) == 0.0
        assert prosody.measure(audio, "hello") == {"f0_std_semitones": 0.0, "voiced_frac": 0.0, "chars_per_s": 0.0}


def test_f0_track_energy_gate():
    # A tone 60 dB below the clip's loudest part is background, not voice: unvoiced, though periodic.
    loud, quiet = harmonic_tone(np.full(SR, 150.0)), harmonic_tone(np.full(SR, 150.0), amplitude=3e-4)
    f0s, voiced = prosody.f0_track(np.concatenate([loud, quiet]))
    assert voiced[5:95].all() and not voiced[105:].any()
    f0s, voiced = prosody.f0_track(quiet)  # alone, the same tone is the loudest thing there: voiced
    assert prosody.voiced_frac(voiced) > 0.9


def test_speech_seconds_and_chars_per_s():
    # 0.5 s silence + 1 s tone + 0.7 s silence: 1 s of speech, the silence around it trimmed.
    audio = np.concatenate([np.zeros(SR // 2), harmonic_tone(np.full(SR, 150.0)), np.zeros(7 * SR // 10)]).astype(np.float32)
    assert abs(prosody.speech_seconds(audio) - 1.0) < 0.05
    assert abs(prosody.chars_per_s(12, audio) - 12.0) < 0.6
    # "Hello, world!" normalizes to "helloworld": 10 characters in 1 s.
    assert abs(prosody.measure(audio, "Hello, world!")["chars_per_s"] - 10.0) < 0.5
    # A pause inside the clip is part of the pace: it stays.
    gap = np.concatenate([audio, harmonic_tone(np.full(SR // 2, 150.0))])
    assert abs(prosody.speech_seconds(gap) - 2.2) < 0.05
    assert prosody.speech_seconds(np.zeros(SR, np.float32)) == 0.0 and prosody.chars_per_s(10, np.zeros(0, np.float32)) == 0.0


def test_prosody_of_real_speech():
    path = os.path.join(ASSETS, "speech", "clips.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"no spoken clips at {path} (set TEST_ASSETS to the shared assets folder)")
    rows = [json.loads(line) for line in open(path)]
    for row in rows:
        audio, sr = sf.read(os.path.join(ASSETS, "speech", row["wav"]), dtype="float32")
        assert sr == SR
        m = prosody.measure(audio, row["text"])
        assert all(type(v) is float for v in m.values()), m
        if row["kind"] == "clean":
            # espeak en-us male voice: its pitch sits near 100 Hz (80-120 Hz seen), voiced about
            # half the time, at 11-15 normalized characters per second; a robot, but not a monotone.
            f0s, voiced = prosody.f0_track(audio)
            assert 80 < np.median(f0s[voiced]) < 130, row["wav"]
            assert 0.3 < m["voiced_frac"] < 0.9 and 5 < m["chars_per_s"] < 25, (row["wav"], m)
            assert m["f0_std_semitones"] > 0.5, (row["wav"], m)
        elif row["kind"] == "silence":
            assert m == {"f0_std_semitones": 0.0, "voiced_frac": 0.0, "chars_per_s": 0.0}, row["wav"]
    assert {"clean", "silence"} <= {row["kind"] for row in rows}


def test_band_factor_by_hand():
    assert prosody.band_factor(10.0, 10.0, 0.25) == 1.0
    assert prosody.band_factor(12.5, 10.0, 0.25) == pytest.approx(1.0)  # the band's edges
    assert prosody.band_factor(8.0, 10.0, 0.25) == pytest.approx(1.0)
    # 1.25 x beyond the upper edge: x = w, factor e^-1; symmetric in log units below.
    assert prosody.band_factor(10 * 1.25 ** 2, 10.0, 0.25) == pytest.approx(math.exp(-1))
    assert prosody.band_factor(10 / 1.25 ** 2, 10.0, 0.25) == pytest.approx(math.exp(-1))
    assert prosody.band_factor(10 * 1.25 ** 3, 10.0, 0.25) == pytest.approx(math.exp(-4))
    assert prosody.band_factor(0.0, 10.0, 0.25) == 0.0 and prosody.band_factor(None, 10.0, 0.25) == 0.0
    ref = {"chars_per_s": 15.0, "f0_std_semitones": 2.0}
    s = Score(reward=0.8, chars_per_s=15.0 * 1.25 ** 2, f0_std_semitones=2.0 / 1.5 ** 2)
    assert prosody.guard_factor(s, ref, rate_band=0.25, pitch_band=0.5) == pytest.approx(math.exp(-2))
    assert prosody.guard_factor(Score(reward=0.0, error="bad"), ref, rate_band=0.25, pitch_band=0.5) == 1.0


def test_scorers_measure_prosody(tmp_path):
    """Every scorer fills the prosody fields of a clip it heard; a refused clip has none."""
    tone = (0.3 * np.sin(2 * np.pi * 150 * np.arange(32000) / 16000)).astype(np.float32)  # 2 s at 150 Hz
    scorer = scoring.WhisperScorer("random-tiny", "cpu", "en", max_transcript_tokens=4)
    heard, refused = scorer.score([tone, np.full(5, np.nan, np.float32)], ["hello there", "x"])
    expect = prosody.measure(tone, "hello there")
    for name in ("f0_std_semitones", "voiced_frac", "chars_per_s"):
        assert getattr(heard, name) == pytest.approx(expect[name]) and getattr(refused, name) is None
    assert heard.voiced_frac > 0.9 and heard.f0_std_semitones < 0.1
    assert heard.chars_per_s == pytest.approx(10 / 2.0, rel=0.05)  # "hellothere" over 2 s
    custom = scoring.CustomRewardScorer(f"{__name__}:short_reward").score([tone], ["hello there"])[0]
    assert custom.chars_per_s == pytest.approx(expect["chars_per_s"])


# ==================================================================================================
# config.py: flags, presets and their checks
# ==================================================================================================

def test_config_rejects_values_that_would_fail_later():
    for flags in (["--temperature", "0"], ["--save-every", "0"], ["--micro-batch", "0"],
                  ["--loss-agg", "sum"]):
        with pytest.raises(SystemExit):
            config.parse_config(["--preset", "tiny", *flags])


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(config.Config):
        assert "--" + f.name.replace("_", "-") in text
    assert text.count("(default:") >= len(dataclasses.fields(config.Config))
    cfg = config.parse_config(["--preset", "tiny", "--group-size", "8", "--no-scale-rewards"])
    assert cfg.group_size == 8 and cfg.scale_rewards is False and cfg.codec == "tone"


def test_large_presets_shard_and_need_ranks(monkeypatch):
    """llasa-3b/8b shard with FSDP2 and recompute activations; under one process --fsdp is refused
    with a message that says how to run it."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name, micro in (("llasa-3b", 2), ("llasa-8b", 1)):
        cfg = config.parse_config(["--preset", name])
        assert cfg.fsdp and cfg.grad_checkpointing and cfg.micro_batch == micro
        assert cfg.max_new_tokens == 1500 and cfg.model == f"HKUSTAudio/Llasa-{name[-2:].upper()}"
    assert not config.parse_config(["--preset", "llasa-1b"]).fsdp
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit):
        config.parse_config(["--preset", "llasa-8b"])
    with pytest.raises(ValueError, match="--fsdp shards over ranks"):
        config.check_config(config.Config(fsdp=True), world=1)


def test_train_sh_takes_the_preset_and_the_gpu_count(tmp_path):
    """train.sh with a stand-in torchrun that prints what it was given."""
    fake = tmp_path / "torchrun"
    fake.write_text('#!/usr/bin/env bash\necho "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    run = lambda *args, **extra: subprocess.run(["bash", os.path.join(REPO, "train.sh"), *args], env={**env, **extra},
                                               capture_output=True, text=True, check=True).stdout
    out = run("--steps", "3")
    assert "CUDA_VISIBLE_DEVICES=0,1,2 " in out and "--nproc_per_node=2" in out
    assert "--preset llasa-1b --whisper-device cuda:2 --out runs/llasa-1b --steps 3" in out
    out = run("llasa-8b", "--language", "ko", NPROC="4")
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4 " in out and "--nproc_per_node=4" in out
    assert "--preset llasa-8b --whisper-device cuda:4 --out runs/llasa-8b --language ko" in out


# ==================================================================================================
# grpo.py: the algorithm (advantages, loss, log-probs, update, trainer)
# ==================================================================================================

# ---- advantages and loss -------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = grpo.group_advantages(r, 4)
    g1 = torch.tensor([1.0, 0.0, 0.5, 0.5])
    std = math.sqrt(((g1 - 0.5) ** 2).sum().item() / 3)  # unbiased
    expect = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expect, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: 0, not NaN
    assert torch.allclose(grpo.group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError):
        grpo.group_advantages(r, 3)


def _loss(logp, old, adv, mask, **kw):
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return grpo.policy_loss(t(logp), t(old), kw.pop("ref", None), t(adv), t(mask), **kw)


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
    loss, st = grpo.policy_loss(logp, logp.detach(), ref, torch.tensor([0.0]), torch.tensor([[1.0, 0.0]]),
                                kl_coef=0.04)
    k3 = math.exp(d) - d - 1
    assert st["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(0.04 * k3, rel=1e-5)
    loss.backward()  # d/dlogp of 0.04 * (e^(ref-logp) - (ref-logp) - 1) = 0.04 * (1 - e^d); masked token: 0
    assert logp.grad[0, 0].item() == pytest.approx(0.04 * (1 - math.exp(d)), rel=1e-5)
    assert logp.grad[0, 1].item() == 0.0


def test_policy_loss_dual_clip_by_hand():
    """verl's dual clip: for A < 0 the per-token loss is capped at -A * clip_ratio_c."""
    mask = torch.ones(1, 1)
    # A = -1, ratio = e^2 = 7.39: PPO alone gives max(7.39, 1.2) = 7.39; dual clip caps it at 3.
    loss, st = grpo.policy_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), None, torch.tensor([-1.0]), mask,
                                clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(3.0) and st["dual_clip_frac"] == 1.0 and st["clip_frac"] == 0.0
    # A = -1, ratio = 2: max(2, 1.2) = 2 < 3, no dual clip.
    loss, st = grpo.policy_loss(torch.tensor([[math.log(2.0)]]), torch.zeros(1, 1), None,
                                torch.tensor([-1.0]), mask, clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(2.0) and st["dual_clip_frac"] == 0.0
    # A = +2, ratio = e^2: the PPO clip alone: -min(2 * 7.39, 2 * 1.2) = -2.4, no dual clip for A > 0.
    loss, st = grpo.policy_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), None, torch.tensor([2.0]), mask,
                                clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(-2.4) and st["clip_frac"] == 1.0 and st["dual_clip_frac"] == 0.0
    # The log-ratio is clamped at 20: a huge one stays finite (and is dual-clipped for A < 0).
    loss, _ = grpo.policy_loss(torch.tensor([[80.0]]), torch.zeros(1, 1), None, torch.tensor([-0.5]), mask,
                               clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(1.5)
    # Gradient: zero where dual-clipped (the cap is a constant), -A * ratio where not.
    logp = torch.tensor([[2.0, math.log(2.0)]], requires_grad=True)
    loss, _ = grpo.policy_loss(logp, torch.zeros(1, 2), None, torch.tensor([-1.0]), torch.ones(1, 2),
                               clip_eps=0.2, kl_coef=0.0, clip_ratio_c=3.0)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 2.0 / 2])


# ---- log-probs and the update on 1 vs 2 ranks ----------------------------------------------------

def test_response_logprobs_match_generate():
    """The trainer's teacher-forced log-probs equal the rollout's: importance ratios start at 1."""
    tok = data.tiny_tokenizer()
    sv = data.speech_vocab(tok)
    model = models.tiny_llama(len(tok), seed=3)
    prompts = [data.prompt_ids(tok, t) for t in ["One.", "Two words here.", "셋"]]
    for allowed in (sv.allowed_ids(), None):  # the speech-only policy, and the whole vocabulary
        roll = sample.generate(model, prompts, max_new_tokens=12, temperature=0.8, stop_ids=(sv.end_id,),
                               allowed_ids=allowed, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logp = llama.response_logprobs(model, prompts, roll.tokens, 0.8, allowed_ids=allowed)
        mask = torch.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]
        assert torch.allclose(logp[mask], roll.logprobs[mask], atol=1e-4)


def _fixed_rollouts(seed=0, vocab=None):
    tok = data.tiny_tokenizer()
    g = torch.Generator().manual_seed(seed)
    sv = data.speech_vocab(tok)
    prompts = [data.prompt_ids(tok, t) for t in ["Hello.", "A longer sentence here.", "Hi", "안녕"]
               for _ in range(2)]
    B, T = len(prompts), 7
    tokens = torch.randint(sv.first, sv.first + sv.n, (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4])
    rewards = torch.rand(B, generator=g)
    return tok, grpo.Rollouts(prompts, tokens, lengths, grpo.group_advantages(rewards, 2))


def _port():
    """A free port for a rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_update(rank, world, init_method, out_file, agg, updates=2):
    """One GRPO update over this rank's share of fixed rollouts; world 1 = all of them."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    tok, ro = _fixed_rollouts()
    share = slice(rank * len(ro.prompts) // world, (rank + 1) * len(ro.prompts) // world)
    ro = grpo.Rollouts(ro.prompts[share], ro.tokens[share], ro.lengths[share], ro.advantages[share])
    policy = models.tiny_llama(len(tok), seed=1).train()
    ref = models.tiny_llama(len(tok), seed=2)  # a different reference, so the KL term has a gradient
    cfg = config.Config(kl_coef=0.1, micro_batch=3, updates_per_rollout=updates, loss_agg=agg,
                        temperature=0.8, lr=1e-3, grad_clip=1.0, max_new_tokens=7)
    # SGD, not AdamW: Adam divides by sqrt(v) + eps, which turns the float-rounding noise of a
    # different summation order (~1e-9) in near-zero gradients into ~1e-5 parameter noise.
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = grpo.update_policy(policy, ref, opt, sched, ro, cfg, parallel.Dist(rank=rank, world=world),
                               contextlib.nullcontext)
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in policy.named_parameters()}, "stats": stats},
                   out_file)
    if world > 1:  # small buckets: several collectives, each gradient summed exactly once
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (700, 5, 1300, 1)]
        for p in params:
            p.grad = torch.full_like(p, float(rank + 1)) * torch.arange(p.numel())
        parallel.sync_gradients(params, parallel.Dist(rank=rank, world=world), bucket_numel=1000)
        assert all(torch.equal(p.grad, 3.0 * torch.arange(p.numel()).float()) for p in params)
        dist.barrier()  # nobody tears gloo down while a peer is still talking to it
        dist.destroy_process_group()
        # Skip interpreter teardown: a gloo thread of this short-lived child has been seen to abort
        # there ("terminate called without an active exception") after all the work was done.
        sys.stdout.flush()
        os._exit(0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_two_ranks_equals_one(tmp_path, agg):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _one_update(0, 1, None, one, agg)
    mp.spawn(_one_update, args=(2, f"tcp://127.0.0.1:{_port()}", two, agg), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    for k in a["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], atol=1e-6, rtol=0), k
    assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], abs=1e-6)
    assert a["stats"]["kl"] == pytest.approx(b["stats"]["kl"], rel=1e-5)
    init = models.tiny_llama(len(_fixed_rollouts()[0]), seed=1).state_dict()
    assert any(not torch.equal(init[k], a["params"][k]) for k in init)  # the step did move the weights


def test_grad_checkpointing_gives_the_same_update():
    tok, ro = _fixed_rollouts()
    params = []
    for checkpointing in (False, True):
        policy = models.tiny_llama(len(tok), seed=1).train()
        if checkpointing:
            getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
            assert policy.model.gradient_checkpointing
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        grpo.update_policy(policy, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), ro,
                           config.Config(kl_coef=0.0, micro_batch=4), parallel.Dist(), contextlib.nullcontext)
        # SGD: same step = same grads
        params.append({k: p.detach().clone() for k, p in policy.named_parameters()})
    for k in params[0]:
        assert torch.allclose(params[0][k], params[1][k], atol=1e-7), k


# ---- the trainer end to end ----------------------------------------------------------------------

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
    return config.parse_config(["--preset", "tiny", "--out", str(tmp_path / "run"), *flags])


class _FakeScorer:
    def __init__(self, value):
        self.value = value

    def score(self, audios, texts, languages=None):
        return [Score(reward=self.value) for _ in audios]


class _ScriptedScorer:
    """Scores from a list, in order: a way to make errors, too-long clips and equal groups."""

    def __init__(self, make):
        self.make, self.calls = make, 0

    def score(self, audios, texts, languages=None):
        self.calls += 1
        return [self.make(i) for i in range(len(audios))]


def test_tone_reward_knows_its_optimum():
    low, high = codec.ToneCodec().decode([[0, 5, 15, 3], [40, 50, 63, 30]])
    assert tone_reward(low, "x") == 1.0 and tone_reward(high, "x") == 0.0
    assert tone_reward(np.zeros(0, np.float32), "x") == 0.0


def test_tiny_preset_learns_a_toy_reward(tmp_path):
    """On the tiny preset, GRPO raises the mean reward of a reward whose optimum is known."""
    cfg = _tiny(tmp_path, "--reward", f"{__name__}:tone_reward", "--steps", "30", "--val-data", "",
                "--kl-coef", "0", "--lr", "3e-3", "--sample-every", "100", "--save-every", "100")
    hist = grpo.train(cfg)
    rewards = [m["reward_mean"] for m in hist]
    assert all(math.isfinite(r) for r in rewards)
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.25, (first, last, rewards)


def test_validation_in_training_sized_chunks(tmp_path):
    cfg = _tiny(tmp_path, "--prompts-per-step", "1", "--group-size", "2")  # chunks of 2 of the 6 val texts
    calls = []

    class Counting(_FakeScorer):
        def score(self, audios, texts, languages=None):
            calls.append(len(audios))
            return super().score(audios, texts, languages)

    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), Counting(0.5))
    val, shown = tr.validate()
    assert calls == [2, 2, 2]
    assert shown["texts"] == [ex.text for ex in tr.val_examples[:cfg.n_samples]] and len(shown["audios"]) == 2
    assert 0 < val["val_finished"] <= 1 and val["val_reward"] == pytest.approx(0.5 * val["val_finished"])


def test_disallowed_lm_head_rows_never_change(tmp_path):
    """The policy is speech-only: after a training step, lm_head rows of text tokens are untouched
    (AdamW with no gradient moves nothing), and some speech rows did move."""

    class Varied(_FakeScorer):
        def score(self, audios, texts, languages=None):
            return [Score(reward=float(len(a) % 7) / 7) for a in audios]

    cfg = _tiny(tmp_path, "--val-data", "", "--kl-coef", "0")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), Varied(0.0))
    before = tr.policy.lm.lm_head.weight.detach().clone()
    tr.train_step(0)
    after = tr.policy.lm.lm_head.weight.detach()
    allowed = torch.zeros(len(before), dtype=torch.bool)
    allowed[tr.sampler.allowed_ids] = True
    assert torch.equal(before[~allowed], after[~allowed])
    assert not torch.equal(before[allowed], after[allowed])


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
    assert [m["step"] for m in lines] == [0, 1, 2]  # 0: the validation before any update
    assert math.isfinite(lines[0]["val_reward"]) and "reward_mean" not in lines[0]
    for m in lines[1:]:
        for key in ("reward_mean", "loss", "kl", "entropy", "cer", "nll", "tokens_per_s", "time_reward"):
            assert math.isfinite(m[key]), (key, m)
    assert "val_reward" in lines[-1]
    samples = out / "samples" / "step_2"
    assert (samples / "0.wav").exists() and len(open(samples / "samples.jsonl").readlines()) == 2
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_2")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- overlapped rollouts and rewards --------------------------------------------------------------

class SlowScorer:
    """A deterministic reward that takes its time, like Whisper: the fraction of low codes' energy."""

    def __init__(self, seconds=0.0):
        self.seconds, self.calls = seconds, []

    def score(self, audios, texts, languages=None):
        self.calls.append(len(audios))
        time.sleep(self.seconds)
        return [Score(reward=float(np.abs(a).mean()) if len(a) else 0.0) for a in audios]


def test_compile_flag_builds_one_decoder_per_run(tmp_path):
    """--compile gives the trainer one Decoder (compiled) for the whole run; on a CPU the default
    is the eager loop. The static step's equality with it is tested in the sample.py section."""
    assert grpo.Trainer(_tiny(tmp_path, "--val-data", ""), parallel.Dist(), torch.device("cpu"),
                        _FakeScorer(0.5)).sampler.decoder is None
    tr = grpo.Trainer(_tiny(tmp_path, "--val-data", "", "--compile"), parallel.Dist(), torch.device("cpu"),
                      _FakeScorer(0.5))
    assert isinstance(tr.sampler.decoder, decode.Decoder) and tr.sampler.decoder.compiled
    assert tr.sampler.decoder.model is tr.policy.lm and tr.sampler.decoder.max_len == tr.cfg.max_new_tokens + 256


def test_a_compiled_step_that_fails_falls_back_to_the_eager_loop(tmp_path, capsys):
    """A compile problem on first use is reported and the run goes on eagerly, with the samples of
    the eager loop; a later failure of a step that has worked is an error like any other."""
    cfg = _tiny(tmp_path, "--val-data", "")
    eager = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    def broken_backend(graph, example_inputs):  # what a compiler failing on this machine looks like
        raise RuntimeError("no kernels for this GPU")

    tr.sampler.decoder = decode.Decoder(tr.policy.lm, compile=True, compile_options={"backend": broken_backend})
    texts = ["Hello there.", "Speech."]
    ours = tr.sampler.rollout(texts, torch.Generator().manual_seed(0))
    assert torch.equal(ours.tokens, eager.sampler.rollout(texts, torch.Generator().manual_seed(0)).tokens)
    assert tr.sampler.decoder is None
    assert "compiled decode step failed on first use" in capsys.readouterr().err


def test_overlapped_step_equals_sequential_step(tmp_path):
    """--rollout-chunks 2: scoring chunk 1 while chunk 2 is generated gives the same samples, the
    same rewards and the same parameters after the update as scoring each chunk before going on."""
    results = []
    for overlap in (False, True):
        cfg = _tiny(tmp_path, "--val-data", "", "--rollout-chunks", "2", "--kl-coef", "0.04")
        scorer = SlowScorer(0.3)
        tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), scorer)
        real = tr.sampler.rollout_and_score
        tr.sampler.rollout_and_score = lambda texts, langs, gen: real(texts, langs, gen, overlap=overlap)
        metrics, _ = tr.train_step(0)
        assert scorer.calls == [8, 8]  # two chunks of the 16 rollouts
        results.append((metrics, {k: v.detach().clone() for k, v in tr.policy.state_dict().items()}))
    (seq, p_seq), (ovl, p_ovl) = results
    for key in ("reward_mean", "reward_std", "loss", "entropy", "response_len", "grad_norm"):
        assert seq[key] == ovl[key], key
    assert all(torch.equal(p_seq[k], p_ovl[k]) for k in p_seq)
    # Sequential waits for every chunk's 0.3 s; overlapped hides the first one behind generation.
    assert seq["time_reward"] >= 0.55 and ovl["time_reward"] < seq["time_reward"]


def test_cat_rollouts_pads_to_the_longest():
    a = sample.Rollout(torch.tensor([[5, 6, 7]]), torch.tensor([3]), torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([True]))
    b = sample.Rollout(torch.tensor([[8], [9]]), torch.tensor([1, 1]), torch.tensor([[-4.0], [-5.0]]), torch.tensor([False, True]))
    r = sample.cat_rollouts([a, b])
    assert r.tokens.tolist() == [[5, 6, 7], [8, 0, 0], [9, 0, 0]] and r.lengths.tolist() == [3, 1, 1]
    assert r.logprobs.tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0], [-5.0, 0.0, 0.0]]
    assert r.finished.tolist() == [True, False, True]


# ---- the prosody guard on toy rewards ------------------------------------------------------------

def short_reward(audio, text):
    """Toy reward favouring shorter (faster) speech: 1 for an empty clip, 0 at the tiny cap of 64 codes."""
    return float(max(0.0, 1.0 - len(audio) / (64 * 320)))


def monotone_reward(audio, text):
    """Toy reward favouring one repeated code: the fraction of 20 ms frames whose zero-crossing
    count (the tone codec's pitch) equals the clip's most common one."""
    n = len(audio) // 320
    if n == 0:
        return 0.0
    frames = audio[:n * 320].reshape(n, 320)
    return float(np.bincount((np.diff(np.sign(frames), axis=1) != 0).sum(axis=1)).max() / n)


def _toy_run(tmp_path, reward, guard, steps=15):
    flags = ["--preset", "tiny", "--out", str(tmp_path / f"{reward}_{guard}"), "--reward", f"{__name__}:{reward}",
             "--steps", str(steps), "--kl-coef", "0", "--lr", "3e-3", "--val-every", "1000",
             "--save-every", "1000", "--sample-every", "1000"] + (["--prosody-guard"] if guard else [])
    return grpo.train(config.parse_config(flags))


@pytest.mark.parametrize("reward, measure, band, faster", [("short_reward", "chars_per_s", 0.25, True),
                                                           ("monotone_reward", "f0_std_semitones", 0.5, False)])
def test_prosody_guard_toy_experiment(tmp_path, reward, measure, band, faster):
    """On the tone codec, a reward favouring shorter audio drives the speaking rate up, and one
    favouring a repeated code drives the pitch spread down; with --prosody-guard both stay near
    the initial policy's (the reference measured at the start, reported as ref_*)."""
    free = [m[measure] for m in _toy_run(tmp_path, reward, False)]
    guarded_run = _toy_run(tmp_path, reward, True)
    guarded = [m[measure] for m in guarded_run]
    ref = guarded_run[0][f"ref_{measure}"]
    assert all(m[f"ref_{measure}"] == ref for m in guarded_run)
    edge = ref * (1 + band) if faster else ref / (1 + band)  # the band's edge the reward pushes towards
    end_free, end_guarded = np.median(free[-5:]), np.median(guarded[-5:])
    if faster:
        assert end_free > 1.5 * edge and end_guarded <= 1.25 * edge, (ref, free, guarded)
    else:
        assert end_free < edge and end_guarded >= edge / 1.25, (ref, free, guarded)
    assert all(0 < m["prosody_guard"] <= 1 for m in guarded_run)


# ==================================================================================================
# parallel.py: ranks fail together, FSDP2
# ==================================================================================================

# ---- rank agreement: one failing rank stops the job ----------------------------------------------

def _failing_rank(rank: int, port: int, out: str, where: str):
    """One rank of a 2-rank tiny run (no torchrun agent: the ranks must stop by themselves)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if rank == 1 and where == "reward":
        real, calls = ww.WorkerClient.score, []

        def score(self, *args):  # call 1: the validation before step 1; 2: step 1; 3: step 2
            calls.append(1)
            if len(calls) == 3:
                raise TimeoutError("injected: the Whisper worker did not answer (rank 1, step 2)")
            return real(self, *args)
        ww.WorkerClient.score = score
    if rank == 1 and where == "validation":
        import rollout as rollouts
        real_rollout, real_stage, validations = rollouts.Sampler.rollout, rollouts.Sampler.sample_and_score, []

        def sample_and_score(self, examples, stage):
            validations.append(stage == "validation")
            try:
                return real_stage(self, examples, stage)
            finally:
                validations.append(False)

        def rollout(self, texts, generator):
            # inside the validation after step 2 (the first is before step 1)
            if validations and validations[-1] and validations.count(True) == 2:
                raise RuntimeError("injected: validation broke on rank 1")
            return real_rollout(self, texts, generator)
        rollouts.Sampler.sample_and_score, rollouts.Sampler.rollout = sample_and_score, rollout
    grpo.main(["--preset", "tiny", "--steps", "4", "--out", out, "--save-every", "1", "--val-every", "2",
               "--sample-every", "9"])


@pytest.mark.parametrize("where", ["reward", "validation"])
def test_one_failing_rank_stops_the_job(tmp_path, where):
    """Rank 1 fails at step 2; both ranks exit non-zero within 60 s (no torchrun agent to kill
    them), rank 1 prints its message, and the step-1 checkpoint on disk is whole."""
    port = _port()
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
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)["step"] == 1
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_2"))


# ---- FSDP2 ---------------------------------------------------------------------------------------

def _fsdp_update(rank, world, init_method, out_file, ckpt):
    """_one_update's rollouts and settings, with the policy and reference sharded by FSDP2."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    tok, ro = _fixed_rollouts()
    share = slice(rank * len(ro.prompts) // world, (rank + 1) * len(ro.prompts) // world)
    ro = grpo.Rollouts(ro.prompts[share], ro.tokens[share], ro.lengths[share], ro.advantages[share])
    policy = parallel.shard(llama.LogProbs(models.tiny_llama(len(tok), seed=1)).train(), torch.device("cpu"))
    ref = parallel.shard(llama.LogProbs(models.tiny_llama(len(tok), seed=2)), torch.device("cpu"))
    cfg = config.Config(kl_coef=0.1, micro_batch=3, updates_per_rollout=2, loss_agg="token-mean",
                        temperature=0.8, lr=1e-3, grad_clip=1.0, max_new_tokens=7, fsdp=True)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    d = parallel.Dist(rank=rank, world=world)
    stats = grpo.update_policy(policy, ref, opt, sched, ro, cfg, d, contextlib.nullcontext)
    weights = parallel.full_model_state(policy, d)
    if rank == 0:
        torch.save({"params": weights, "stats": stats}, out_file)
        outputs.save_checkpoint(ckpt, policy.lm, tok, {"step": 1}, weights=weights)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_fsdp_update_equals_replicated_and_checkpoints_whole_weights(tmp_path):
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
    ref = models.tiny_llama(len(_fixed_rollouts()[0]), seed=1)
    ref.load_state_dict(b["params"])
    ids = torch.tensor([_fixed_rollouts()[1].prompts[0]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def _torchrun(out, *flags, steps):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "grpo.py"), "--preset", "tiny", "--fsdp", "--steps", str(steps),
           "--out", str(out), "--reward", "test_grpo:tone_reward", "--val-data", "", "--save-every", "2",
           "--sample-every", "9", *flags]
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
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "checkpoints" / "step_4")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ==================================================================================================
# memory.py: the memory model against real tensors
# ==================================================================================================

def _peak_bytes(fn) -> int:
    """Peak rise (bytes) of CPU memory allocated while fn() runs, from the profiler's allocation
    events (the CPU allocator caches nothing, so this is what tensors really hold)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler.kineto_results, "experimental_event_tree", None)
    if results is None:
        pytest.skip("this torch's profiler has no experimental_event_tree")
    events, stack = [], list(results())
    while stack:
        e = stack.pop()
        if str(e.tag).endswith("Allocation"):
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    peak = now = 0
    for _, size in sorted(events):
        now += size
        peak = max(peak, now)
    return peak


def test_memory_state_bytes_match_real_tensors():
    # weights, grads and AdamW moments of real models (tied and untied) after one step
    for tied in (False, True):
        model = models.tiny_llama(1003, hidden_size=64, num_layers=2, tie_word_embeddings=tied).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randint(0, 1003, (2, 9))).logits.float().sum().backward()
        opt.step()
        m = memory.training_memory(model.config)
        assert m["weights"] == sum(p.nbytes for p in model.parameters())
        assert m["grads"] == sum(p.grad.nbytes for p in model.parameters())
        # the moments; AdamW's "step" counters are scalars (on the host for non-capturable AdamW)
        assert m["optimizer"] == sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step")
        assert m["optimizer_step"] == m["weights"]


def test_memory_fsdp_shards_match_fully_shard():
    # FSDP2 on a fake 4-rank process group (one process): rank 0's real shards, padded on dim 0
    # (vocab 1003 is not a multiple of 4), and the whole bf16 copy gathered for rollouts.
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    world, allowed = 4, 100
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        model = models.tiny_llama(1003, hidden_size=64, num_layers=2).train()
        m = memory.training_memory(model.config, world=world, fsdp=True, allowed=allowed)
        assert m["weights"] < sum(p.nbytes for p in model.parameters()) / world + 64 * 4 * 2  # about 1/4
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        logits = model(torch.randint(0, 1003, (2, 9))).logits
        # after the forward the root (embeddings, norm, lm_head) stays gathered in bf16 for the
        # backward, the layers are sharded again: fsdp_unsharded = that root, lm_head's bf16 grad
        # [V, d], and a layer's bf16 params, the next layer's (prefetched) and its own grads
        root = {n: p for n, p in model.named_parameters() if not n.startswith("model.layers.")}
        assert all(type(p) is torch.nn.Parameter and p.dtype == torch.bfloat16 for p in root.values())
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.model.layers.parameters())
        assert m["fsdp_unsharded"] == sum(p.nbytes for p in root.values()) + 2 * 1003 * 64 + 3 * 2 * layer
        logits.float().sum().backward()
        opt.step()
        assert m["weights"] == sum(p.to_local().nbytes for p in model.parameters())
        assert m["grads"] == sum(p.grad.to_local().nbytes for p in model.parameters())
        assert m["optimizer"] == sum(v.to_local().nbytes for s in opt.state.values()
                                     for k, v in s.items() if k != "step")
        mods = [x for x in model.modules() if isinstance(x, FSDPModule)]
        for x in mods:
            x.unshard()
        gathered = sum(p.nbytes for p in model.parameters())  # bf16, whole
        for x in mods:
            x.reshard()
        assert m["rollout_weights"] == gathered + 2 * allowed * 64  # + head_rows' bf16 copy
    finally:
        dist.destroy_process_group()


def test_memory_kv_cache_matches_real_cache():
    model = models.tiny_llama(500, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    cache = llama.KVCache.for_model(model, 5, 77, torch.bfloat16)
    real = cache.k.nbytes + cache.v.nbytes
    assert memory.kv_cache_bytes(model.config, 5, 77) == real
    assert memory.training_memory(model.config, rollout_batch=5, rollout_len=77)["kv_cache"] == real
    # the seed recipe on Llasa-1B: 64 sequences of 1600 slots
    assert memory.training_memory(memory.LLASA_SHAPES["llasa-1b"])["kv_cache"] == 16 * 2 * 64 * 8 * 1600 * 64 * 2


def test_memory_logits_match_the_largest_tensor_of_head_logprobs():
    # the largest fp32 tensor over the head's rows that llama.head_logprobs creates (forward and
    # backward) is one chunk's logits [B, chunk, rows]: the logits term is it and its gradient;
    # unchunked over the whole vocabulary, the old term
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self, rows):
            super().__init__()
            self.rows, self.shape, self.nbytes = rows, None, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() and t.shape[-1] == self.rows
                        and t.nbytes > self.nbytes):
                    self.shape, self.nbytes = tuple(t.shape), t.nbytes
            return out

    torch.manual_seed(0)
    B, T, H, V, A, chunk = 2, 40, 16, 300, 120, 16
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    for rows, c in ((A, chunk), (V, T)):  # speech-only chunked; full vocabulary, one chunk
        with Largest(rows) as largest:
            llama.head_logprobs(hidden, weight[:rows], torch.randint(0, rows, (B, T)), 0.8, chunk=c).sum().backward()
        assert math.prod(largest.shape) == B * c * rows  # (matmuls see [B * c, rows])
        assert memory.logits_bytes(B, c, rows) == 2 * largest.nbytes == 2 * torch.empty(B, c, rows).nbytes
    m = memory.training_memory(memory.LLASA_SHAPES["llasa-1b"])
    assert m["logits"] == 2 * torch.empty(2, 256, 65537, device="meta").nbytes  # 268 MB
    assert memory.logits_bytes(2, 1500, 193_800) == 2 * torch.empty(2, 1500, 193_800, device="meta").nbytes


def test_memory_llasa_param_counts_are_exact():
    # built on the meta device: Llama-3.2-1B / 3.2-3B / 3.1-8B (1.24B / 3.21B / 8.03B at vocab
    # 128,256) plus 65,544 more embedding rows (twice for the untied 8B)
    counts = {name: memory.param_count(shape) for name, shape in memory.LLASA_SHAPES.items()}
    assert counts == {"llasa-1b": 1_370_048_512, "llasa-3b": 3_414_100_992, "llasa-8b": 8_567_197_696}
    extra = 193_800 - 128_256
    assert counts["llasa-1b"] - extra * 2048 == 1_235_814_400  # Llama-3.2-1B's published count
    assert counts["llasa-8b"] - 2 * extra * 4096 == 8_030_261_248  # Llama-3.1-8B's
    assert memory.training_memory(memory.LLASA_SHAPES["llasa-8b"])["weights"] == 4 * counts["llasa-8b"]


def _saved_bytes(model, batch, length):
    """Bytes of the distinct non-parameter storages autograd saves in a bf16-autocast forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model(input_ids=ids, use_cache=False)
    return sum(saved.values())


def test_memory_activation_bytes_match_saved_tensors():
    # Per layer per token: (2 more layers, 64 more tokens) cancels the rest of the model and the
    # per-layer constant; the constant itself is the layer's bf16 weight casts.
    shape = dict(hidden_size=256, num_heads=8, num_kv_heads=2, intermediate_size=1024)
    small, big = (models.tiny_llama(512, num_layers=n, **shape).train() for n in (2, 4))
    b = {(n, L): _saved_bytes(model, 2, L) for n, model in ((2, small), (4, big)) for L in (64, 128)}
    per_token = (b[4, 128] - b[4, 64] - b[2, 128] + b[2, 64]) / (2 * 2 * 64)  # bytes per layer per token
    per_layer = (b[4, 64] - b[2, 64]) / 2 - per_token * 2 * 64
    formula = memory.layer_activation_bytes(small.config)
    print(f"activations per layer per token: measured {per_token:.0f} B, formula {formula} B")
    assert abs(per_token - formula) <= 0.1 * formula
    casts = memory.training_memory(small.config)["weight_casts"] / 2  # per layer
    assert abs(per_layer - casts) <= 0.01 * casts


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_memory_update_peak_matches_measurement(grad_checkpointing):
    # One micro-batch's forward + backward after another (gradients already exist), measured with
    # the profiler, against the update terms beyond the gradients.
    B, P, T, A, chunk = 2, 16, 96, 400, 64
    model = models.tiny_llama(1200, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=512).train()
    if grad_checkpointing:  # as grpo.Trainer does (transformers 5 renamed it)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    g = torch.Generator().manual_seed(0)
    allowed = torch.arange(600, 600 + A)
    prompts = [torch.randint(0, 600, (P,), generator=g).tolist() for _ in range(B)]
    tokens = allowed[torch.randint(0, A, (B, T), generator=g)]

    def micro_batch():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = llama.response_logprobs(model, prompts, tokens, 0.8, allowed_ids=allowed)
        (logp.sum() / logp.numel()).backward()

    micro_batch()
    measured = _peak_bytes(micro_batch)
    m = memory.training_memory(model.config, micro_batch=B, seq_len=P + T, response_len=T, allowed=A,
                               chunk=chunk, grad_checkpointing=grad_checkpointing)
    formula = m["update"] - m["grads"]
    print(f"update peak (GC {grad_checkpointing}): measured {measured / 1e6:.2f} MB, formula {formula / 1e6:.2f} MB")
    assert abs(measured - formula) <= 0.1 * formula


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_memory_fsdp_update_peak_matches_measurement(grad_checkpointing):
    # The same with FSDP2 (bf16 compute params, fp32 reduction) on a fake 2-rank group, sharded as
    # parallel.shard does (each layer, then the llama.LogProbs root). The CPU has no side streams, so
    # the prefetch overlaps less than on a GPU.
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    B, P, T, A, chunk, world = 2, 16, 96, 400, 64, 2
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        lm = models.tiny_llama(3000, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=512).train()
        if grad_checkpointing:
            getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)()
        model = llama.LogProbs(lm)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in lm.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        g = torch.Generator().manual_seed(0)
        allowed = torch.arange(600, 600 + A)
        prompts = [torch.randint(0, 600, (P,), generator=g).tolist() for _ in range(B)]
        tokens = allowed[torch.randint(0, A, (B, T), generator=g)]

        def micro_batch():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logp = model(prompts, tokens, 0.8, allowed_ids=allowed)
            (logp.sum() / logp.numel()).backward()

        micro_batch()
        measured = _peak_bytes(micro_batch)
    finally:
        dist.destroy_process_group()
    m = memory.training_memory(lm.config, world=world, fsdp=True, micro_batch=B, seq_len=P + T, response_len=T,
                               allowed=A, chunk=chunk, grad_checkpointing=grad_checkpointing)
    formula = m["update"] - m["grads"]
    print(f"FSDP update peak (GC {grad_checkpointing}): measured {measured / 1e6:.2f} MB, "
          f"formula {formula / 1e6:.2f} MB")
    assert abs(measured - formula) <= 0.15 * formula


def test_memory_optimizer_step_and_rollout_peaks_match_measurement():
    model = models.tiny_llama(1200, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=1024)
    # foreach AdamW (CUDA's default): one temporary the size of all parameters
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    opt.step()  # the first step creates the moments
    m = memory.training_memory(model.config, micro_batch=2, seq_len=20, response_len=12, rollout_batch=16,
                               rollout_len=20, allowed=400)
    measured = _peak_bytes(opt.step)
    print(f"optimizer step: measured {measured / 1e6:.2f} MB, formula {m['optimizer_step'] / 1e6:.2f} MB")
    assert abs(measured - m["optimizer_step"]) <= 0.1 * m["optimizer_step"]
    # a rollout of 16 sequences (8-token prompts, 12 new tokens) on fp32 weights under bf16 autocast
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 600, (8,), generator=g).tolist() for _ in range(16)]

    def rollout():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            sample.generate(model.eval(), prompts, max_new_tokens=12, temperature=0.8, top_p=0.9,
                            allowed_ids=torch.arange(600, 1000), generator=g, cache_dtype=torch.bfloat16)

    measured = _peak_bytes(rollout)
    print(f"rollout: measured {measured / 1e6:.2f} MB, formula {m['rollout'] / 1e6:.2f} MB "
          f"(kv {m['kv_cache'] / 1e6:.2f}, weights {m['rollout_weights'] / 1e6:.2f}, decode {m['decode'] / 1e6:.2f})")
    assert abs(measured - m["rollout"]) <= 0.1 * m["rollout"]


# ==================================================================================================
# outputs.py: checkpoints, the --out and --resume rules, metrics
# ==================================================================================================

# ---- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_loads_to_identical_logits(tmp_path):
    tok = data.tiny_tokenizer(n_speech=64)
    model = models.tiny_llama(len(tok), seed=5)
    path = str(tmp_path / "ckpt")
    outputs.save_checkpoint(path, model, tok, {"step": 1})
    outputs.save_checkpoint(path, model, tok, {"step": 2})  # overwriting an existing checkpoint is atomic too
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([data.prompt_ids(AutoTokenizer.from_pretrained(path), "Hello there.")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)["step"] == 2
    with open(os.path.join(path, "tokenizer_config.json")) as f:  # loadable by transformers 4.x too
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_checkpoint_is_durable_trainer_state_last(tmp_path, monkeypatch):
    tok = data.tiny_tokenizer(n_speech=8)
    model = models.tiny_llama(len(tok), seed=0)
    events = []
    real_fsync, real_replace = outputs._fsync, os.replace
    monkeypatch.setattr(outputs, "_fsync", lambda p: (events.append(("fsync", os.path.relpath(p, tmp_path))),
                                                      real_fsync(p)))
    monkeypatch.setattr(outputs.os, "replace",
                        lambda a, b: (events.append(("rename", os.path.relpath(a, tmp_path))),
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


# ---- --out and --resume --------------------------------------------------------------------------

def test_resume_continues_exactly(tmp_path):
    """Stop after 2 steps, resume from that checkpoint: steps 3-4 equal an uninterrupted run's."""
    common = ["--reward", f"{__name__}:tone_reward", "--val-data", "", "--kl-coef", "0.04",
              "--save-every", "2"]
    full = grpo.train(_tiny(tmp_path / "a", *common, "--steps", "4"))
    grpo.train(_tiny(tmp_path / "b", *common, "--steps", "2"))
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step_2"
    resumed = grpo.train(_tiny(tmp_path / "b", *common, "--steps", "4", "--resume", str(ckpt)))
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("reward_mean", "loss", "kl", "entropy", "response_len", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    lines = [json.loads(x) for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


def test_out_holding_a_run_is_refused_and_resume_auto_continues(tmp_path, capsys):
    common = ["--reward", f"{__name__}:tone_reward", "--val-data", "", "--save-every", "1",
              "--sample-every", "9"]
    grpo.train(_tiny(tmp_path, *common, "--steps", "2"))
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError,
                       match=r"already holds a run \(metrics.jsonl with 2 steps; checkpoints/"):
        grpo.train(_tiny(tmp_path, *common, "--steps", "3"))
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing was touched
    # An incomplete checkpoint (no trainer state) is never picked.
    (run / "checkpoints" / "step_7").mkdir()
    resumed = grpo.train(_tiny(tmp_path, *common, "--steps", "3", "--resume", "auto"))
    assert [m["step"] for m in resumed] == [3]
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [1, 2, 3]
    capsys.readouterr()
    assert grpo.train(_tiny(tmp_path, *common, "--steps", "3", "--resume", "auto")) == []
    assert "already complete" in capsys.readouterr().out
    # A fresh --out with --resume auto simply starts.
    assert len(grpo.train(_tiny(tmp_path / "new", *common, "--steps", "1", "--resume", "auto"))) == 1


# ---- metrics -------------------------------------------------------------------------------------

def test_step_metrics_report_errors_too_long_zero_std_and_the_lr_used(tmp_path):
    cfg = _tiny(tmp_path, "--val-data", "", "--warmup-steps", "4", "--lr", "1e-3", "--max-new-tokens", "200")

    def make(i):  # 4 groups of 4: group 0 all errors (zero std), group 1 too long at clip 4, others vary
        if i < 4:
            return Score(reward=0.0, error="audio has 3 NaN or inf samples")
        if i == 4:
            return Score(reward=0.0, error="31.0 s is longer than Whisper's 30 s window", too_long=True)
        return Score(reward=0.1 * (i % 4), transcript="x", cer=0.5, nll=1.0)

    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _ScriptedScorer(make))
    m, _ = tr.train_step(0)
    assert m["error_frac"] == pytest.approx(5 / 16) and m["too_long_frac"] == pytest.approx(1 / 16)
    assert m["cer"] == pytest.approx(0.5) and m["nll"] == pytest.approx(1.0)  # errors have no cer, not 0
    assert m["zero_std_frac"] >= 0.25  # group 0 at least (truncation may zero more)
    assert m["lr"] == pytest.approx(1e-3 / 4)  # warm-up: the first step runs at 1/4 of the rate
    m2, _ = tr.train_step(1)
    assert m2["lr"] == pytest.approx(2e-3 / 4)


# ==================================================================================================
# failures are loud and safe: bad data, non-finite values, dead workers, unscorable steps
# ==================================================================================================

def test_bad_dataset_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"txt": "oops"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        grpo.train(_tiny(tmp_path, "--data", str(bad)))


def test_unknown_language_is_rejected_at_load(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "language": "ko"}\n{"text": "oops", "language": "klingon"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: language 'klingon'"):
        grpo.train(_tiny(tmp_path, "--data", str(bad)))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: language 'ko' is not one Whisper 'tiny.en' knows"):
        grpo.train(_tiny(tmp_path, "--data", str(bad), "--whisper", "tiny.en"))
    with pytest.raises(ValueError, match=r"--language"):
        grpo.train(_tiny(tmp_path, "--language", "xx"))


def test_nan_reward_stops_with_step(tmp_path):
    cfg = _tiny(tmp_path, "--val-data", "")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(float("nan")))
    with pytest.raises(FloatingPointError, match="step 1: non-finite reward"):
        tr.train_step(0)


def test_nan_gradient_skips_the_step():
    """A non-finite gradient raises before the optimizer step: the weights stay as they were."""
    tok, ro = _fixed_rollouts()
    policy = models.tiny_llama(len(tok), seed=1).train()
    with torch.no_grad():
        policy.lm_head.weight[ro.tokens[0, 0]] = float("nan")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        grpo.update_policy(policy, None, opt, sched, ro, config.Config(kl_coef=0.0), parallel.Dist(),
                           contextlib.nullcontext)
    after = policy.state_dict()
    assert all(torch.allclose(before[k], after[k], equal_nan=True) for k in before)


def test_a_step_where_no_clip_could_be_scored_stops(tmp_path):
    cfg = _tiny(tmp_path, "--val-data", "")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"),
                      _ScriptedScorer(lambda i: Score(reward=0.0,
                                                      error="scoring failed: RuntimeError: CUDA error")))
    with pytest.raises(RuntimeError, match="step 1: not one of 16 clips could be scored: scoring failed"):
        tr.train_step(0)


def dying_reward(audio, text):
    os._exit(3)


def test_dead_worker_stops_training_with_exit_code(tmp_path):
    t0 = time.time()
    with pytest.raises(ww.WorkerDiedError, match="3"):
        grpo.train(_tiny(tmp_path, "--reward", f"{__name__}:dying_reward", "--val-data", ""))
    assert time.time() - t0 < 90


# ==================================================================================================
# demo.py, plot.py: the CPU demo (word codec, texts, warm start, learning curve)
# ==================================================================================================

def test_word_codec_decodes_codes_to_the_stored_clips_joined_by_gaps():
    wc = codec.load_codec("words")
    with np.load(codec.WORDS_FILE) as z:
        pcm, offsets, words = z["clips"], z["offsets"], [str(w) for w in z["words"]]
    assert words == demo.VOCAB and len(offsets) == len(words) + 1

    def clip(k):
        return pcm[offsets[k]:offsets[k + 1]].astype(np.float32) / 32768.0

    gap = np.zeros(int(round(0.06 * codec.SAMPLE_RATE)), dtype=np.float32)
    out = wc.decode([[3, 0, 7], torch.tensor([5]), []])
    assert [a.dtype for a in out] == [np.float32] * 3
    np.testing.assert_array_equal(out[0], np.concatenate([clip(3), gap, clip(0), gap, clip(7)]))
    np.testing.assert_array_equal(out[1], clip(5))
    assert len(out[2]) == 0
    assert wc.text([[3, 0, 7]]) == [f"{words[3]} {words[0]} {words[7]}"]
    assert all(len(clip(k)) > 0.1 * codec.SAMPLE_RATE for k in range(len(words)))  # every word is speech
    for bad in ([len(words)], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match="clip 0"):
            wc.decode([bad])
    assert isinstance(codec.load_codec(f"words:{codec.WORDS_FILE}"), codec.WordCodec)
    with pytest.raises(FileNotFoundError, match="build-words"):
        codec.load_codec("words:/nonexistent/words.npz")


def test_demo_texts_use_only_the_vocabulary_and_validation_is_held_out():
    train_pool, val_pool = demo.make_texts(0)
    train = [ex.text for ex in data.load_dataset(demo.TRAIN_FILE)]
    val = [ex.text for ex in data.load_dataset(demo.VAL_FILE)]
    kept = [ex.text for ex in data.load_dataset(demo.VAL_DEMO_FILE)]
    # The shipped files are the script's output: every held-out candidate in val.jsonl, and kept
    # candidates, in the pools' order, in train.jsonl and val_demo.jsonl.
    assert val == val_pool and not set(train_pool) & set(val_pool)
    assert len(train) == demo.N_TRAIN and len(kept) == demo.N_VAL
    assert train == [t for t in train_pool if t in set(train)] and kept == [t for t in val_pool if t in set(kept)]
    vocab = set(demo.VOCAB)
    assert all(w in vocab for t in train + val for w in t.split())
    tok = demo.demo_tokenizer()
    speech = data.speech_vocab(tok)
    assert speech.n == len(demo.VOCAB)
    ids, attn, target = demo.warm_start_batch(tok, val[:2])
    for i, text in enumerate(val[:2]):  # the response is the words' speech tokens, then the stop token
        response = ids[i][target[i].bool()].tolist()
        assert response == [speech.first + demo.VOCAB.index(w) for w in text.split()] + [speech.end_id]
        assert int(attn[i].sum()) == len(data.prompt_ids(tok, text)) + len(response)


def _val_nll(model, tok, texts):
    """Mean NLL (nats) of the texts' word tokens and stop token after their prompts."""
    ids, attn, target = demo.warm_start_batch(tok, texts)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return float(-(logp * target[:, 1:]).sum() / target[:, 1:].sum())


def test_demo_sentences_are_those_whisper_hears_right():
    """build-texts kept the candidates that tiny.en transcribes exactly when said right: a sample of
    the kept ones passes `heard_right`, the candidates it skipped before them do not."""
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if not os.path.exists(checkpoint):
        pytest.skip(f"{checkpoint} not found (set TEST_ASSETS to the shared assets folder)")
    train_pool, _ = demo.make_texts(0)
    train = [ex.text for ex in data.load_dataset(demo.TRAIN_FILE)]
    kept = [ex.text for ex in data.load_dataset(demo.VAL_DEMO_FILE)]
    skipped = [t for t in train_pool[:train_pool.index(train[9]) + 1] if t not in set(train)]
    assert len(skipped) >= 3
    ok = demo.heard_right(train[:5] + kept[:3] + skipped[:5], checkpoint)
    assert ok == [True] * 8 + [False] * len(skipped[:5])


def test_warm_start_is_deterministic_reads_then_confuses_word_pairs():
    # 60 + 30 steps (the demo's policy takes 2000 + 300, too long for a test).
    torch.set_num_threads(1)
    m1, tok = demo.warm_start(seed=0, steps=60, confusion_steps=30, log=None)
    m2, _ = demo.warm_start(seed=0, steps=60, confusion_steps=30, log=None)
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), name
    untrained, _ = demo.warm_start(seed=0, steps=0, confusion_steps=0, log=None)
    reader, _ = demo.warm_start(seed=0, steps=60, confusion_steps=0, log=None)
    val = [ex.text for ex in data.load_dataset(demo.VAL_FILE)]
    partner = demo.confusions()
    assert sorted(partner) == sorted(demo.VOCAB) and all(a != b for a, b in partner.items())
    assert all(any(a in ws and b in ws for ws in demo.WORDS.values()) for a, b in partner.items())  # same role
    confused = [" ".join(partner[w] for w in t.split()) for t in val]
    # Reading: held-out sentences' word tokens are far more likely than before training...
    assert _val_nll(reader, tok, val) < _val_nll(untrained, tok, val) - 1.0
    # ...confusing: only lm_head moved, towards saying each word's partner.
    for (name, a), (_, b) in zip(reader.state_dict().items(), m1.state_dict().items()):
        assert torch.equal(a, b) != (name == "lm_head.weight"), name
    assert _val_nll(m1, tok, confused) < _val_nll(reader, tok, confused) - 0.3


def test_ensure_policy_builds_once_and_loads(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    path = demo.ensure_policy(str(tmp_path / "policy"), seed=0, steps=3, confusion_steps=2)
    assert path == str(tmp_path / "policy") and sorted(os.listdir(tmp_path)) == ["policy"]
    weights = os.path.join(path, "model.safetensors")
    stamp = os.path.getmtime(weights)
    assert demo.ensure_policy(path, seed=0, steps=3, confusion_steps=2) == path and os.path.getmtime(weights) == stamp  # kept
    monkeypatch.setattr(demo, "POLICY_DIR", path)  # where "demo" resolves to: built already, so loaded
    assert models.load_model(demo.resolve_model("demo"), dtype=torch.float32)[0].config.vocab_size == len(demo.demo_tokenizer())
    model, tok = models.load_model(path, dtype=torch.float32)
    assert data.speech_vocab(tok).n == len(demo.VOCAB)
    assert data.prompt_ids(tok, "the cat sees the dog") == data.prompt_ids(demo.demo_tokenizer(), "the cat sees the dog")
    fresh, _ = demo.warm_start(seed=0, steps=3, confusion_steps=2, log=None)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_demo_grpo_steps_end_to_end_with_real_whisper(tmp_path):
    """--preset demo, shortened: word audio -> real Whisper tiny.en -> reward -> update, through
    grpo.train; the learning curve's step-0 point, samples before and after, metrics.png."""
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if not os.path.exists(checkpoint):
        pytest.skip(f"{checkpoint} not found (set TEST_ASSETS to the shared assets folder)")
    torch.set_num_threads(1)
    policy = demo.ensure_policy(str(tmp_path / "policy"), seed=0, steps=40, confusion_steps=20)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": ex.text}) + "\n" for ex in data.load_dataset(demo.VAL_DEMO_FILE)[:3]))
    out = tmp_path / "run"
    cfg = config.parse_config(["--preset", "demo", "--model", policy, "--whisper", checkpoint,
                               "--whisper-threads", "1", "--val-data", str(val), "--out", str(out),
                               "--steps", "2", "--prompts-per-step", "1", "--group-size", "4",
                               "--val-every", "2", "--sample-every", "2", "--save-every", "2", "--n-samples", "2"])
    assert (cfg.codec, cfg.whisper_window, cfg.temperature) == ("words", demo.WHISPER_WINDOW_S, 1.0)
    history = grpo.train(cfg)
    assert [m["step"] for m in history] == [1, 2]
    for m in history:
        for key in ("reward_mean", "cer", "nll", "loss"):
            assert math.isfinite(m[key]), (key, m[key])
        # a 60-step policy may ramble past Whisper's 8 s: refused as too long, the only error allowed
        assert 0 <= m["reward_mean"] <= 1 and m["error_frac"] == m["too_long_frac"]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: validation before any update
    assert set(rows[0]) >= {"val_cer", "val_reward"} and "reward_mean" not in rows[0]
    assert 0 <= rows[0]["val_cer"] and 0 <= rows[2]["val_cer"]
    for folder in ("val_step_0", "val_step_2", "step_2"):  # before and after, to listen to
        names = sorted(os.listdir(out / "samples" / folder))
        assert sum(n.endswith(".wav") for n in names) == 2 and "samples.jsonl" in names, folder
    before = [json.loads(line) for line in open(out / "samples" / "val_step_0" / "samples.jsonl")]
    assert [r["text"] for r in before] == [ex.text for ex in data.load_dataset(str(val))[:2]]
    assert all(isinstance(r["transcript"], str) and 0 <= r["cer"] for r in before)
    assert os.path.exists(out / "checkpoints" / "step_2" / "config.json")
    assert _read_png(str(out / "metrics.png")).shape == (400, 640, 3)


def _read_png(path):
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        n, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        body = blob[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert (depth, color) == (8, 2) and len(raw) == h * (1 + 3 * w) and b"IEND" in chunks
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()  # filter type 0
    return rows[:, 1:].reshape(h, w, 3)


def test_plot_writes_a_valid_png_with_both_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val_cer": 0.7, "val_reward": 0.1}] + [{"step": s, "reward_mean": 0.2 + 0.04 * s}
                                                              for s in range(1, 11)]
    for r in rows[4::4]:
        r["val_cer"], r["val_reward"] = 0.6 - 0.04 * r["step"], 0.3 + 0.04 * r["step"]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot.plot(str(metrics))
    assert png == str(tmp_path / "metrics.png")
    img = _read_png(png)
    assert img.shape == (400, 640, 3)
    for name, rgb in plot.SERIES:  # each curve drew pixels of its colour
        assert (img == np.array(rgb, dtype=np.uint8)).all(axis=2).sum() > 100, name
    other = plot.plot(str(metrics), str(tmp_path / "x.png"), size=(300, 200))
    assert _read_png(other).shape == (200, 300, 3)


# ==================================================================================================
# GPU: the CUDA paths (each test skips without a CUDA device; `.ci/gpu-check` runs them)
# ==================================================================================================

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _greedy_agree(model, prompts, ours, theirs):
    """Token for token, or up to the first position where the top two logits of the reference's
    own forward tie in bf16 (gap < 2^-6 relative): from there either choice is right. Returns the
    number of positions compared."""
    for i, p in enumerate(prompts):
        a, b = ours[i].tolist(), theirs[i].tolist()
        n = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + b[:n]], device="cuda")).logits[0, -1].float()
        top2 = logits.topk(2).values
        assert (top2[0] - top2[1]).abs() <= top2[0].abs() * 2 ** -6 + 1e-3, (i, n, a, b)
    return len(prompts)


@cuda
def test_cuda_bf16_greedy_equals_hf_generate():
    tok = data.tiny_tokenizer(n_speech=64)
    model = models.tiny_llama(len(tok), seed=1).to("cuda", torch.bfloat16)
    prompts = [data.prompt_ids(tok, t) for t in ("Hello.", "A longer sentence, to pad the others.", "안녕")]
    ours = sample.generate(model, prompts, max_new_tokens=24, temperature=0).tokens
    theirs = torch.cat([hf_greedy(model, [p], 24).cpu() for p in prompts])  # one at a time: no HF padding
    assert _greedy_agree(model, prompts, ours.cpu(), theirs) == 3


@cuda
def test_cuda_compiled_decode_equals_eager():
    tok = data.tiny_tokenizer(n_speech=64)
    sv = data.speech_vocab(tok)
    model = models.tiny_llama(len(tok), seed=1).to("cuda", torch.bfloat16)
    prompts = [data.prompt_ids(tok, t) for t in COMPILE_TEXTS]
    kw = dict(max_new_tokens=32, temperature=0, stop_ids=(sv.end_id,), allowed_ids=sv.allowed_ids())
    eager = sample.generate(model, prompts, **kw)
    decoder = decode.Decoder(model, compile=True, max_len=256)
    compiled = sample.generate(model, prompts, decoder=decoder, **kw)
    again = sample.generate(model, prompts, decoder=decoder, **kw)  # the captured graph, replayed
    assert torch.equal(compiled.tokens, again.tokens)
    _greedy_agree(model, prompts, compiled.tokens.cpu(), eager.tokens.cpu())


@cuda
def test_cuda_tiny_preset_end_to_end(tmp_path):
    """The tiny preset with the policy and the Whisper worker both on cuda:0 (and --compile's
    default, on for CUDA)."""
    hist = grpo.train(_tiny(tmp_path, "--device", "auto", "--whisper-device", "cuda:0", "--steps", "2",
                            "--save-every", "2", "--val-every", "2"))
    assert [m["step"] for m in hist] == [1, 2]
    for m in hist:
        for key in ("reward_mean", "loss", "entropy", "grad_norm", "kl", "tokens_per_s"):
            assert math.isfinite(m[key]), (key, m)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step_2") is not None


@cuda
def test_cuda_whisper_fp16_scores_match_fp32():
    audios = [noise(2.0, 1), noise(5.0, 2, scale=0.3), (0.3 * np.sin(np.arange(48000) / 7.0)).astype(np.float32)]
    texts = ["hello there", "a longer sentence to score", "one two three"]
    kw = dict(language="en", max_transcript_tokens=8)
    fp32 = scoring.WhisperScorer("random-tiny", "cpu", **kw).score(audios, texts)
    fp16 = scoring.WhisperScorer("random-tiny", "cuda", **kw).score(audios, texts)
    for a, b in zip(fp32, fp16):
        assert a.error is None and b.error is None
        assert b.nll == pytest.approx(a.nll, rel=2e-2), (a, b)
