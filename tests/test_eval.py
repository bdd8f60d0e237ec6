"""eval.py: the seed-tts-eval WER/CER normalization, Seed-TTS lists, resume, bad rows, --compare,
--out's record, bad flags, --wavs with real Whisper tiny.en on the test assets, and --model end to
end (CPU)."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile

import eval as ev
import results as res
from helpers import ASSETS, REPO
from reward import seed_tts_normalize, table_error_rate

CLONE = os.path.join(REPO, "data", "clone")


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def fake_asr(tmp_path, monkeypatch):
    """A module:function ASR that says a fixed sentence and counts its calls."""
    (tmp_path / "fake_asr_mod.py").write_text(
        "CALLS = []\ndef transcribe(audio, language):\n    CALLS.append((len(audio), language))\n"
        "    return 'where is the station'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_asr_mod", None)
    import fake_asr_mod

    return fake_asr_mod


def test_normalization_follows_run_wer():
    assert seed_tts_normalize("Don't STOP, now!", "en") == "don't stop now"
    assert table_error_rate("I don't know.", "i don't know", "en") == ("wer", 0.0)
    assert table_error_rate("I don't know.", "I dont know", "en") == (
        "wer",
        pytest.approx(1 / 3),
    )  # one word
    assert table_error_rate("Hello, world!", "hello world", None) == ("wer", 0.0)
    assert seed_tts_normalize("你好，世界。", "zh") == "你 好 世 界"
    assert table_error_rate("你好，世界。", "你好世间", "zh") == ("cer", 0.25)
    assert table_error_rate("안녕 하세요", "안녕하세요", "ko") == (
        "cer",
        0.0,
    )  # spacing is not an error
    assert table_error_rate("안녕하세요", "안녕하세", "ko") == ("cer", 0.2)
    assert table_error_rate("Hello there", "", "en") == ("wer", 1.0)
    with pytest.raises(ValueError):
        table_error_rate("?!", "x", "en")


def _results(folder, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_compare_pairs_by_id(tmp_path, capsys):
    a = [dict(id=str(i), wer=0.5, sim=0.6, reward=0.3, error=None) for i in range(6)]
    b = [dict(id=str(i), wer=0.3, sim=0.6, reward=0.5, error=None) for i in reversed(range(6))]
    b.append(dict(id="only_b", wer=0.0, reward=1.0, error=None))
    _results(tmp_path / "a", a)
    _results(tmp_path / "b", b)
    out = {r["metric"]: r for r in ev.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])}
    assert out["wer"]["n"] == 6 and out["wer"]["diff"] == pytest.approx(-0.2)
    assert out["wer"]["ci_low"] == pytest.approx(-0.2) and out["wer"]["ci_high"] == pytest.approx(
        -0.2
    )
    assert out["wer"]["sign_p"] == pytest.approx(2 / 64)
    assert out["sim"]["diff"] == 0 and out["sim"]["sign_p"] == 1.0
    assert "| reward | 6 |" in capsys.readouterr().out


def _tone_wav(path, seconds=0.5, freq=220.0):
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


def test_seed_tts_list_wavs_resume_and_bad_rows(tmp_path, fake_asr, capsys):
    """A Seed-TTS list through eval --wavs: bad rows named with file:line; a rerun skips done
    rows."""
    shutil.copy(os.path.join(CLONE, "low.wav"), tmp_path / "low.wav")
    lst = tmp_path / "meta.lst"
    lst.write_text(
        "u1|A low voice says this.|low.wav|Where is the station?\n"
        "u2|A low voice says this.|low.wav|Please sit down.\n"
        "u3|A low voice says this.|low.wav|Nobody made this one.\n"
        "u4|A low voice says this.|low.wav|A broken file.\n"
    )
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    _tone_wav(wavs / "u1.wav")
    _tone_wav(wavs / "u2.wav")
    (wavs / "u4.wav").write_bytes(b"not a wav")
    argv = [
        "--wavs",
        str(wavs),
        "--data",
        str(lst),
        "--out",
        str(tmp_path / "out"),
        "--asr",
        "fake_asr_mod:transcribe",
        "--language",
        "en",
        "--speaker-model",
        "random-tiny",
    ]
    summary = ev.main(argv)
    assert len(fake_asr.CALLS) == 2 and all(lang == "en" for _, lang in fake_asr.CALLS)
    rows = {r["id"]: r for r in res.read_results(str(tmp_path / "out" / "results.jsonl"))}
    assert rows["u1"]["wer"] == 0.0 and rows["u2"]["wer"] == pytest.approx(4 / 3)
    assert rows["u1"]["sim"] is not None and rows["u1"]["reward"] is None  # no reward Whisper given
    assert rows["u3"]["error"].startswith("wav not found") and rows["u3"]["source"] == f"{lst}:3"
    assert "unreadable audio" in rows["u4"]["error"] and rows["u4"]["source"] == f"{lst}:4"
    assert summary["errors"] == 2 and summary["scored"] == 2 and summary["rows"] == 4
    assert summary["wer_mean"] == pytest.approx((0 + 4 / 3) / 2)  # mean of per-utterance rates
    assert f"{lst}:3" in capsys.readouterr().err
    again = ev.main(argv)  # resumed: nothing left to do, the same summary
    assert len(fake_asr.CALLS) == 2 and again["wer_mean"] == summary["wer_mean"]
    assert len(res.read_results(str(tmp_path / "out" / "results.jsonl"))) == 4


def test_unknown_language_is_a_bad_row(tmp_path, fake_asr):
    _tone_wav(tmp_path / "a.wav")
    _tone_wav(tmp_path / "b.wav")
    (tmp_path / "d.jsonl").write_text(
        '{"id": "a", "text": "hi there", "language": "klingon"}\n'
        '{"id": "b", "text": "你好", "language": "zh"}\n'
    )
    summary = ev.main(
        [
            "--wavs",
            str(tmp_path),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--asr",
            "fake_asr_mod:transcribe",
        ]
    )
    assert summary["errors"] == 1 and "klingon" in summary["bad_rows"][0]["error"]
    assert summary["bad_rows"][0]["source"].endswith("d.jsonl:1")
    assert summary["n_cer"] == 1 and summary["n_wer"] == 0


def test_missing_model_is_one_line(tmp_path, fake_asr):
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "hi", "language": "en"}\n')
    base = [
        "--wavs",
        str(tmp_path),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as e:
        ev.main(base + ["--asr", str(tmp_path / "no-such-whisper.pt")])
    assert (
        "--asr" in str(e.value)
        and "no-such-whisper.pt" in str(e.value)
        and "\n" not in str(e.value)
    )
    with pytest.raises(SystemExit) as e:
        ev.main(
            base
            + ["--asr", "fake_asr_mod:transcribe", "--speaker-model", str(tmp_path / "none.pth")]
        )
    assert "--speaker-model" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        ev.main(
            ["--model", str(tmp_path / "no-ckpt"), "--codec", "tone"]
            + base[2:]
            + ["--asr", "fake_asr_mod:transcribe"]
        )
    assert "--model" in str(e.value) and "no-ckpt" in str(e.value)
    with pytest.raises(SystemExit) as e:
        ev.main(
            ["--model", "tiny", "--codec", "xcodec2:/nonexistent"]
            + base[2:]
            + ["--asr", "fake_asr_mod:transcribe"]
        )
    assert "--codec" in str(e.value) and "/nonexistent" in str(e.value) and "\n" not in str(e.value)


def test_asr_download_failure_says_its_hint_once(tmp_path, monkeypatch):
    import scorer

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(scorer.whisper, "load_model", offline)
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "hi", "language": "en"}\n')
    with pytest.raises(SystemExit) as e:
        ev.main(
            [
                "--wavs",
                str(tmp_path),
                "--data",
                str(tmp_path / "d.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--asr",
                "tiny",
            ]
        )
    msg = str(e.value)
    assert msg.count("pass --asr PATH") == 1 and "point --asr" not in msg and "\n" not in msg


def test_model_tiny_end_to_end(tmp_path, fake_asr):
    """--model tiny --codec tone: synthesis (voice-cloned rows), scoring with the reward Whisper
    and a speaker model, the wavs and the summary."""
    summary = ev.main(
        [
            "--model",
            "tiny",
            "--codec",
            "tone",
            "--data",
            os.path.join(CLONE, "val.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--asr",
            "fake_asr_mod:transcribe",
            "--max-new-tokens",
            "24",
            "--reward-whisper",
            "random-tiny",
            "--speaker-model",
            "random-tiny",
            "--language",
            "en",
        ]
    )
    rows = res.read_results(str(tmp_path / "o" / "results.jsonl"))
    assert [r["id"] for r in rows] == ["v0", "v1"] and len(fake_asr.CALLS) == 2
    for r in rows:
        assert r["error"] is None and r["wer"] == (0.0 if r["id"] == "v0" else pytest.approx(4 / 3))
        assert 0 <= r["reward"] <= 1 and -1 <= r["sim"] <= 1 and r["rtf"] > 0
        assert r["duration_s"] > 0 and os.path.isfile(tmp_path / "o" / "wavs" / f"{r['id']}.wav")
    assert summary["scored"] == 2 and summary["reward_mean"] is not None and summary["rtf_mean"] > 0
    assert read_json(tmp_path / "o" / "summary.json")["wer_mean"] == pytest.approx(2 / 3)
    assert summary["truncated"] == 0 and not any(r["truncated"] for r in rows)  # both stopped


def test_truncated_clips_are_counted_and_scored(tmp_path, fake_asr, capsys):
    """--max-new-tokens 8 stops both clips before their stop token: each row is truncated,
    counted in the summary and the table, and scored (its WER in the mean); v1's WER 4/3 is an
    outlier."""
    argv = ["--model", "tiny", "--codec", "tone", "--data", os.path.join(CLONE, "val.jsonl")]
    argv += ["--out", str(tmp_path / "o"), "--asr", "fake_asr_mod:transcribe"]
    summary = ev.main(argv + ["--max-new-tokens", "8", "--language", "en"])
    rows = _transcripts(tmp_path / "o")
    assert all(r["truncated"] and r["error"] is None for r in rows.values())
    assert rows["v0"]["wer"] == 0.0 and rows["v1"]["wer"] == pytest.approx(4 / 3)
    assert summary["truncated"] == 2 and summary["n_wer"] == 2 and summary["errors"] == 0
    assert summary["wer_mean"] == pytest.approx(2 / 3)
    assert summary["wer_outliers"] == 1 and summary["wer_mean_without_outliers"] == 0.0
    printed = capsys.readouterr().out
    assert "| truncated (no stop token) | 2 |" in printed
    assert "| rows with WER > 0.5 (outliers) | 1 |" in printed


def test_model_top_k_one_is_greedy(tmp_path, fake_asr):
    """--top-k reaches sampling: at --temperature 1, --top-k 1 draws the greedy clips. By default
    eval samples (LLASA's temperature 0.8), the same clips for the same --seed."""
    base = [
        "--model",
        "tiny",
        "--codec",
        "tone",
        "--data",
        os.path.join(CLONE, "val.jsonl"),
        "--asr",
        "fake_asr_mod:transcribe",
        "--max-new-tokens",
        "24",
        "--language",
        "en",
    ]
    ev.main(base + ["--out", str(tmp_path / "greedy"), "--temperature", "0"])
    ev.main(
        base + ["--out", str(tmp_path / "k1"), "--temperature", "1", "--top-k", "1", "--seed", "5"]
    )
    for i in ("v0", "v1"):
        greedy, k1 = (
            soundfile.read(tmp_path / d / "wavs" / f"{i}.wav")[0] for d in ("greedy", "k1")
        )
        assert greedy.shape == k1.shape and np.array_equal(greedy, k1)
    ev.main(base + ["--out", str(tmp_path / "sampled")])  # the default: LLASA's T 0.8, seeded
    ev.main(base + ["--out", str(tmp_path / "again")])
    clips = {
        d: [soundfile.read(tmp_path / d / "wavs" / f"{i}.wav")[0] for i in ("v0", "v1")]
        for d in ("greedy", "sampled", "again")
    }
    assert all(np.array_equal(a, b) for a, b in zip(clips["sampled"], clips["again"]))
    assert not all(np.array_equal(a, b) for a, b in zip(clips["sampled"], clips["greedy"]))


def test_wavs_with_real_whisper_tiny(tmp_path):
    """The test assets with tiny.en: clean clips score a lower WER than the same clips given the
    wrong sentence, and silence is WER 1."""
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if not os.path.isfile(checkpoint):
        pytest.skip(f"{checkpoint} not found (set TEST_ASSETS to the shared assets folder)")
    speech = os.path.join(ASSETS, "speech")
    with open(os.path.join(speech, "clips.jsonl")) as f:
        clips = [json.loads(line) for line in f]
    clean = [c for c in clips if c["kind"] == "clean"][:3]
    rows = []
    for i, c in enumerate(clean):
        shutil.copy(os.path.join(speech, c["wav"]), tmp_path / f"right{i}.wav")
        shutil.copy(os.path.join(speech, c["wav"]), tmp_path / f"wrong{i}.wav")
        rows += [
            dict(id=f"right{i}", text=c["text"]),
            dict(id=f"wrong{i}", text=clean[(i + 1) % 3]["text"]),
        ]
    shutil.copy(os.path.join(speech, "silence_00.wav"), tmp_path / "silence.wav")
    rows.append(dict(id="silence", text=clean[0]["text"]))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = ev.main(
        [
            "--wavs",
            str(tmp_path),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--asr",
            checkpoint,
        ]
    )
    got = {r["id"]: r for r in res.read_results(str(tmp_path / "o" / "results.jsonl"))}
    right = [got[f"right{i}"]["wer"] for i in range(3)]
    wrong = [got[f"wrong{i}"]["wer"] for i in range(3)]
    assert max(right) < min(wrong) and np.mean(right) < 0.4 and np.mean(wrong) > 0.6
    assert all(got[f"right{i}"]["reward"] > got[f"wrong{i}"]["reward"] for i in range(3))
    assert got["silence"]["wer"] == 1.0 and got["silence"]["silent"] and summary["silent"] == 1
    assert summary["errors"] == 0 and not math.isnan(summary["chars_per_s_median"])


def _speech(name):
    """A shared spoken clip, float32 [S] at 16 kHz; skips where the assets are absent."""
    path = os.path.join(ASSETS, "speech", name)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found (set TEST_ASSETS to the shared assets folder)")
    return soundfile.read(path, dtype="float32")[0]


def test_windows_cut_a_clip_into_whisper_windows():
    parts = ev.windows(np.arange(36 * 16000, dtype=np.float32))
    assert [len(p) for p in parts] == [30 * 16000, 6 * 16000] and parts[1][0] == 30 * 16000
    assert [len(p) for p in ev.windows(np.zeros(30 * 16000, np.float32))] == [30 * 16000]
    assert ev.windows(np.zeros(0, np.float32)) == []


def test_clip_over_30_s_is_transcribed_in_windows_and_counted(tmp_path):
    """A 36 s clip with tiny.en: its transcript is its two 30 s windows' transcripts, each decoded
    as that window alone would be (rows head and tail are those windows), joined by a space; it is
    no bad row, its reward is 0 (too_long, the reward's rule) and its WER is in the mean."""
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if not os.path.isfile(checkpoint):
        pytest.skip(f"{checkpoint} not found (set TEST_ASSETS to the shared assets folder)")
    with open(os.path.join(ASSETS, "speech", "clips.jsonl")) as f:
        clean = [json.loads(line) for line in f if '"clean"' in line]
    order = [0, 1, 2, 3, 0, 1]  # 26.2 s of speech with gaps, then silence to 30 s: no word cut
    gap = np.zeros(4800, np.float32)  # 0.3 s
    pieces = []
    for i in order:
        pieces += [_speech(clean[i]["wav"]), gap]
    head = np.concatenate(pieces)
    head = np.pad(head, (0, 30 * 16000 - len(head)))
    tail = np.pad(_speech(clean[2]["wav"]), (0, 6 * 16000 - len(_speech(clean[2]["wav"]))))
    text = " ".join(clean[i]["text"] for i in order + [2])
    for name, audio in (("long", np.concatenate([head, tail])), ("head", head), ("tail", tail)):
        soundfile.write(tmp_path / f"{name}.wav", audio, 16000, subtype="FLOAT")
    rows = [dict(id=name, text=text) for name in ("long", "head", "tail")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    argv = ["--wavs", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--out", str(out)]
    summary = ev.main(argv + ["--asr", checkpoint])
    got = _transcripts(out)
    long = got["long"]
    assert long["duration_s"] == 36 and long["too_long"] and long["error"] is None
    assert long["transcript"] == got["head"]["transcript"] + " " + got["tail"]["transcript"]
    assert long["wer"] < 0.3 and long["reward"] == 0.0 and long["nll"] is None
    assert long["chars_per_s"] > 0 and long["f0_median_hz"] > 0  # prosody measured all the same
    assert summary["errors"] == 0 and summary["too_long"] == 1 and summary["n_wer"] == 3
    assert summary["wer_mean"] == pytest.approx(np.mean([r["wer"] for r in got.values()]))


DNSMOS_KEYS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")


def test_quality_dnsmos_rows_summary_table_compare_and_record(tmp_path, fake_asr, capsys):
    """--quality dnsmos: four DNSMOS values per row, their means in the summary and the table,
    --compare's paired differences (clean A, noisy B: B rates lower), and --quality in run.json
    (a rerun without it is refused naming it)."""
    import importlib.util

    for package in ("speechmos", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"--quality dnsmos needs {package}")
    (tmp_path / "d.jsonl").write_text(
        '{"id": "a", "text": "where is the station"}\n{"id": "b", "text": "where is the station"}\n'
    )
    for kind in ("clean", "noisy"):
        (tmp_path / kind).mkdir()
        for name, number in (("a", "00"), ("b", "02")):
            audio = _speech(f"{kind}_{number}.wav")
            soundfile.write(tmp_path / kind / f"{name}.wav", audio, 16000, subtype="FLOAT")
    base = ["--data", str(tmp_path / "d.jsonl"), "--asr", "fake_asr_mod:transcribe"]
    base += ["--language", "en", "--quality", "dnsmos"]
    for kind in ("clean", "noisy"):
        ev.main(["--wavs", str(tmp_path / kind), "--out", str(tmp_path / kind / "o")] + base)
    clean = _transcripts(tmp_path / "clean" / "o")
    noisy = _transcripts(tmp_path / "noisy" / "o")
    for row in [*clean.values(), *noisy.values()]:
        assert all(1 <= row[k] <= 5 for k in DNSMOS_KEYS) and row["error"] is None
    assert all(clean[i]["dnsmos_ovrl"] > noisy[i]["dnsmos_ovrl"] + 0.5 for i in "ab")
    summary = read_json(tmp_path / "clean" / "o" / "summary.json")
    for k in DNSMOS_KEYS:
        assert summary[f"{k}_mean"] == pytest.approx(np.mean([clean[i][k] for i in "ab"]))
    assert "| DNSMOS OVRL (mean) |" in capsys.readouterr().out
    compare = ["--compare", str(tmp_path / "clean" / "o"), str(tmp_path / "noisy" / "o")]
    diffs = {r["metric"]: r for r in ev.main(compare)}
    assert set(DNSMOS_KEYS) <= set(diffs) and diffs["dnsmos_ovrl"]["n"] == 2
    assert diffs["dnsmos_ovrl"]["diff"] < -0.5
    assert read_json(tmp_path / "clean" / "o" / "run.json")["quality"] == "dnsmos"
    with pytest.raises(SystemExit) as e:
        ev.main(
            ["--wavs", str(tmp_path / "clean"), "--out", str(tmp_path / "clean" / "o")] + base[:-2]
        )
    assert e.value.code == 2 and "--quality was 'dnsmos' there (run.json), unset now" in str(
        e.value
    )


@pytest.mark.parametrize("package", ["speechmos", "onnxruntime"])
def test_quality_dnsmos_without_its_packages_is_one_line(tmp_path, monkeypatch, package):
    """Without speechmos or onnxruntime, --quality dnsmos stops before any model loads (the --asr
    named does not exist) with dnsmos.py's one line naming the pip command, exit status 2."""
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "hi"}\n')
    argv = ["--wavs", str(tmp_path), "--data", str(tmp_path / "d.jsonl")]
    argv += ["--out", str(tmp_path / "o"), "--asr", str(tmp_path / "no-whisper.pt")]
    with pytest.raises(SystemExit) as e:
        ev.main(argv + ["--quality", "dnsmos", "--language", "en"])
    message = (
        f"eval.py: --quality dnsmos: DNSMOS needs {package}: pip install speechmos onnxruntime"
    )
    assert e.value.code == 2 and str(e.value) == message
    assert not os.path.exists(tmp_path / "o")


def test_training_validation_uses_the_table_metric():
    """outputs.table_metrics (grpo's val_table_wer / val_table_cer) is reward.table_error_rate over
    sample_and_score's rank order; errors and transcript-less scores are left out."""
    from data import Example
    from outputs import table_metrics
    from reward import Score

    examples = [
        Example("I don't know.", "0", language="en"),
        Example("你好世界", "1", language="Chinese"),
        Example("Hello there.", "2"),
        Example("Bad one.", "3"),
    ]
    # world 2: rank 0 held examples 0 and 2, rank 1 examples 1 and 3 -> scores in order 0, 2, 1, 3
    scores = [
        Score(0.5, "i don't know", cer=0.0),
        Score(0.5, "hello", cer=0.1),
        Score(0.5, "你好世间", cer=0.25),
        Score(0.0, error="refused"),
    ]
    got = table_metrics(scores, examples, world=2, language="")
    assert got == {
        "val_table_wer": pytest.approx((0 + 0.5) / 2),
        "val_table_cer": pytest.approx(0.25),
    }
    assert (
        table_metrics([Score(0.7)], examples[:1], world=1) == {}
    )  # a custom reward: no transcript


def test_torchrun_two_ranks_split_merge_and_world_changes(tmp_path, monkeypatch):
    """torchrun --nproc_per_node=2: rank r scores rows r::2; rank 0 folds the ranks' files into
    results.jsonl in data order, deletes them and writes the summary. World 2 -> 1 -> 2: a failure
    of the first run, fixed by the second, stays fixed after the third (no stale rank file)."""
    import subprocess

    (tmp_path / "rank_asr_mod.py").write_text(
        "import os\ndef transcribe(audio, language):\n"
        "    with open(os.environ['ASR_LOG'], 'a') as f:\n"
        "        f.write(os.environ.get('RANK', '-') + ' ' + str(len(audio)) + '\\n')\n"
        "    return 'where is the station'\n"
    )
    for i in (0, 1, 2, 4):  # r3.wav missing at first: rank 1's row fails
        _tone_wav(tmp_path / f"r{i}.wav", seconds=0.1 * (i + 1))  # 1600 * (i + 1) samples
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps(dict(id=f"r{i}", text="where is the station")) + "\n" for i in range(5))
    )
    out = tmp_path / "o"
    argv = [
        "--wavs",
        str(tmp_path),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(out),
        "--asr",
        "rank_asr_mod:transcribe",
        "--batch-size",
        "2",
        "--language",
        "en",
    ]
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("ASR_LOG", str(log))

    def torchrun():
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(REPO, "eval.py"),
        ] + argv
        path = os.pathsep.join([str(tmp_path), REPO])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not [n for n in os.listdir(out) if n.startswith("results.rank")]  # folded, deleted
        return proc

    proc = torchrun()
    calls = sorted(tuple(int(x) for x in line.split()) for line in log.read_text().splitlines())
    assert calls == [(0, 1600), (0, 4800), (0, 8000), (1, 3200)]  # rank 0: r0 r2 r4; rank 1: r1
    rows = res.read_results(str(out / "results.jsonl"))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    assert rows[3]["error"].startswith("wav not found")
    assert read_json(out / "summary.json")["scored"] == 4 and "| rows | 5 |" in proc.stdout
    _tone_wav(tmp_path / "r3.wav", seconds=0.4)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ev.main(argv)["errors"] == 0  # world 1: r3 retried, fixed
    assert log.read_text().splitlines()[-1] == "- 6400"
    torchrun()  # world 2 again: nothing left to do, and r3 stays fixed
    rows = res.read_results(str(out / "results.jsonl"))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)] and rows[3]["error"] is None
    assert read_json(out / "summary.json")["errors"] == 0
    assert len(log.read_text().splitlines()) == 5


def test_text_with_nothing_to_rate_is_a_bad_row_alone(tmp_path, fake_asr):
    _tone_wav(tmp_path / "a.wav")
    _tone_wav(tmp_path / "b.wav")
    (tmp_path / "d.jsonl").write_text(
        '{"id": "a", "text": "?!"}\n{"id": "b", "text": "Where is the station?"}\n'
    )
    summary = ev.main(
        [
            "--wavs",
            str(tmp_path),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--asr",
            "fake_asr_mod:transcribe",
            "--language",
            "en",
        ]
    )
    assert (
        summary["errors"] == 1
        and summary["bad_rows"][0]["id"] == "a"
        and summary["wer_mean"] == 0.0
    )


def test_row_without_language_stops_before_any_work(tmp_path, fake_asr):
    """A Seed-TTS list has no language: without --language eval stops at its first row, before
    loading any model; an English-only Whisper (name ending .en) implies en."""
    _tone_wav(tmp_path / "u1.wav")
    lst = tmp_path / "meta.lst"
    lst.write_text("\nu1|A prompt.|u1.wav|你好世界\n")
    base = ["--wavs", str(tmp_path), "--data", str(lst), "--out", str(tmp_path / "o")]
    for asr in (
        "fake_asr_mod:transcribe",
        str(tmp_path / "large-v3.pt"),
    ):  # the missing .pt is never loaded
        with pytest.raises(SystemExit) as e:
            ev.main(base + ["--asr", asr])
        msg = str(e.value)
        assert f"{lst}:2" in msg and "'u1'" in msg and "--language" in msg and "\n" not in msg
    assert fake_asr.CALLS == [] and not os.path.exists(tmp_path / "o" / "results.jsonl")
    with pytest.raises(
        SystemExit
    ) as e:  # .en: en implied, so the next stop is loading that Whisper
        ev.main(base + ["--asr", str(tmp_path / "whisper-tiny.en.pt")])
    assert "cannot load --asr" in str(e.value)
    assert (
        ev.english_only("tiny.en")
        and ev.english_only("/x/whisper-tiny.en.pt")
        and not ev.english_only("tiny")
    )
    assert ev.main(base + ["--asr", "fake_asr_mod:transcribe", "--language", "zh"])["n_cer"] == 1


def _transcripts(out):
    return {r["id"]: r for r in res.read_results(str(out / "results.jsonl"))}


def test_resume_retries_failed_rows_and_keeps_the_newest(tmp_path, fake_asr):
    _tone_wav(tmp_path / "a.wav")
    (tmp_path / "d.jsonl").write_text(
        '{"id": "a", "text": "where is the station"}\n{"id": "b", "text": "where is the station"}\n'
    )
    argv = [
        "--wavs",
        str(tmp_path),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--asr",
        "fake_asr_mod:transcribe",
        "--language",
        "en",
    ]
    assert ev.main(argv)["errors"] == 1 and len(fake_asr.CALLS) == 1  # b.wav missing
    _tone_wav(tmp_path / "b.wav", seconds=0.25)
    again = ev.main(argv)
    assert fake_asr.CALLS[1:] == [(4000, "en")]  # only b retried, a kept
    assert again["errors"] == 0 and again["scored"] == 2
    rows = res.read_results(str(tmp_path / "o" / "results.jsonl"))
    assert (
        [r["id"] for r in rows] == ["a", "b"] and rows[1]["error"] is None and rows[1]["wer"] == 0.0
    )


def test_resume_after_a_torn_last_line(tmp_path, fake_asr, capsys):
    for name in "abc":
        _tone_wav(tmp_path / f"{name}.wav")
    (tmp_path / "d.jsonl").write_text(
        "".join(f'{{"id": "{n}", "text": "where is the station"}}\n' for n in "abc")
    )
    argv = [
        "--wavs",
        str(tmp_path),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--asr",
        "fake_asr_mod:transcribe",
        "--language",
        "en",
    ]
    ev.main(argv)
    path = tmp_path / "o" / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:25])  # killed while writing row c
    capsys.readouterr()
    summary = ev.main(argv)
    assert f"{path}:3: dropped an unfinished last line" in capsys.readouterr().err
    assert len(fake_asr.CALLS) == 4 and summary["scored"] == 3  # only c redone
    assert [r["id"] for r in res.read_results(str(path))] == ["a", "b", "c"]
    path.write_text("{broken\n" + "".join(lines[1:]))  # a bad line elsewhere: an error naming it
    with pytest.raises(SystemExit, match=f"{path}:1: not a results row"):
        ev.main(argv)


def test_bad_prompt_audio_is_a_bad_row(tmp_path, fake_asr):
    """A missing or unreadable prompt_wav is that row's error (file:line), not a stop for the
    data."""
    shutil.copy(os.path.join(CLONE, "low.wav"), tmp_path / "low.wav")
    (tmp_path / "broken.wav").write_bytes(b"not a wav")
    for name in "abc":
        _tone_wav(tmp_path / f"{name}.wav")
    (tmp_path / "d.jsonl").write_text(
        "".join(
            json.dumps(
                dict(
                    id=n,
                    text="where is the station",
                    language="en",
                    prompt_wav=w,
                    prompt_text="A voice.",
                )
            )
            + "\n"
            for n, w in (("a", "low.wav"), ("b", "missing.wav"), ("c", "broken.wav"))
        )
    )
    summary = ev.main(
        [
            "--wavs",
            str(tmp_path),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--asr",
            "fake_asr_mod:transcribe",
        ]
    )
    rows = _transcripts(tmp_path / "o")
    assert rows["a"]["error"] is None and rows["a"]["wer"] == 0.0 and len(fake_asr.CALLS) == 1
    assert rows["b"]["error"].startswith("prompt audio not found") and rows["b"]["source"].endswith(
        "d.jsonl:2"
    )
    assert "cannot be read" in rows["c"]["error"] and rows["c"]["source"].endswith("d.jsonl:3")
    assert summary["errors"] == 2 and summary["scored"] == 1


def test_asr_exception_is_that_rows_error(tmp_path, monkeypatch):
    (tmp_path / "flaky_asr_mod.py").write_text(
        "def transcribe(audio, language):\n"
        "    if len(audio) > 10000:\n"
        "        raise RuntimeError('boom')\n"
        "    return 'where is the station'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _tone_wav(tmp_path / "a.wav", seconds=0.5)
    _tone_wav(tmp_path / "b.wav", seconds=1.0)
    (tmp_path / "d.jsonl").write_text(
        '{"id": "a", "text": "where is the station"}\n{"id": "b", "text": "where is the station"}\n'
    )
    summary = ev.main(
        [
            "--wavs",
            str(tmp_path),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--asr",
            "flaky_asr_mod:transcribe",
            "--language",
            "en",
        ]
    )
    rows = _transcripts(tmp_path / "o")
    assert (
        rows["a"]["wer"] == 0.0
        and rows["b"]["error"] == "--asr flaky_asr_mod:transcribe: RuntimeError: boom"
    )
    assert summary["errors"] == 1 and summary["scored"] == 1


def test_bad_prompt_with_a_speaker_model_is_a_bad_row_alone(tmp_path, fake_asr):
    """With a speaker model (SIM reads the prompts), a missing, unreadable or NaN prompt_wav is
    that row's error; the batch's good row is scored, and a rerun retries only the bad ones."""
    shutil.copy(os.path.join(CLONE, "low.wav"), tmp_path / "low.wav")
    (tmp_path / "broken.wav").write_bytes(b"not a wav")
    soundfile.write(tmp_path / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    prompts = {"a": "low.wav", "b": "missing.wav", "c": "broken.wav", "d": "nan.wav"}
    for name in prompts:
        _tone_wav(tmp_path / f"{name}.wav")
    rows = [
        dict(id=n, text="where is the station", language="en", prompt_wav=w, prompt_text="A voice.")
        for n, w in prompts.items()
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--wavs",
        str(tmp_path),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--asr",
        "fake_asr_mod:transcribe",
        "--speaker-model",
        "random-tiny",
        "--batch-size",
        "4",
    ]
    summary = ev.main(argv)
    rows = _transcripts(tmp_path / "o")
    assert rows["a"]["error"] is None and -1 <= rows["a"]["sim"] <= 1 and len(fake_asr.CALLS) == 1
    assert rows["b"]["error"].startswith("prompt audio not found")
    assert "cannot be read" in rows["c"]["error"] and "NaN" in rows["d"]["error"]
    assert summary["errors"] == 3 and summary["scored"] == 1
    assert ev.main(argv)["errors"] == 3 and len(fake_asr.CALLS) == 1  # the rerun runs too


def test_rerun_into_another_runs_out_is_refused(tmp_path, fake_asr, capsys):
    """--out records what produced it (run.json); a rerun with another --wavs, speaker model or
    sampling knob is refused in one line naming the flag (exit 2), before anything is scored."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _tone_wav(tmp_path / d / "u.wav")
    (tmp_path / "d.jsonl").write_text('{"id": "u", "text": "where is the station"}\n')
    out = tmp_path / "o"
    base = [
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(out),
        "--asr",
        "fake_asr_mod:transcribe",
        "--language",
        "en",
    ]
    assert ev.main(["--wavs", str(tmp_path / "a")] + base)["scored"] == 1
    record = read_json(out / "run.json")
    assert record["wavs"] == str(tmp_path / "a") and record["asr"] == "fake_asr_mod:transcribe"
    other_speaker = ["--wavs", str(tmp_path / "a"), "--speaker-model", "random-tiny"]
    other_wavs = ["--wavs", str(tmp_path / "b")]
    for extra, flag in ((other_wavs, "--wavs"), (other_speaker, "--speaker-model")):
        with pytest.raises(SystemExit) as e:
            ev.main(extra + base)
        assert e.value.code == 2 and f"holds the results of another run: {flag} was" in str(e.value)
        assert "\n" not in str(e.value)
    said = f"--wavs was '{tmp_path / 'a'}' there (run.json), '{tmp_path / 'b'}' now"
    assert said in capsys.readouterr().err
    assert len(fake_asr.CALLS) == 1  # nothing scored by the refused runs
    assert ev.main(["--wavs", str(tmp_path / "a")] + base)["scored"] == 1  # the same flags: resumed
    os.remove(out / "run.json")  # results whose origin is unknown
    with pytest.raises(SystemExit, match=r"holds results but no run\.json") as e:
        ev.main(["--wavs", str(tmp_path / "a")] + base)
    model = [
        "--model",
        "tiny",
        "--codec",
        "tone",
        "--data",
        os.path.join(CLONE, "val.jsonl"),
        "--out",
        str(tmp_path / "m"),
        "--asr",
        "fake_asr_mod:transcribe",
        "--max-new-tokens",
        "8",
        "--language",
        "en",
    ]
    ev.main(model)
    with pytest.raises(SystemExit) as e:
        ev.main(model + ["--temperature", "0"])
    assert e.value.code == 2 and "--temperature was 0.8 there (run.json), 0.0 now" in str(e.value)


def test_rerun_on_part_of_the_data_keeps_the_other_rows(tmp_path, fake_asr):
    for name in "abc":
        _tone_wav(tmp_path / f"{name}.wav")
    row = '{{"id": "{}", "text": "where is the station"}}\n'
    (tmp_path / "all.jsonl").write_text("".join(row.format(n) for n in "abc"))
    (tmp_path / "part.jsonl").write_text(row.format("b"))
    base = [
        "--wavs",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--asr",
        "fake_asr_mod:transcribe",
        "--language",
        "en",
    ]
    ev.main(base + ["--data", str(tmp_path / "all.jsonl")])
    summary = ev.main(base + ["--data", str(tmp_path / "part.jsonl")])
    kept = res.read_results(str(tmp_path / "o" / "results.jsonl"))
    assert [r["id"] for r in kept] == ["a", "b", "c"]
    assert summary["rows"] == 1 and summary["scored"] == 1 and summary["other_rows"] == 2
    assert "other ids' rows kept in results.jsonl" in res.table(summary)
    assert len(fake_asr.CALLS) == 3  # b was done already


def test_duplicate_ids_are_refused_naming_both_lines(tmp_path, fake_asr):
    _tone_wav(tmp_path / "a.wav")
    data_file = tmp_path / "d.jsonl"
    data_file.write_text(
        '{"id": "a", "text": "where is the station"}\n{"id": "b", "text": "hi"}\n'
        '{"id": "a", "text": "please sit down"}\n'
    )
    with pytest.raises(SystemExit) as e:
        ev.main(
            [
                "--wavs",
                str(tmp_path),
                "--data",
                str(data_file),
                "--out",
                str(tmp_path / "o"),
                "--asr",
                "fake_asr_mod:transcribe",
                "--language",
                "en",
            ]
        )
    assert e.value.code == 2 and "\n" not in str(e.value)
    assert f"id 'a' appears twice, {data_file}:1 and {data_file}:3" in str(e.value)
    assert fake_asr.CALLS == [] and not os.path.exists(tmp_path / "o")


def test_default_sampling_is_llasas(capsys):
    args = ev.parse_args(["--model", "tiny", "--data", "d", "--out", "o"])
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty) == (0.8, 1.0, 0, 1.0)
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "(default 0.8, LLASA's); 0 = greedy" in usage and "(default 1.0 = off)" in usage
    assert "repetition penalty, > 0 (default 1.0 = none)" in usage


BAD_FLAGS = [  # (flags, the one-line message): each refused before any model loads
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--resamples", "0"], "--resamples must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0 (0 = greedy), got -0.5"),
    (["--temperature", "nan"], "--temperature must be >= 0 (0 = greedy), got nan"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-1"], "--top-k must be >= 0 (0 = off), got -1"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0 (1 = none), got 0.0"),
    (["--codec", "mp3"], "--codec 'mp3': expected 'tone', 'words[:PATH]', 'xcodec2[:PATH]'"),
    (["--reward-whisper", "tiny"], "--reward-whisper 'tiny' is for a module:function --asr"),
    (["--language", "klingon"], "--language: unknown language 'klingon'"),
    (["--device", "toaster"], "--device 'toaster': Expected one of cpu"),
]


def test_bad_flags_are_one_line_exit_2_before_any_model_loads(tmp_path):
    """Every bad flag or input: one line naming it, exit status 2, nothing loaded (the --model and
    --asr given do not exist: loading either would stop with 'cannot load')."""
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "hi"}\n')
    (tmp_path / "file").write_text("")
    data_file = str(tmp_path / "d.jsonl")
    base = [
        "--model",
        str(tmp_path / "no-ckpt"),
        "--codec",
        "tone",
        "--data",
        data_file,
        "--out",
        str(tmp_path / "o"),
        "--asr",
        str(tmp_path / "no-whisper.pt"),
    ]
    cases = BAD_FLAGS + [
        (["--data", str(tmp_path / "none")], f"--data {tmp_path / 'none'}: no such file"),
        (["--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'} is a file, not a folder"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(base + flags)
        assert e.value.code == 2, flags
        assert str(e.value).startswith(f"eval.py: {message}"), str(e.value)
        assert "\n" not in str(e.value)
    no_dir = str(tmp_path / "no-dir")
    compare = ["--compare", str(tmp_path), str(tmp_path)]
    others = [
        (
            ["--wavs", no_dir, "--data", data_file, "--out", str(tmp_path / "o")],
            f"--wavs {no_dir}: no such folder",
        ),
        (["--wavs", str(tmp_path), "--data", data_file], "--data and --out are needed"),
        (compare, f"--compare: no results.jsonl in {tmp_path}"),
        (compare + ["--resamples", "0"], "--resamples must be >= 1"),
    ]
    for argv, message in others:
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert e.value.code == 2, argv
        assert str(e.value).startswith(f"eval.py: {message}"), str(e.value)
    assert not os.path.exists(tmp_path / "o")
    import subprocess  # as a command: that line on stderr, status 2, no traceback

    cmd = [sys.executable, os.path.join(REPO, "eval.py")] + base + ["--batch-size", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "eval.py: --batch-size must be >= 1, got 0\n"


def test_clips_and_prompts_over_30_s(tmp_path, fake_asr):
    """A 31 s clip and a 31 s voice prompt are scored (a module:function ASR hears the whole clip;
    the reward's Whisper marks it too_long, reward 0, and its WER still counts); with --model a
    31 s prompt is cloned, and a 90 s one, which leaves no room in the tiny model's context, is
    that row's error alone."""
    _tone_wav(tmp_path / "long.wav", seconds=31)
    _tone_wav(tmp_path / "huge.wav", seconds=90)
    _tone_wav(tmp_path / "short.wav")
    rows = [
        dict(id=i, text="where is the station", prompt_wav="long.wav", prompt_text="A voice.")
        for i in ("long", "short")
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [
        "--data",
        str(tmp_path / "d.jsonl"),
        "--asr",
        "fake_asr_mod:transcribe",
        "--language",
        "en",
        "--speaker-model",
        "random-tiny",
    ]
    summary = ev.main(["--wavs", str(tmp_path), "--out", str(tmp_path / "o")] + base)
    got = _transcripts(tmp_path / "o")
    assert summary["errors"] == 0 and got["long"]["duration_s"] == 31
    assert summary["f0_median_hz_median"] == pytest.approx(220, 1)  # the tones' pitch
    assert got["long"]["sim"] is not None
    reward = ["--reward-whisper", "random-tiny"]
    summary = ev.main(["--wavs", str(tmp_path), "--out", str(tmp_path / "r")] + reward + base)
    got = _transcripts(tmp_path / "r")
    assert fake_asr.CALLS[-2:] == [(31 * 16000, "en"), (8000, "en")]  # the whole clip, once
    assert got["long"]["too_long"] and got["long"]["error"] is None
    assert got["long"]["reward"] == 0.0 and got["long"]["wer"] == 0.0
    assert got["long"]["sim"] is not None and got["long"]["f0_median_hz"] == pytest.approx(220, 1)
    assert got["short"]["error"] is None and summary["too_long"] == 1 and summary["scored"] == 2
    assert summary["n_wer"] == 2 and summary["reward_mean"] == got["short"]["reward"] / 2
    rows[1]["prompt_wav"] = "huge.wav"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = ["--model", "tiny", "--codec", "tone", "--max-new-tokens", "8"]
    summary = ev.main(model + ["--out", str(tmp_path / "m")] + base[:-2])
    got = _transcripts(tmp_path / "m")
    assert got["long"]["error"] is None and got["long"]["duration_s"] > 0
    assert "exceed the model's context of 4096 tokens" in got["short"]["error"]
    assert summary["scored"] == 1
