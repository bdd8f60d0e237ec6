"""Tests of the CPU demo (demo.py, codec.WordCodec): to be merged into test_grpo.py."""
import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch

import codec
import config
import data
import demo
import grpo
import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) if os.path.basename(
    os.path.dirname(os.path.abspath(__file__))) == ".scratch" else os.path.dirname(os.path.abspath(__file__))
ASSETS = os.environ.get("TEST_ASSETS", os.path.join(REPO, "..", "shared", "assets"))


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
    train = [ex.text for ex in data.load_dataset(demo.TRAIN_FILE)]
    val = [ex.text for ex in data.load_dataset(demo.VAL_FILE)]
    assert (train, val) == demo.make_texts(0)  # the shipped files are the script's output
    assert len(train) == demo.N_TRAIN and len(val) == demo.N_VAL and not set(train) & set(val)
    # the demo preset's small validation set: some of those held-out sentences, as build-texts writes them
    assert [ex.text for ex in data.load_dataset(demo.VAL_DEMO_FILE)] == [val[i] for i in demo.VAL_DEMO]
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


def _val_nll(model, tok):
    ids, attn, target = demo.warm_start_batch(tok, [ex.text for ex in data.load_dataset(demo.VAL_FILE)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return float(-(logp * target[:, 1:]).sum() / target[:, 1:].sum())


def test_warm_start_is_deterministic_learns_and_leaves_errors():
    # 60 steps (the demo's policy takes 2000, too long for a test): the lr schedule spans them.
    torch.set_num_threads(1)
    m1, tok = demo.warm_start(seed=0, steps=60, log=None)
    m2, _ = demo.warm_start(seed=0, steps=60, log=None)
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), name
    untrained, _ = demo.warm_start(seed=0, steps=0, log=None)
    # It learned: held-out sentences' word tokens are far more likely than before training...
    assert _val_nll(m1, tok) < _val_nll(untrained, tok) - 1.0
    # ...and it still speaks badly: greedy word error on held-out sentences is large.
    speech = data.speech_vocab(tok)
    val = [ex.text for ex in data.load_dataset(demo.VAL_FILE)]
    out = sample.generate(m1, [data.prompt_ids(tok, t) for t in val], max_new_tokens=demo.MAX_WORDS + 5,
                          temperature=0, stop_ids=(speech.end_id,), allowed_ids=speech.allowed_ids())
    wrong = 0
    for i, text in enumerate(val):
        n = int(out.lengths[i]) - int(out.finished[i])
        wrong += [demo.VOCAB[c] for c in speech.to_codes(out.tokens[i, :n].tolist())] != text.split()
    assert wrong / len(val) >= 0.3


def test_ensure_policy_builds_once_and_loads(tmp_path):
    torch.set_num_threads(1)
    path = demo.ensure_policy(str(tmp_path / "policy"), seed=0, steps=3)
    assert path == str(tmp_path / "policy")
    weights = os.path.join(path, "model.safetensors")
    stamp = os.path.getmtime(weights)
    assert demo.ensure_policy(path, seed=0, steps=3) == path and os.path.getmtime(weights) == stamp  # kept
    model, tok = sample.load_model(path, dtype=torch.float32)
    assert data.speech_vocab(tok).n == len(demo.VOCAB)
    assert data.prompt_ids(tok, "the cat sees the dog") == data.prompt_ids(demo.demo_tokenizer(), "the cat sees the dog")
    fresh, _ = demo.warm_start(seed=0, steps=3, log=None)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_demo_grpo_steps_end_to_end_with_real_whisper(tmp_path):
    """Word audio -> real Whisper tiny.en -> reward -> update, through grpo.train."""
    checkpoint = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if not os.path.exists(checkpoint):
        pytest.skip(f"{checkpoint} not found (set TEST_ASSETS to the shared assets folder)")
    torch.set_num_threads(1)
    policy = demo.ensure_policy(str(tmp_path / "policy"), seed=0, steps=40)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": ex.text}) + "\n" for ex in data.load_dataset(demo.VAL_FILE)[:3]))
    out = tmp_path / "run"
    cfg = config.parse_config(["--model", policy, "--codec", "words", "--whisper", checkpoint, "--language", "en",
                               "--whisper-device", "cpu", "--device", "cpu", "--whisper-threads", "1",
                               "--data", demo.TRAIN_FILE, "--val-data", str(val), "--out", str(out),
                               "--steps", "2", "--prompts-per-step", "1", "--group-size", "4",
                               "--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "1.0",
                               "--lr", "1e-3", "--kl-coef", "0.04", "--micro-batch", "4", "--val-every", "2",
                               "--sample-every", "1", "--save-every", "2", "--n-samples", "2"])
    history = grpo.train(cfg)
    assert [m["step"] for m in history] == [1, 2]
    for m in history:
        for key in ("reward_mean", "cer", "nll", "loss", "kl"):
            assert math.isfinite(m[key]), (key, m[key])
        assert 0 <= m["reward_mean"] <= 1
    assert 0 <= history[-1]["val_cer"] and math.isfinite(history[-1]["val_reward"])
    wavs = sorted(os.listdir(out / "samples" / "step_2"))
    assert sum(w.endswith(".wav") for w in wavs) == 2
    assert os.path.exists(out / "checkpoints" / "step_2" / "config.json")
    png = demo.plot(str(out / "metrics.jsonl"))
    assert png == str(out / "metrics.png") and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


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
    rows = [{"step": s, "reward_mean": 0.2 + 0.04 * s} for s in range(1, 11)]
    for r in rows[3::4]:
        r["val_cer"] = 0.6 - 0.04 * r["step"]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = demo.plot(str(metrics))
    assert png == str(tmp_path / "metrics.png")
    img = _read_png(png)
    assert img.shape == (400, 640, 3)
    for name, rgb in demo.SERIES:  # each curve drew pixels of its colour
        assert (img == np.array(rgb, dtype=np.uint8)).all(axis=2).sum() > 100, name
    other = demo.plot(str(metrics), str(tmp_path / "x.png"), size=(300, 200))
    assert _read_png(other).shape == (200, 300, 3)
