"""demo.py, plot.py: the CPU demo (texts, warm start, the policy, a GRPO run with real Whisper) and
the learning curve. (The word codec's decoding is in test_codec.py.)"""

import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch

import config
import data
import demo
import grpo
import models
import plot
from helpers import ASSETS, read_jsonl


def test_demo_texts_use_only_the_vocabulary_and_validation_is_held_out():
    train_pool, val_pool = demo.make_texts(0)
    train = [ex.text for ex in data.load_dataset(demo.TRAIN_FILE)]
    val = [ex.text for ex in data.load_dataset(demo.VAL_FILE)]
    kept = [ex.text for ex in data.load_dataset(demo.VAL_DEMO_FILE)]
    # The shipped files are the script's output: every held-out candidate in val.jsonl, and kept
    # candidates, in the pools' order, in train.jsonl and val_demo.jsonl.
    assert val == val_pool
    assert not set(train_pool) & set(val_pool)
    assert len(train) == demo.N_TRAIN
    assert len(kept) == demo.N_VAL
    assert train == [t for t in train_pool if t in set(train)]
    assert kept == [t for t in val_pool if t in set(kept)]
    vocab = set(demo.VOCAB)
    assert all(w in vocab for t in train + val for w in t.split())
    tok = demo.demo_tokenizer()
    speech = data.speech_vocab(tok)
    assert speech.n == len(demo.VOCAB)
    ids, attn, target = demo.warm_start_batch(tok, val[:2])
    # the response is the words' speech tokens, then the stop token
    for i, text in enumerate(val[:2]):
        response = ids[i][target[i].bool()].tolist()
        assert response == [speech.first + demo.VOCAB.index(w) for w in text.split()] + [
            speech.end_id
        ]
        assert int(attn[i].sum()) == len(data.prompt_ids(tok, text)) + len(response)


def _val_nll(model, tok, texts):
    """Mean NLL (nats) of the texts' word tokens and stop token after their prompts."""
    ids, attn, target = demo.warm_start_batch(tok, texts)
    with torch.no_grad():
        logp = torch.log_softmax(
            model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1
        )
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
    skipped = [t for t in train_pool[: train_pool.index(train[9]) + 1] if t not in set(train)]
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
    assert sorted(partner) == sorted(demo.VOCAB)
    assert all(a != b for a, b in partner.items())
    # same role
    assert all(any(a in ws and b in ws for ws in demo.WORDS.values()) for a, b in partner.items())
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
    assert path == str(tmp_path / "policy")
    assert sorted(os.listdir(tmp_path)) == ["policy"]
    weights = os.path.join(path, "model.safetensors")
    stamp = os.path.getmtime(weights)
    # kept
    assert demo.ensure_policy(path, seed=0, steps=3, confusion_steps=2) == path
    assert os.path.getmtime(weights) == stamp
    # where "demo" resolves to: built already, so loaded
    monkeypatch.setattr(demo, "POLICY_DIR", path)
    assert models.load_model(demo.resolve_model("demo"), dtype=torch.float32)[
        0
    ].config.vocab_size == len(demo.demo_tokenizer())
    model, tok = models.load_model(path, dtype=torch.float32)
    assert data.speech_vocab(tok).n == len(demo.VOCAB)
    assert data.prompt_ids(tok, "the cat sees the dog") == data.prompt_ids(
        demo.demo_tokenizer(), "the cat sees the dog"
    )
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
    val.write_text(
        "".join(
            json.dumps({"text": ex.text}) + "\n" for ex in data.load_dataset(demo.VAL_DEMO_FILE)[:3]
        )
    )
    out = tmp_path / "run"
    cfg = config.parse_config(
        [
            "--preset",
            "demo",
            "--model",
            policy,
            "--whisper",
            checkpoint,
            "--whisper-threads",
            "1",
            "--val-data",
            str(val),
            "--out",
            str(out),
            "--steps",
            "2",
            "--prompts-per-step",
            "1",
            "--group-size",
            "4",
            "--val-every",
            "2",
            "--sample-every",
            "2",
            "--save-every",
            "2",
            "--n-samples",
            "2",
        ]
    )
    assert (cfg.codec, cfg.whisper_window, cfg.temperature) == ("words", demo.WHISPER_WINDOW_S, 1.0)
    history = grpo.train(cfg)
    assert [m["step"] for m in history] == [1, 2]
    for m in history:
        for key in ("reward_mean", "cer", "nll", "loss"):
            assert math.isfinite(m[key]), (key, m[key])
        # a 60-step policy may ramble past Whisper's 8 s: refused as too long, the one error allowed
        assert 0 <= m["reward_mean"] <= 1
        assert m["error_frac"] == m["too_long_frac"]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: validation before any update
    assert set(rows[0]) >= {"val_cer", "val_reward"}
    assert "reward_mean" not in rows[0]
    assert rows[0]["val_cer"] >= 0
    assert rows[2]["val_cer"] >= 0
    for folder in ("val_step_0", "val_step_2", "step_2"):  # before and after, to listen to
        names = sorted(os.listdir(out / "samples" / folder))
        assert sum(n.endswith(".wav") for n in names) == 2, folder
        assert "samples.jsonl" in names, folder
    before = read_jsonl(out / "samples" / "val_step_0" / "samples.jsonl")
    assert [r["text"] for r in before] == [ex.text for ex in data.load_dataset(str(val))[:2]]
    assert all(isinstance(r["transcript"], str) and r["cer"] >= 0 for r in before)
    assert os.path.exists(out / "checkpoints" / "step_2" / "config.json")
    # the curves, and below them the measures' panel
    assert _read_png(str(out / "metrics.png")).shape == (400 + plot.MEASURES_HEIGHT, 640, 3)


def _read_png(path):
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos = 8
    chunks = {}
    while pos < len(blob):
        n, kind = struct.unpack(">I4s", blob[pos : pos + 8])
        body = blob[pos + 8 : pos + 8 + n]
        assert (
            struct.unpack(">I", blob[pos + 8 + n : pos + 12 + n])[0]
            == zlib.crc32(kind + body) & 0xFFFFFFFF
        )
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert (depth, color) == (8, 2)
    assert len(raw) == h * (1 + 3 * w)
    assert b"IEND" in chunks
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()  # filter type 0
    return rows[:, 1:].reshape(h, w, 3)


def test_plot_writes_a_valid_png_with_both_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val_cer": 0.7, "val_reward": 0.1}] + [
        {"step": s, "reward_mean": 0.2 + 0.04 * s} for s in range(1, 11)
    ]
    for r in rows[4::4]:
        r["val_cer"] = 0.6 - 0.04 * r["step"]
        r["val_reward"] = 0.3 + 0.04 * r["step"]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot.plot(str(metrics))
    assert png == str(tmp_path / "metrics.png")
    img = _read_png(png)
    assert img.shape == (400, 640, 3)
    for name, rgb in plot.SERIES:  # each curve drew pixels of its colour
        assert (img == np.array(rgb, dtype=np.uint8)).all(axis=2).sum() > 100, name
    other = plot.plot(str(metrics), str(tmp_path / "x.png"), size=(300, 200))
    assert _read_png(other).shape == (200, 300, 3)


def test_plot_draws_the_measures_relative_to_their_first_step(tmp_path):
    """With pace and pitch logged, a second panel below the curves draws each relative to its
    first step: a pace that doubles reaches the panel's top (2.0), a pitch that holds stays at 1."""
    metrics = tmp_path / "metrics.jsonl"
    rows = []
    for s in range(1, 11):
        rows.append({"step": s, "reward_mean": 0.5, "chars_per_s": 10.0 + 10.0 * (s - 1) / 9})
        rows[-1]["f0_median_hz"] = 200.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    img = _read_png(plot.plot(str(metrics)))
    assert img.shape == (400 + plot.MEASURES_HEIGHT, 640, 3)
    panel = img[400:]
    for name, rgb in plot.MEASURES:
        drawn = (panel == np.array(rgb, dtype=np.uint8)).all(axis=2)
        assert drawn.sum() > 100, name
    pitch = (panel == np.array(plot.MEASURES[1][1], dtype=np.uint8)).all(axis=2)
    pace = (panel == np.array(plot.MEASURES[0][1], dtype=np.uint8)).all(axis=2)
    pitch_rows = np.nonzero(pitch[:, 100:])[0]  # right of the legend: the curve alone
    pace_rows = np.nonzero(pace[:, 100:])[0]
    # 1.0 sits midway between the axis's 0 (y 190) and 2.0 (y 40); the pace ends at the top.
    assert abs(np.median(pitch_rows) - 115) <= 4
    assert pace_rows.min() <= 40 + 4
