"""codec.py: the self-contained XCodec2 decoder against a golden file, the tone codec, the demo's
word codec, codec names and errors; encode (transformers' Xcodec2Model at a tiny random config, the
tone and word codecs' inverses) and the prompt-code cache."""

import importlib
import json
import os
import re
import sys
import types

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import codec
import demo
import tf32 as tf32_module
from helpers import REPO

transformers = pytest.importorskip("transformers")


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
    """Decode needs lengths: unmasked right-padding alters a shorter clip (attention, GroupNorm)."""
    _, codes, _ = _golden()
    batch = codes.clone()
    batch[1, 0, 7:] = 0  # clip 1 is 7 codes, right-padded with code 0 as the decoder sees it
    with torch.no_grad():
        unmasked = golden_codec.model(batch)[1, 0, : 7 * codec.SAMPLES_PER_CODE]
        masked = golden_codec.model(batch, torch.tensor([30, 7]))[
            1, 0, : 7 * codec.SAMPLES_PER_CODE
        ]
        alone = golden_codec.model(batch[1:, :, :7])[0, 0]
    torch.testing.assert_close(masked, alone, rtol=0, atol=1e-5)
    assert (unmasked - alone).abs().max() > 1e-3


def test_fsq_values_are_base4_digits():
    model = codec.XCodec2Decoder(codec.XCodec2Config(hidden_dim=32, depth=1, n_heads=4, vq_dim=64))
    codes = torch.tensor([[0, 65535, 1, 4**7, 2 * 4 + 3]])
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
        # the real model's shapes against the small file
        codec.XCodec2Decoder.from_pretrained(GOLDEN)
    cfg, _, _ = _golden()
    with safe_open(GOLDEN, framework="pt") as f:
        tensors = {
            k: f.get_tensor(k)
            for k in f.keys()  # noqa: SIM118 -- safe_open is not iterable
            if k != "generator.backbone.transformers.1.mlp.fc2.weight"
        }
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        KeyError, match=re.escape("no tensor 'generator.backbone.transformers.1.mlp.fc2.weight'")
    ):
        codec.XCodec2Decoder.from_pretrained(str(tmp_path), cfg)

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match=r"some-org/xcodec2.*--codec xcodec2:PATH"):
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


@pytest.mark.parametrize(
    "bad", [[-1], [codec.CODEBOOK_SIZE], [1.5], torch.tensor([1.0, 2.0]), [True]]
)
def test_bad_codes_name_the_clip(bad, golden_codec):
    for c in (codec.ToneCodec(), golden_codec):
        with pytest.raises(ValueError, match=r"clip 1: codes must be ints in \[0, 65536\)"):
            c.decode([[1, 2], bad])


def test_word_codec_decodes_codes_to_the_stored_clips_joined_by_gaps():
    wc = codec.load_codec("words")
    with np.load(codec.WORDS_FILE) as z:
        pcm = z["clips"]
        offsets = z["offsets"]
        words = [str(w) for w in z["words"]]
    assert words == demo.VOCAB
    assert len(offsets) == len(words) + 1

    def clip(k):
        return pcm[offsets[k] : offsets[k + 1]].astype(np.float32) / 32768.0

    gap = np.zeros(round(0.06 * codec.SAMPLE_RATE), dtype=np.float32)
    out = wc.decode([[3, 0, 7], torch.tensor([5]), []])
    assert [a.dtype for a in out] == [np.float32] * 3
    np.testing.assert_array_equal(out[0], np.concatenate([clip(3), gap, clip(0), gap, clip(7)]))
    np.testing.assert_array_equal(out[1], clip(5))
    assert len(out[2]) == 0
    assert wc.text([[3, 0, 7]]) == [f"{words[3]} {words[0]} {words[7]}"]
    # every word is speech
    assert all(len(clip(k)) > 0.1 * codec.SAMPLE_RATE for k in range(len(words)))
    for bad in ([len(words)], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match="clip 0"):
            wc.decode([bad])
    assert isinstance(codec.load_codec(f"words:{codec.WORDS_FILE}"), codec.WordCodec)
    with pytest.raises(FileNotFoundError, match="build-words"):
        codec.load_codec("words:/nonexistent/words.npz")


def test_xcodec2_precisions(golden_codec, tf32_clean):
    """bf16 autocast stays within the error the class states (37 dB SNR against fp32); tf32 on a
    CPU is fp32 itself (TF32 is a CUDA setting), and the process-wide settings are restored."""
    cfg, codes, _ = _golden()
    seqs = [codes[0, 0], codes[1, 0, :17]]
    ref = golden_codec.decode(seqs)
    bf16 = codec.XCodec2Codec(golden_codec.model, "cpu", cfg, precision="bf16").decode(seqs)
    before = _flags()
    tf32 = codec.XCodec2Codec(golden_codec.model, "cpu", cfg, precision="tf32").decode(seqs)
    assert _flags() == before
    assert not torch.is_autocast_enabled("cpu")
    for r, b, t in zip(ref, bf16, tf32):
        snr = 10 * np.log10(np.mean(r**2) / np.mean((b - r) ** 2))
        assert 30 < snr < 80, snr  # rounded, and not much
        np.testing.assert_array_equal(t, r)
    with pytest.raises(ValueError, match="precision"):
        codec.XCodec2Codec(golden_codec.model, "cpu", cfg, precision="fp16")


def _flags() -> dict:
    """What fp32 matmuls and convolutions compute in, per (backend, op) (tf32.py), and autocast."""
    got = {f"{b}.{o}": tf32_module._computes_in((b, o)) for b, o in tf32_module.OPS}
    return dict(got, autocast=torch.is_autocast_enabled("cpu"))


@pytest.fixture
def tf32_clean():
    """torch's default settings before and after the test (decodes change them process-wide)."""

    def reset():
        torch.set_float32_matmul_precision("highest")
        for backend, op in [("generic", "all")] + [
            (b, o) for b in ("cuda", "mkldnn") for o in ("all", "matmul")
        ]:
            tf32_module._set((backend, op), "none")
        torch.backends.cudnn.allow_tf32 = True

    reset()
    yield
    reset()


# How a process may have set TF32 before a decode: torch's defaults, the legacy switches, or the
# new fp32_precision settings the way transformers' enable_tf32 sets them (without its lru_cache).
_enable_tf32 = getattr(
    transformers.utils.import_utils.enable_tf32,
    "__wrapped__",
    transformers.utils.import_utils.enable_tf32,
)
CALLERS = {
    "torch-defaults": lambda: None,
    "legacy-tf32": lambda: torch.set_float32_matmul_precision("high"),
    "legacy-strict": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "transformers-enable-tf32": lambda: _enable_tf32(True),
    "transformers-disable-tf32": lambda: _enable_tf32(False),
}


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the CUDA-typed codec's autocast
@pytest.mark.parametrize("caller", CALLERS)
def test_xcodec2_precision_sets_tf32_flags_inside_decode_and_restores_them(
    golden_codec, tf32_clean, caller
):
    """The process-wide TF32 settings a decode runs under are the precision's, whatever the caller
    set (torch's default leaves cuDNN's TF32 on; transformers' enable_tf32 uses torch's new
    fp32_precision API, after which torch's legacy getters raise): on CUDA "tf32" turns TF32
    matmuls and convolutions on, "fp32" and "bf16" (beside its autocast) off; a CPU computes in
    fp32 (TF32 off) but under "bf16". Spied inside decode on the CPU, and on a CUDA-typed codec in
    `_numerics` itself; the caller's settings and torch's legacy getters' answers are back after."""
    cfg, codes, _ = _golden()
    seen = []

    class Spy(torch.nn.Module):  # the decoder's forward: records the settings it runs under
        def forward(self, batch, frames=None):
            seen.append(_flags())
            return torch.zeros(batch.shape[0], 1, batch.shape[-1] * codec.SAMPLES_PER_CODE)

    CALLERS[caller]()
    before = _flags()
    legacy = _legacy_getters()
    strict = {f"{b}.{o}": "ieee" for b, o in tf32_module.OPS}
    for precision in codec.PRECISIONS:
        c = codec.XCodec2Codec(golden_codec.model, "cpu", cfg, precision=precision)
        c.model = Spy()
        c.decode([codes[0, 0].tolist()])
        assert seen.pop() == dict(strict, autocast=precision == "bf16"), precision
        assert _flags() == before
        assert _legacy_getters() == legacy
        c.device = torch.device("cuda")  # what a GPU's decode sets (no CUDA op runs)
        with c._numerics():
            got = {k: v for k, v in _flags().items() if k != "autocast"}
        cuda = "tf32" if precision == "tf32" else "ieee"
        assert got == dict(strict, **{"cuda.matmul": cuda, "cuda.conv": cuda}), precision
        assert _flags() == before
        assert _legacy_getters() == legacy


def test_xcodec2_decodes_after_transformers_enable_tf32(golden_codec, tf32_clean):
    """The issue's case: once transformers' enable_tf32 set torch's new fp32_precision API,
    torch.get_float32_matmul_precision() raises; a decode must not read it, and must leave the
    new settings as they were."""
    cfg, codes, audio = _golden()
    _enable_tf32(True)
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()
    before = _flags()
    out = codec.XCodec2Codec(golden_codec.model, "cpu", cfg, precision="fp32").decode([codes[0, 0]])
    np.testing.assert_allclose(out[0], audio[0, 0].numpy(), rtol=0, atol=1e-5)
    assert _flags() == before
    assert torch.backends.fp32_precision == "tf32"


def _legacy_getters() -> list:
    """What torch's legacy TF32 getters answer, "raises" where they raise."""
    out = []
    for get in (
        torch.get_float32_matmul_precision,
        lambda: torch.backends.cuda.matmul.allow_tf32,
        lambda: torch.backends.cudnn.allow_tf32,
    ):
        try:
            out.append(get())
        except RuntimeError:
            out.append("raises")
    return out


# ----------------------------------------------------------------------------- encode


def _tiny_transformers_xcodec2():
    """transformers' Xcodec2Model at the golden file's decoder shapes (a tiny random encoder and a
    1-layer w2v-bert), decoder weights mapped from the golden file: it decodes as the golden one."""
    cfg, _, _ = _golden()
    semantic = dict(
        model_type="wav2vec2-bert",
        hidden_size=cfg.vq_dim - cfg.hidden_dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        output_hidden_size=cfg.vq_dim - cfg.hidden_dim,
    )
    tcfg = transformers.Xcodec2Config(
        hidden_size=cfg.hidden_dim,
        intermediate_size=4 * cfg.hidden_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.hidden_dim // cfg.n_heads,
        quantization_dim=cfg.vq_dim,
        encoder_hidden_size=4,
        semantic_model_config=semantic,
    )
    torch.manual_seed(0)
    model = transformers.Xcodec2Model(tcfg).eval()
    state = model.state_dict()
    for name, p in codec.XCodec2Decoder.from_pretrained(GOLDEN, cfg).state_dict().items():
        keys = codec.transformers_keys(name)  # c_attn: q, k, v stacked
        state.update(zip(keys, p.split([state[k].shape[0] for k in keys])))
    model.load_state_dict(state)
    # transformers' init (normal, std 0.02) leaves the quantizer's input near 0: every code alike.
    # PyTorch's default init for the encoder, project_in scaled up: codes spread over the codebook.
    for m in [
        *model.acoustic_encoder.modules(),
        *model.semantic_adapter.modules(),
        model.fc_encoder,
    ]:
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear)):
            m.reset_parameters()
    model.quantizer.project_in.reset_parameters()
    model.quantizer.project_in.weight.data.mul_(20)
    return model


@pytest.fixture(scope="module")
def tiny_hf():
    if not hasattr(transformers, "Xcodec2Model"):
        pytest.skip(
            f"transformers {transformers.__version__} has no Xcodec2Model (5.13 and later have it)"
        )
    return _tiny_transformers_xcodec2()


def _clips(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def test_transformers_decode_equals_golden_with_mapped_weights(tiny_hf, tmp_path):
    """The mapping covers transformers' whole decoding path; it decodes as the package (golden)."""
    cfg, codes, want = _golden()
    ours = codec.XCodec2Decoder(cfg).state_dict()
    mapped = {k for name in ours for k in codec.transformers_keys(name)}
    decoding = {
        k
        for k in tiny_hf.state_dict()
        if k.startswith(("acoustic_decoder.", "quantizer.project_out."))
    }
    assert mapped == decoding
    with torch.no_grad():
        got = tiny_hf.decode(codes).audio_values
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # measured: 6.3e-8
    # and our decoder reads a transformers-format checkpoint (HKUSTAudio/xcodec2-hf) via the mapping
    tiny_hf.save_pretrained(tmp_path)
    c = codec.XCodec2Codec(str(tmp_path), "cpu", cfg)
    assert c.encoder == str(tmp_path)  # an -hf checkpoint serves encode too
    np.testing.assert_allclose(c.decode([codes[0, 0]])[0], want[0, 0].numpy(), rtol=0, atol=1e-5)


def test_xcodec2_encode_shapes_range_determinism(tiny_hf):
    """(S + 1) // 320 codes for S samples (the codes transformers' audio_codes_mask marks valid;
    the model itself emits S // 320 + 1), in [0, 65536); deterministic; a clip's codes do not
    depend on its batch."""
    cfg, _, _ = _golden()
    xc = codec.XCodec2Codec(
        codec.XCodec2Decoder.from_pretrained(GOLDEN, cfg), "cpu", cfg, encoder=tiny_hf
    )
    lengths = [0, 1, 319, 320, 321, 16000, 16100, 8123]
    clips = _clips(*lengths)
    codes = xc.encode(clips)
    assert (
        [len(c) for c in codes] == [(n + 1) // 320 for n in lengths] == [0, 0, 1, 1, 1, 50, 50, 25]
    )
    assert all(isinstance(x, int) and 0 <= x < codec.CODEBOOK_SIZE for c in codes for x in c)
    assert len(set(codes[5])) > 10  # not a constant
    assert xc.encode(clips) == codes  # deterministic
    assert [xc.encode([a])[0] for a in clips[4:]] == codes[4:]  # alone as in a batch
    assert xc.encode([]) == []
    # the round trip: decode gives 320 samples per code
    audio = xc.decode(codes)
    assert [len(a) for a in audio] == [codec.SAMPLES_PER_CODE * len(c) for c in codes]
    with pytest.raises(ValueError, match="clip 0: audio must be 1-D"):
        xc.encode([np.zeros((2, 320), np.float32)])


def test_xcodec2_encode_matches_transformers_feature_extractor(tiny_hf):
    """Our features (SeamlessM4T's numpy fbank) against Xcodec2FeatureExtractor's (torchaudio),
    where torchaudio loads: the same model input, the same codes."""
    try:
        importlib.import_module("torchaudio.compliance.kaldi")
        from transformers import Xcodec2FeatureExtractor
    except Exception as e:  # not installed, or built for another torch
        pytest.skip(f"torchaudio unavailable ({type(e).__name__})")
    cfg, _, _ = _golden()
    xc = codec.XCodec2Codec(codec.XCodec2Decoder(cfg), "cpu", cfg, encoder=tiny_hf)
    fe = Xcodec2FeatureExtractor()
    for a in _clips(319, 16000, 16100, seed=1):
        x = fe(a, sampling_rate=codec.SAMPLE_RATE, return_tensors="pt")
        with torch.no_grad():
            out = tiny_hf.encode(
                x["input_values"], x["input_features"], padding_mask=x["padding_mask"]
            )
        assert xc.encode([a])[0] == out.audio_codes[0, 0][out.audio_codes_mask[0].bool()].tolist()


def test_xcodec2_encoder_loads_lazily_and_errors_name_the_fix(tiny_hf, tmp_path, monkeypatch):
    cfg, _, _ = _golden()
    tiny_hf.save_pretrained(tmp_path / "hf")
    xc = codec.XCodec2Codec(codec.XCodec2Decoder(cfg), "cpu", cfg, encoder=str(tmp_path / "hf"))
    assert xc.encoder == str(tmp_path / "hf")  # decode-only use never loads it
    a = _clips(3200)[0]
    assert xc.encode([a]) == codec.XCodec2Codec(
        codec.XCodec2Decoder(cfg), "cpu", cfg, encoder=tiny_hf
    ).encode([a])
    assert isinstance(xc.encoder, transformers.Xcodec2Model)
    assert codec.XCodec2Codec(codec.XCodec2Decoder(cfg), "cpu", cfg).encoder == codec.XCODEC2_HF
    with pytest.raises(
        OSError, match=r"could not load the XCodec2 encoder .*missing.*--codec xcodec2:PATH"
    ):
        codec.load_transformers_xcodec2(str(tmp_path / "missing"))
    orig = tmp_path / "orig"  # the original checkpoint's layout: config.json says xcodec2 too
    orig.mkdir()
    (orig / "config.json").write_text(
        json.dumps({"model_type": "xcodec2", "architectures": ["XCodec2Model"]})
    )
    with safe_open(GOLDEN, framework="pt") as f:
        save_file(
            {
                k: f.get_tensor(k)
                for k in f.keys()  # noqa: SIM118 -- safe_open is not iterable
                if not k.startswith("test.")
            },
            orig / "model.safetensors",
        )
    with pytest.raises(
        OSError,
        match=r"not a transformers Xcodec2Model checkpoint .*xcodec2-hf.*--codec xcodec2:PATH",
    ):
        codec.load_transformers_xcodec2(str(orig))
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(__version__="5.10.4"))
    with pytest.raises(ImportError, match=r"transformers >= 5.13 .* this is 5.10.4"):
        codec.load_transformers_xcodec2(str(tmp_path / "hf"))


def test_tone_codec_encode_inverts_decode():
    tone = codec.ToneCodec()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, codec.CODEBOOK_SIZE, 200).tolist(), list(range(256)), [], [7]]
    audio = tone.decode(seqs)
    codes = tone.encode(audio)
    assert codes[1:] == seqs[1:]  # exact on [0, 256)
    assert codes[0] == [k % 256 for k in seqs[0]]  # k and k + 256 are the same tone
    for a, b in zip(tone.decode(codes), audio):
        np.testing.assert_array_equal(a, b)  # decode(encode(audio)) == audio
    # audio it did not make: no error, the nearest tones, samples // 320 of them (no partial frame)
    other = tone.encode(_clips(1000, 319, 0) + [np.zeros(640, np.float32), torch.ones(320)])
    assert [len(c) for c in other] == [3, 0, 0, 2, 1]
    assert all(0 <= x < 256 for c in other for x in c)


def test_word_codec_encode_inverts_decode():
    wc = codec.load_codec("words")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, len(wc.clips), 30).tolist(), list(range(len(wc.clips))), [], [4]]
    assert wc.encode(wc.decode(seqs)) == seqs
    with pytest.raises(
        ValueError, match=r"clip 1: the word codec encodes only audio it decoded.*sample 0"
    ):
        wc.encode([wc.decode([[1]])[0], _clips(16000)[0]])
    truncated = wc.decode([[3, 5]])[0][:-10]
    with pytest.raises(ValueError, match="no word matches at sample"):
        wc.encode([truncated])


class CountingCodec(codec.ToneCodec):
    def __init__(self):
        super().__init__()
        self.encoded = 0  # clips encoded

    def encode(self, audios):
        self.encoded += len(audios)
        return super().encode(audios)


def test_prompt_codes_encode_each_content_once():
    counting = CountingCodec()
    cache = codec.PromptCodes(counting)
    a, b = counting.decode([[1, 2, 3], [4, 5]])
    assert cache.encode([a]) == [[1, 2, 3]]
    assert counting.encoded == 1
    # the same content: no encode
    assert cache.encode([a.copy()]) == [[1, 2, 3]]
    assert counting.encoded == 1
    assert cache.encode([b, a, b]) == [[4, 5], [1, 2, 3], [4, 5]]
    assert counting.encoded == 2  # b once
    c = a.copy()
    c[100] += 1e-3  # different content, however close
    cache.encode([c])
    assert counting.encoded == 3
    cache.encode([a])[0].append(99)  # callers get copies
    assert cache.encode([a]) == [[1, 2, 3]]
    assert counting.encoded == 3
    assert cache.encode([]) == []
    assert counting.encoded == 3


def test_package_codec_encode_cuts_as_ours(monkeypatch):
    """XCodec2PackageCodec.encode calls encode_code (S // 320 + 1 codes), keeps (S + 1) // 320."""

    class FakeModel:
        @classmethod
        def from_pretrained(cls, name):
            return cls()

        def eval(self):
            return self

        def to(self, device):
            return self

        def encode_code(self, wav):  # [1, S] -> [1, 1, S // 320 + 1]
            return torch.arange(wav.shape[1] // 320 + 1)[None, None]

    package = types.ModuleType("xcodec2.modeling_xcodec2")
    package.XCodec2Model = FakeModel
    monkeypatch.setitem(sys.modules, "xcodec2", types.ModuleType("xcodec2"))
    monkeypatch.setitem(sys.modules, "xcodec2.modeling_xcodec2", package)
    pc = codec.load_codec("xcodec2-package")
    assert pc.encode(_clips(16000, 319, 100)) == [list(range(50)), [0], []]
