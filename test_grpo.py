"""The llasa-grpo test suite: CPU, offline, seeded. Run with `python -m pytest -q test_grpo.py`.

Tiny random models stand in for the real ones (a tiny Llama with a LLASA-style tokenizer, a tiny
random Whisper, the tone codec, a small random XCodec2 decoder with a golden file). Tests that need
real speech recognition read Whisper tiny.en and spoken clips from $TEST_ASSETS (default
../shared/assets) and skip with a reason where it is absent.
"""
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
from reward import RewardConfig, char_error_rate, tts_reward

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
    vocab = data.speech_vocab(data.tiny_tokenizer())
    assert vocab.to_codes(r.tokens[0, :n_speech].tolist())  # every emitted token is a speech token


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
    from grpo import Config, Dist, Rollouts, update_policy
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
        from grpo import all_reduce_grads
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (700, 5, 1300, 1)]
        for p in params:
            p.grad = torch.full_like(p, float(rank + 1)) * torch.arange(p.numel())
        all_reduce_grads(params, Dist(rank=rank, world=world), bucket_numel=1000)
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
    from grpo import Config, Dist, update_policy
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
    roll = generate(model, prompts, max_new_tokens=12, temperature=0.8, stop_ids=(sv.end_id,),
                    allowed_ids=sv.allowed_ids(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = response_logprobs(model, prompts, roll.tokens, 0.8)
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
    from grpo import parse_config
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
    from grpo import save_checkpoint
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
        return [{"reward": self.value, "cer": None, "nll": None, "transcript": ""} for _ in audios]


def test_validation_in_training_sized_chunks(tmp_path):
    from grpo import Dist, Trainer
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
    from grpo import parse_config
    for flags in (["--temperature", "0"], ["--save-every", "0"], ["--micro-batch", "0"], ["--loss-agg", "sum"]):
        with pytest.raises(SystemExit):
            parse_config(["--preset", "tiny", *flags])


def test_nan_reward_stops_with_step(tmp_path):
    from grpo import Dist, Trainer
    cfg = _tiny(tmp_path, "--val-data", "")
    tr = Trainer(cfg, Dist(), torch.device("cpu"), _FakeScorer(float("nan")))
    with pytest.raises(FloatingPointError, match="step 0: non-finite reward"):
        tr.train_step(0)


def test_nan_gradient_skips_the_step():
    """A non-finite gradient raises before the optimizer step: the weights stay as they were."""
    import contextlib
    from grpo import Config, Dist, update_policy
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
    from grpo import Config, parse_config
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text
    assert text.count("(default:") >= len(dataclasses.fields(Config))
    cfg = parse_config(["--preset", "tiny", "--group-size", "8", "--no-scale-rewards"])
    assert cfg.group_size == 8 and cfg.scale_rewards is False and cfg.codec == "tone"
