"""Tests of reward.py and whisper_worker.py: CPU, seeded, a tiny random Whisper unless the real one is asked for."""
import json
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import whisper
from whisper.tokenizer import get_tokenizer

import whisper_worker as ww
from reward import RewardConfig, char_error_rate, tts_reward

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
            assert result["error"] is None and result["nll"] == pytest.approx(expected, abs=1e-4)
            assert result["reward"] == pytest.approx(tts_reward(result["cer"], result["nll"]))
    one_by_one = ww.WhisperScorer(tiny_model, "cpu", "en", batch_size=1, max_transcript_tokens=6).score(audios, texts, languages)
    assert [r["transcript"] for r in one_by_one] == [r["transcript"] for r in results]


def test_bad_inputs_are_answered_not_fatal(tiny_model):
    good = [noise(1.0, 1), noise(2.0, 2)]
    long_clip = noise(31.0, 3)
    cases = [  # (audio, text, language, words expected in the error)
        (np.zeros(0, np.float32), "hello", None, "empty"),
        (np.zeros(16000, np.float32), "hello", None, "all zeros"),
        (np.where(np.arange(16000) == 7, np.nan, good[0][:16000]).astype(np.float32), "hello", None, "NaN"),
        ((good[0] * 32767).astype(np.int16), "hello", None, "int16"),
        (np.stack([good[0], good[0]]), "hello", None, "1-D"),
        (good[0], "   ", None, "text is empty"),
        (good[0], "?!", None, "normalization"),
        (good[0], "hello", "klingon", "unknown language"),
    ]
    audios = [good[0]] + [c[0] for c in cases] + [good[1], long_clip, good[1].astype(np.float64)]
    texts = ["a good clip"] + [c[1] for c in cases] + ["another good clip", "a long clip", "another good clip"]
    languages = [None] + [c[2] for c in cases] + [None, None, None]
    scorer = ww.WhisperScorer(tiny_model, "cpu", "en", batch_size=4, max_transcript_tokens=6)
    results = scorer.score(audios, texts, languages)
    for (_, _, _, words), result in zip(cases, results[1:-3]):
        assert result["reward"] == 0.0 and result["cer"] is None and result["nll"] is None
        assert words in result["error"], (words, result["error"])
    alone = scorer.score([good[0], good[1], long_clip[:480000]], ["a good clip", "another good clip", "a long clip"])
    for result, reference in zip([results[0], results[-3], results[-2]], alone):
        assert result["error"] is None and result["nll"] == pytest.approx(reference["nll"], abs=1e-4)
    assert results[-2]["truncated"] and not results[0]["truncated"]  # over 30 s: the first 30 s scored
    assert results[-1]["nll"] == pytest.approx(results[-3]["nll"], abs=1e-4)  # float64 is converted
    dims = whisper.model.ModelDimensions(**{**vars(tiny_model.dims), "n_vocab": 51864})  # an English-only vocabulary
    english_only = ww.WhisperScorer(whisper.model.Whisper(dims), "cpu", max_transcript_tokens=2)
    assert "English-only" in english_only.score([good[0]], ["hello"], ["ko"])[0]["error"]
    with pytest.raises(ValueError, match="match one to one"):
        scorer.score(good, ["only one text"])


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
            assert [r["transcript"] for r in answer] == [r["transcript"] for r in expected[k]]
            assert [r["nll"] for r in answer] == pytest.approx([r["nll"] for r in expected[k]], abs=1e-4)


def test_worker_survives_bad_clients(tiny_worker):
    audios, texts = [noise(2.0, i) for i in range(6)], [f"clip {i}" for i in range(6)]
    impatient = ww.WorkerClient(tiny_worker.connect_info(), request_timeout=0.01)
    with pytest.raises(TimeoutError, match="request_timeout=0.01"):
        impatient.score(audios, texts)
    impatient.close()
    address, _, folder, pid = tiny_worker.connect_info()
    with pytest.raises(multiprocessing.AuthenticationError):
        ww.WorkerClient((address, os.urandom(32), folder, pid))
    result = tiny_worker.score(audios[:1], texts[:1])
    assert result[0]["error"] is None and result[0]["nll"] > 0


def test_custom_reward_worker(reward_module):
    with ww.WhisperWorker({}, reward=reward_module, start_timeout=120, threads=1, request_timeout=120) as worker:
        sine = (0.3 * np.sin(np.arange(16000) / 5.0)).astype(np.float64)  # converted to float32 on the way
        results = worker.score([sine, np.full(100, 0.5, np.float32), noise(1.0, 1), np.full(10, 1.5, np.float32),
                                np.zeros(10, np.float32)], ["sine", "half", "nan", "too loud", "silent"])
        assert results[0]["reward"] == pytest.approx(float(np.abs(sine.astype(np.float32)).max()))
        assert results[1] == {"transcript": "", "cer": None, "nll": None, "reward": 0.5, "error": None, "truncated": False}
        assert results[2]["reward"] == 0.0 and "returned nan" in results[2]["error"]
        assert results[3]["reward"] == 0.0 and "returned 1.5, not a number in [0, 1]" in results[3]["error"]
        assert results[4]["reward"] == 0.0 and "all zeros" in results[4]["error"]
        with pytest.raises(ww.WorkerError, match="(?s)user_reward_mod.py.*ValueError: boom from the user's reward"):
            worker.score([noise(1.0, 0)], ["boom"])
        assert worker.score([np.full(10, 0.25, np.float32)], ["fine again"])[0]["reward"] == 0.25


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
    (tmp_path / "clips.jsonl").write_text('{"wav": "mono.wav", "text": "hello"}\n{"wav": "stereo.wav", "text": "hello"}\n')
    ww.main(["--model", "random-tiny", "--language", "en", "--jsonl", str(tmp_path / "clips.jsonl"),
             "--tau-n", "50"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [os.path.basename(r["wav"]) for r in rows] == ["mono.wav", "stereo.wav"]
    assert all(r["error"] is None and r["text"] == "hello" and r["nll"] > 0 for r in rows)
    assert rows[0]["reward"] == pytest.approx(tts_reward(rows[0]["cer"], rows[0]["nll"], tau_n=50))
    stereo_as_mono = ww.WhisperScorer("random-tiny", "cpu", "en").score([0.75 * mono], ["hello"])[0]
    assert rows[1]["nll"] == pytest.approx(stereo_as_mono["nll"], abs=1e-4)
    sf.write(tmp_path / "narrow.wav", mono, 8000)
    with pytest.raises(ValueError, match="narrow.wav: sample rate 8000 Hz"):
        ww.read_wav(str(tmp_path / "narrow.wav"))


def test_real_whisper_ranks_clean_above_noisy_above_silence():
    checkpoint, clips_file = os.path.join(ASSETS, "whisper-tiny.en.pt"), os.path.join(ASSETS, "speech", "clips.jsonl")
    if not (os.path.isfile(checkpoint) and os.path.isfile(clips_file)):
        pytest.skip(f"real-Whisper assets not found in {ASSETS} (set TEST_ASSETS to the folder with "
                    "whisper-tiny.en.pt and speech/clips.jsonl)")
    rows = [json.loads(line) for line in open(clips_file)]
    audios = [ww.read_wav(os.path.join(ASSETS, "speech", r["wav"])) for r in rows]
    silences = [i for i, r in enumerate(rows) if r["kind"] == "silence"]
    # All-zero silence is refused (reward 0); with -80 dBFS dither it goes through Whisper itself.
    dithered = [audios[i] + noise(len(audios[i]) / 16000, i, scale=1e-4) for i in silences]
    results = ww.WhisperScorer(checkpoint, "cpu", "en").score(audios + dithered, [r["text"] for r in rows] +
                                                               [rows[i]["text"] for i in silences])
    by_kind = {}
    for row, result in zip(rows + [{"kind": "dithered silence"}] * len(silences), results):
        by_kind.setdefault(row["kind"], []).append(result)
    mean = {kind: float(np.mean([r["reward"] for r in rs])) for kind, rs in by_kind.items()}
    print("\nmean reward", {kind: round(m, 4) for kind, m in mean.items()},
          "\nclean CER", [round(r["cer"], 3) for r in by_kind["clean"]], "NLL", [round(r["nll"], 3) for r in by_kind["clean"]],
          "\nnoisy CER", [round(r["cer"], 3) for r in by_kind["noisy"]], "NLL", [round(r["nll"], 3) for r in by_kind["noisy"]],
          "\ndithered silence", [(r["transcript"], round(r["nll"], 2)) for r in by_kind["dithered silence"]])
    assert mean["clean"] > mean["noisy"] > mean["silence"] == 0.0
    assert all("all zeros" in r["error"] for r in by_kind["silence"])
    assert all(c["reward"] > 10 * s["reward"] for c, s in zip(by_kind["clean"], by_kind["dithered silence"]))
    assert mean["noisy"] > mean["dithered silence"]
    assert np.mean([r["cer"] for r in by_kind["clean"]]) < 0.15
