"""codec.py: the self-contained XCodec2 decoder against a golden file, the tone codec, the demo's
word codec, codec names and errors."""
import json
import os

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import codec
import demo
from helpers import REPO


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


def test_xcodec2_precisions(golden_codec):
    """bf16 autocast stays within the error the class states (37 dB SNR against fp32); tf32 on a
    CPU is fp32 itself (TF32 is a CUDA setting), and the process-wide settings are restored."""
    cfg, codes, _ = _golden()
    seqs = [codes[0, 0], codes[1, 0, :17]]
    ref = golden_codec.decode(seqs)
    bf16 = codec.XCodec2Codec(golden_codec.model, "cpu", cfg, precision="bf16").decode(seqs)
    before = torch.get_float32_matmul_precision()
    tf32 = codec.XCodec2Codec(golden_codec.model, "cpu", cfg, precision="tf32").decode(seqs)
    assert torch.get_float32_matmul_precision() == before and not torch.is_autocast_enabled("cpu")
    for r, b, t in zip(ref, bf16, tf32):
        snr = 10 * np.log10(np.mean(r ** 2) / np.mean((b - r) ** 2))
        assert 30 < snr < 80, snr  # rounded, and not much
        np.testing.assert_array_equal(t, r)
    with pytest.raises(ValueError, match="precision"):
        codec.XCodec2Codec(golden_codec.model, "cpu", cfg, precision="fp16")
