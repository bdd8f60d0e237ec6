"""whisper_worker.py: the worker process and its clients (voice prompts and sim included), the CLI,
the scorer files' layout (speaker.py's too), and real Whisper tiny.en on spoken clips."""

import ast
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
import whisper

import ecapa
import prosody
import scorer as scoring
import speaker
import whisper_model
import whisper_worker as ww
from helpers import ASSETS, noise, read_jsonl
from reward import Score, tts_reward

# ---- WhisperWorker and WorkerClient --------------------------------------------------------------

TINY = {
    "model": "random-tiny",
    "device": "cpu",
    "language": "en",
    "batch_size": 3,
    "max_transcript_tokens": 6,
    "speaker_model": "random-tiny",
}


@pytest.fixture(scope="module")
def tiny_worker():
    with ww.WhisperWorker(TINY, start_timeout=120, threads=1, request_timeout=120) as worker:
        yield worker


def _clients(info, ask, n=2) -> dict:
    """`ask(client, k)` from n WorkerClients at once, each in its own thread: {k: its answer}."""
    answers = {}
    errors = []

    def client(k):
        try:
            c = ww.WorkerClient(info, request_timeout=120)
            answers[k] = ask(c, k)
            c.close()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return answers


def test_worker_serves_concurrent_clients(tiny_worker):
    requests = [
        ([noise(1.0 + i, 10 * k + i) for i in range(3)], [f"clip {k} {i}" for i in range(3)])
        for k in range(2)
    ]
    scorer = scoring.WhisperScorer(**TINY)
    expected = [scorer.score(audios, texts) for audios, texts in requests]
    info = pickle.loads(pickle.dumps(tiny_worker.connect_info()))  # as another rank receives it
    answers = _clients(info, lambda c, k: [c.score(*requests[k]) for _ in range(2)])
    for k in range(2):
        for answer in answers[k]:
            assert all(isinstance(r, Score) for r in answer)  # Scores pickle through the socket
            assert [r.transcript for r in answer] == [r.transcript for r in expected[k]]
            assert [r.nll for r in answer] == pytest.approx([r.nll for r in expected[k]], abs=1e-4)


def test_worker_answers_the_sims_of_the_scorer(tiny_worker):
    """Two clients with voice prompts (one per group, shared by its clips, and clips without),
    batched together by the worker: the sims of the in-process scorer, each client its own."""
    voices = [noise(1.0, 40), noise(1.3, 41), noise(0.7, 42)]
    requests = [
        (
            [noise(0.6 + 0.3 * i, 20 * k + i) for i in range(4)],
            [f"clip {k} {i}" for i in range(4)],
            [voices[k], voices[k], None, voices[2]],
        )
        for k in range(2)
    ]
    scorer = scoring.WhisperScorer(**TINY)
    expected = [scorer.score(audios, texts, prompts=prompts) for audios, texts, prompts in requests]
    assert all(isinstance(r.sim, float) for e in expected for r in e[:2] + e[3:])
    answers = _clients(
        tiny_worker.connect_info(), lambda c, k: c.score(*requests[k][:2], prompts=requests[k][2])
    )
    for k in range(2):
        assert [r.sim is None for r in answers[k]] == [False, False, True, False]
        assert [r.sim for r in answers[k]] == pytest.approx([r.sim for r in expected[k]], abs=1e-5)
    assert all(r.sim is None for r in tiny_worker.score(requests[0][0][:2], requests[0][1][:2]))
    a, b = voices[0], voices[0].copy()
    # a group's prompt goes once
    assert ww._share([a, a, None, b, a], 5) == ([a, b], [0, 0, -1, 1, 0])
    with pytest.raises(ValueError, match="1 prompts; they must match"):
        tiny_worker.score(requests[0][0][:2], requests[0][1][:2], prompts=[voices[0]])


def test_worker_survives_bad_clients(tiny_worker):
    audios = [noise(2.0, i) for i in range(6)]
    texts = [f"clip {i}" for i in range(6)]
    impatient = ww.WorkerClient(tiny_worker.connect_info(), request_timeout=0.01)
    with pytest.raises(TimeoutError, match=r"request_timeout=0\.01"):
        impatient.score(audios, texts)
    impatient.close()
    address, _, folder, pid = tiny_worker.connect_info()
    with pytest.raises(multiprocessing.AuthenticationError):
        ww.WorkerClient((address, os.urandom(32), folder, pid))
    result = tiny_worker.score(
        audios[:1] + [np.zeros(0, np.float32), noise(31.0, 0)], texts[:1] + ["silence", "long"]
    )
    assert result[0].error is None
    assert result[0].nll > 0
    # silence is scored
    assert result[1].error is None
    assert result[1].cer == 1.0
    assert result[1].transcript == ""
    assert result[2].too_long
    assert result[2].reward == 0.0
    assert "31.00 s is longer" in result[2].error


def test_custom_reward_worker(reward_module):
    with ww.WhisperWorker(
        {"speaker_model": "random-tiny"},
        reward=reward_module,
        start_timeout=120,
        threads=1,
        request_timeout=120,
    ) as worker:
        voice, clip = noise(1.0, 30), noise(1.0, 31)
        sv = speaker.load_speaker_model("random-tiny")
        [prompted] = worker.score([clip], ["a voice"], prompts=[voice])
        assert prompted.sim == pytest.approx(
            float(speaker.similarity(*sv.embed([clip, voice]))), abs=1e-5
        )
        # converted to float32 on the way
        sine = (0.3 * np.sin(np.arange(16000) / 5.0)).astype(np.float64)
        results = worker.score(
            [
                sine,
                np.full(100, 0.5, np.float32),
                noise(1.0, 1),
                np.full(10, 1.5, np.float32),
                np.zeros(10, np.float32),
                np.zeros(0, np.float32),
                np.full(31 * 16000, 0.5, np.float32),
            ],
            ["sine", "half", "nan", "too loud", "silent", "empty?", "long"],
        )
        assert results[0].reward == pytest.approx(float(np.abs(sine.astype(np.float32)).max()))
        assert results[1] == Score(
            reward=0.5,
            transcript="",
            cer=None,
            nll=None,
            error=None,
            too_long=False,
            **prosody.measure(np.full(100, 0.5, np.float32), "half"),
        )
        assert results[2].reward == 0.0
        assert "returned nan" in results[2].error
        assert results[3].reward == 0.0
        assert "returned 1.5, not a number in [0, 1]" in results[3].error
        # silence heard; no 30 s limit
        assert results[4:] == [
            Score(reward=0.0, **prosody.measure(np.zeros(10), "silent")),
            Score(reward=0.75, **prosody.measure(np.zeros(0), "empty?")),
            Score(reward=0.5, **prosody.measure(np.full(31 * 16000, 0.5), "long")),
        ]
        with pytest.raises(
            ww.WorkerError,
            match=r"(?s)user_reward_mod\.py.*ValueError: boom from the user's reward",
        ):
            worker.score([noise(1.0, 0)], ["boom"])
        assert worker.score([np.full(10, 0.25, np.float32)], ["fine again"])[0].reward == 0.25


def test_worker_start_errors(reward_module):
    with pytest.raises(ww.WorkerError, match="No module named 'no_such_reward_module'"):
        ww.WhisperWorker({}, reward="no_such_reward_module:f", start_timeout=120, threads=1).start()
    with pytest.raises(AttributeError, match="has no function 'missing'"):
        scoring.CustomRewardScorer(reward_module.replace("peak", "missing"))


def test_killed_worker_is_detected(reward_module):
    worker = ww.WhisperWorker(
        {}, reward=reward_module, start_timeout=120, threads=1, request_timeout=300
    ).start()
    outcomes = {}

    def call(name, score):
        start = time.monotonic()
        try:
            score([noise(1.0, 0)], ["sleep"])
        except Exception as e:
            outcomes[name] = (e, time.monotonic() - start)

    other = ww.WorkerClient(worker.connect_info(), request_timeout=300)
    threads = [
        threading.Thread(target=call, args=(name, f))
        for name, f in (("owner", worker.score), ("other", other.score))
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both requests in flight, the worker asleep in the user's function
    os.kill(worker.connect_info()[3], signal.SIGKILL)
    for t in threads:
        t.join(70)
    for name in ("owner", "other"):
        error, elapsed = outcomes[name]
        assert isinstance(error, ww.WorkerDiedError), (name, error, elapsed)
        assert elapsed < 60, (name, error, elapsed)
        assert "exit code -9 (killed by SIGKILL)" in str(error)
    with pytest.raises(ww.WorkerDiedError):
        ww.WorkerClient(worker.connect_info())
    worker.close()
    worker.close()  # idempotent


def test_worker_death_by_exception_carries_traceback(reward_module):
    with ww.WhisperWorker(
        {}, reward=reward_module, start_timeout=120, threads=1, request_timeout=120
    ) as worker:
        start = time.monotonic()
        with pytest.raises(ww.WorkerDiedError, match=r"(?s)exit code 3.*SystemExit: 3"):
            worker.score([noise(1.0, 0)], ["exit"])
        assert time.monotonic() - start < 60


# ---- the CLI, the file's layout, real Whisper ----------------------------------------------------


def test_cli_scores_a_jsonl(tmp_path, capsys):
    mono = noise(1.0, 5)
    sf.write(tmp_path / "mono.wav", mono, 16000)
    sf.write(tmp_path / "stereo.wav", np.stack([mono, 0.5 * mono], axis=1), 16000)
    sf.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), 16000)
    (tmp_path / "clips.jsonl").write_text(
        '{"wav": "mono.wav", "text": "hello"}\n'
        '{"wav": "stereo.wav", "text": "hello"}\n'
        '\n{"wav": "silent.wav", "text": "hello", "language": "english"}\n'
    )
    ww.main(
        [
            "--model",
            "random-tiny",
            "--language",
            "en",
            "--jsonl",
            str(tmp_path / "clips.jsonl"),
            "--tau-n",
            "50",
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [os.path.basename(r["wav"]) for r in rows] == ["mono.wav", "stereo.wav", "silent.wav"]
    assert all(
        list(r)
        == [
            "wav",
            "text",
            "reward",
            "transcript",
            "cer",
            "nll",
            "error",
            "too_long",
            "f0_std_semitones",
            "voiced_frac",
            "chars_per_s",
            "f0_median_hz",
            "sim",
            "dnsmos_sig",
            "dnsmos_bak",
            "dnsmos_ovrl",
            "dnsmos_p808",
            "language",
        ]
        for r in rows
    )
    assert all(r["sim"] is None for r in rows)  # no prompt_wav: no sim
    assert all(
        r["error"] is None and r["text"] == "hello" and r["nll"] > 0 and not r["too_long"]
        for r in rows
    )
    assert rows[0]["reward"] == pytest.approx(tts_reward(rows[0]["cer"], rows[0]["nll"], tau_n=50))
    assert rows[2]["cer"] == 1.0
    assert rows[2]["transcript"] == ""
    stereo_as_mono = scoring.WhisperScorer("random-tiny", "cpu", "en").score(
        [0.75 * mono], ["hello"]
    )[0]
    assert rows[1]["nll"] == pytest.approx(stereo_as_mono.nll, abs=1e-4)
    sf.write(tmp_path / "narrow.wav", mono, 8000)
    with pytest.raises(ValueError, match=r"narrow\.wav: sample rate 8000 Hz"):
        ww.read_wav(str(tmp_path / "narrow.wav"))
    for bad, why in [
        ('{"wav": "mono.wav"}', "expected string fields 'wav' and 'text'"),
        ('{"wav": "mono.wav", "text": "x", "language": 3}', "field 'language' must be a string"),
        ('{"wav": "mono.wav", "text": }', r"not valid JSON \(Expecting value at column 29\)"),
    ]:
        (tmp_path / "bad.jsonl").write_text('{"wav": "mono.wav", "text": "fine"}\n\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {why}"):
            ww.main(["--model", "random-tiny", "--jsonl", str(tmp_path / "bad.jsonl")])


def test_cli_prints_sim_for_rows_with_a_prompt_wav(tmp_path, capsys):
    voice, clip = noise(1.0, 60), noise(1.2, 61)
    for name, audio in [
        ("voice.wav", voice),
        ("clip.wav", clip),
        ("silent.wav", np.zeros(8000, np.float32)),
    ]:
        sf.write(tmp_path / name, audio, 16000, subtype="FLOAT")
    (tmp_path / "clips.jsonl").write_text(
        '{"wav": "clip.wav", "text": "hello", "prompt_wav": "voice.wav"}\n'
        '{"wav": "clip.wav", "text": "hello"}\n'
        '{"wav": "silent.wav", "text": "hello", "prompt_wav": "voice.wav"}\n'
    )
    ww.main(
        [
            "--model",
            "random-tiny",
            "--language",
            "en",
            "--speaker-model",
            "random-tiny",
            "--jsonl",
            str(tmp_path / "clips.jsonl"),
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(r)[:3] for r in rows] == [
        ["wav", "text", "prompt_wav"],
        ["wav", "text", "reward"],
        ["wav", "text", "prompt_wav"],
    ]
    sv = speaker.load_speaker_model("random-tiny")
    assert rows[0]["sim"] == pytest.approx(
        float(speaker.similarity(*sv.embed([clip, voice]))), abs=1e-5
    )
    # no prompt_wav; silence
    assert rows[1]["sim"] is None
    assert rows[2]["sim"] == 0.0
    (tmp_path / "missing.jsonl").write_text(
        '{"wav": "clip.wav", "text": "hi"}\n'
        '{"wav": "clip.wav", "text": "hi", "prompt_wav": "gone.wav"}\n'
    )
    with pytest.raises(
        FileNotFoundError, match=r"missing\.jsonl:2: prompt_wav .*gone\.wav not found"
    ):
        ww.main(["--model", "random-tiny", "--jsonl", str(tmp_path / "missing.jsonl")])


@pytest.mark.parametrize(
    "module, public",
    [
        (
            scoring,
            [
                "WhisperScorer",
                "teacher_forced_nll",
                "check_audio",
                "check_text",
                "check_prompts",
                "CustomRewardScorer",
            ],
        ),
        (
            whisper_model,
            [
                "model_languages",
                "language_code",
                "load_whisper",
                "windowed",
                "random_tiny_whisper",
                "half_except_layernorm",
            ],
        ),
        (
            ww,
            ["WhisperWorker", "WorkerClient", "WorkerError", "WorkerDiedError", "read_wav", "main"],
        ),
        (
            speaker,
            [
                "load_speaker_model",
                "similarity",
                "SpeakerModel",
                "SpeakerSimilarity",
                "FunctionSpeaker",
                "WavLMSpeaker",
                "wavlm_hidden_states",
                "XVectorHead",
                "xvector_speaker",
                "random_wavlm_sv",
                "load_seed_tts_sim",
            ],
        ),
        (ecapa, ["wavlm_from_unispeech", "ECAPAHead"]),
    ],
)
def test_scorer_and_worker_layout(module, public):
    """Public names first, in reading order; each private helper after its first public user."""
    with open(module.__file__, encoding="utf-8") as f:
        source = f.read()
    defs = [
        node for node in ast.parse(source).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    ]
    names = [node.name for node in defs]
    assert [n for n in names if n in public] == public
    for i, node in enumerate(defs):
        if node.name.startswith("_"):
            users = [
                j
                for j, user in enumerate(defs)
                if j != i
                and any(isinstance(n, ast.Name) and n.id == node.name for n in ast.walk(user))
            ]
            assert users, f"{node.name} is defined before the code that uses it"
            assert min(users) < i, f"{node.name} is defined before the code that uses it"
    assert max(map(len, source.splitlines())) < 110


def test_real_whisper_ranks_clean_above_noisy_above_silence():
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    clips_file = os.path.join(ASSETS, "speech", "clips.jsonl")
    if not (os.path.isfile(checkpoint) and os.path.isfile(clips_file)):
        pytest.skip(
            f"real-Whisper assets not found in {ASSETS} (set TEST_ASSETS to the folder with "
            "whisper-tiny.en.pt and speech/clips.jsonl)"
        )
    rows = read_jsonl(clips_file)
    audios = [ww.read_wav(os.path.join(ASSETS, "speech", r["wav"])) for r in rows]
    silences = [i for i, r in enumerate(rows) if r["kind"] == "silence"]
    # all-zero clips, as a collapsed policy answers
    assert all(not audios[i].any() for i in silences)
    # With -80 dBFS dither, silence goes through Whisper's greedy decode as well.
    dithered = [audios[i] + noise(len(audios[i]) / 16000, i, scale=1e-4) for i in silences]
    clean = [i for i, r in enumerate(rows) if r["kind"] == "clean"]
    long_clip = np.concatenate([audios[clean[k % len(clean)]] for k in range(2 * len(clean))])
    while len(long_clip) <= whisper.audio.N_SAMPLES:  # enough clean speech to pass 30 s
        long_clip = np.concatenate([long_clip, audios[clean[0]]])
    results = scoring.WhisperScorer(checkpoint, "cpu", "en").score(
        audios + dithered + [long_clip],
        [r["text"] for r in rows]
        + [rows[i]["text"] for i in silences]
        + [" ".join(rows[i]["text"] for i in clean)],
    )
    by_kind = {}
    for row, result in zip(
        rows + [{"kind": "dithered silence"}] * len(silences) + [{"kind": "long"}], results
    ):
        by_kind.setdefault(row["kind"], []).append(result)
    mean = {kind: float(np.mean([r.reward for r in rs])) for kind, rs in by_kind.items()}
    print(
        "\nmean reward",
        {kind: round(m, 4) for kind, m in mean.items()},
        "\nclean CER",
        [round(r.cer, 3) for r in by_kind["clean"]],
        "NLL",
        [round(r.nll, 3) for r in by_kind["clean"]],
        "\nnoisy CER",
        [round(r.cer, 3) for r in by_kind["noisy"]],
        "NLL",
        [round(r.nll, 3) for r in by_kind["noisy"]],
        "\nsilence NLL",
        [round(r.nll, 2) for r in by_kind["silence"]],
        "\ndithered silence",
        [(r.transcript, round(r.nll, 2)) for r in by_kind["dithered silence"]],
    )
    assert mean["clean"] > mean["noisy"] > mean["silence"]
    for r in by_kind["silence"]:  # scored, not refused: the policy's answer, CER 1
        assert r.error is None
        assert r.transcript == ""
        assert r.cer == 1.0
        assert math.isfinite(r.nll)
        assert r.reward < 0.05
    assert all(
        c.reward > 10 * s.reward for c, s in zip(by_kind["clean"], by_kind["dithered silence"])
    )
    assert mean["noisy"] > mean["dithered silence"]
    assert np.mean([r.cer for r in by_kind["clean"]]) < 0.15
    # clean speech, but past Whisper's window: refused, not judged on its first 30 s
    [long] = by_kind["long"]
    assert long.reward == 0.0
    assert long.too_long
    assert long.cer is None
    assert f"{len(long_clip) / 16000:.2f} s is longer than Whisper's 30 s window" in long.error
    # A 10 s window (faster on a CPU) hears the clean clips (3-5 s) as well, and silence as silence.
    short = scoring.WhisperScorer(checkpoint, "cpu", "en", window_s=10.0).score(
        [audios[i] for i in clean + silences], [rows[i]["text"] for i in clean + silences]
    )
    print("10 s window: clean CER", [round(r.cer, 3) for r in short[: len(clean)]])
    assert (
        np.mean([r.cer for r in short[: len(clean)]])
        < np.mean([r.cer for r in by_kind["clean"]]) + 0.05
    )
    assert all(r.cer == 1.0 and r.reward < 0.05 for r in short[len(clean) :])
