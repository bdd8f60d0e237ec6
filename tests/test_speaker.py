"""speaker.py: speaker similarity (sim) -- the WavLM models against their references, batching,
the prompt cache, silence, the module:function plug-in, loading errors; and sim in the metrics."""

import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import outputs
import speaker
from helpers import TESTS, noise
from reward import Score

GOLDEN = os.path.join(TESTS, "ecapa_golden.safetensors")


def tone(seconds, hz, scale=0.3):
    t = np.arange(int(seconds * 16000)) / 16000
    return (scale * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_sv():
    return speaker.load_speaker_model("random-tiny", batch_size=3)


class Counting(speaker.SpeakerModel):
    """A toy speaker model (the mean of each 64-sample frame's magnitude spectrum) that counts the
    clips it embeds."""

    name = "counting"
    min_samples = 64

    def __init__(self):
        self.calls = 0
        self.clips = 0

    def embed(self, audios):
        self.calls += 1
        self.clips += len(audios)
        return torch.stack([torch.from_numpy(mean_spectrum(a, 64)) for a in audios])


def mean_spectrum(audio, frame=512):
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)
    return np.abs(np.fft.rfft(frames, axis=1)).mean(0).astype(np.float32)


def test_sim_of_a_clip_with_itself_is_one_and_others_less(tiny_sv):
    clips = [noise(1.0, 1), noise(1.5, 2), tone(0.8, 220), noise(0.5, 3) + tone(0.5, 440)]
    embeddings = tiny_sv.embed(clips)
    assert embeddings.dtype == torch.float32
    assert embeddings.shape == (4, 16)
    judge = speaker.SpeakerSimilarity(tiny_sv)
    same = judge.sims(clips, [c.copy() for c in clips])
    assert same == pytest.approx([1.0] * 4, abs=1e-5)
    others = judge.sims(clips, clips[1:] + clips[:1])
    assert all(-1.0 <= s < 1.0 - 1e-4 for s in others), others
    assert float(speaker.similarity(embeddings[0], embeddings[0])) == pytest.approx(1.0, abs=1e-12)
    assert speaker.similarity(embeddings, -embeddings).tolist() == pytest.approx([-1.0] * 4)
    # a zero embedding: no similarity
    assert float(speaker.similarity(torch.zeros(3), torch.ones(3))) == 0.0


def test_wavlm_sv_from_a_directory_matches_transformers_clip_by_clip(tmp_path, monkeypatch):
    """ "wavlm-sv:PATH" (a save_pretrained directory, weights and feature extractor) embeds a batch
    of clips of different lengths as transformers' WavLMForXVector embeds each one alone, in
    batches of batch_size clips and at most max_frames2 padded frames squared."""
    from transformers import AutoFeatureExtractor, WavLMForXVector

    model, extractor = speaker.random_wavlm_sv(seed=3)
    model.save_pretrained(tmp_path)
    extractor.save_pretrained(tmp_path)
    sv = speaker.load_speaker_model(f"wavlm-sv:{tmp_path}", batch_size=4)
    assert sv.min_samples == 400 + 15 * 320  # one conv frame, then 16 frames for the TDNN's std
    clips = [
        noise(s, 10 + i) + tone(s, 100 + 50 * i) for i, s in enumerate([0.4, 1.3, 0.7, 2.0, 1.0])
    ]
    clips.append(noise(sv.min_samples / 16000, 9))  # the shortest clip it takes
    batched = sv.embed(clips)  # two batches of up to 4, padded
    reference = WavLMForXVector.from_pretrained(tmp_path).eval()
    features = AutoFeatureExtractor.from_pretrained(tmp_path)
    with torch.no_grad():
        alone = torch.stack(
            [
                reference(**features(c, sampling_rate=16000, return_tensors="pt")).embeddings[0]
                for c in clips
            ]
        )
    scale = float(alone.abs().max())
    assert torch.isfinite(batched).all()
    assert torch.allclose(batched, alone, rtol=1e-4, atol=1e-5 * scale)
    assert torch.allclose(
        sv.embed(clips[:2])[1], sv.embed(clips[1:2])[0], rtol=1e-5, atol=1e-6 * scale
    )
    seen = []
    states = speaker.wavlm_hidden_states

    def wavlm_hidden_states(w, x):
        seen.append(len(x))
        return states(w, x)

    monkeypatch.setattr(speaker, "wavlm_hidden_states", wavlm_hidden_states)
    sv.max_frames2 = 2 * (int(1.3 * 16000) // 320 + 1) ** 2  # two 1.3 s clips' attention, padded
    assert torch.allclose(sv.embed(clips), batched, rtol=1e-4, atol=1e-5 * scale)
    # 2.0 s alone; 1.3 s + 1.0 s; then 0.7, 0.4 and 0.33 s (under the budget)
    assert seen == [1, 2, 3]


def test_ecapa_head_and_seed_tts_checkpoint_match_the_reference(tmp_path):
    """The golden file was made by tests/make_ecapa_golden.py: Seed-TTS-eval's own ECAPA_TDNN
    (thirdparty/UniSpeech/downstreams/speaker_verification/models/ecapa_tdnn.py at 752f4297) over
    s3prl's WavLM (s3prl/upstream/wavlm at ec8064b5), as its verification.py runs them, at tiny
    sizes (WavLM 2 layers x 32, conv front end 24 wide; ECAPA channels 16, embedding 8), seeded
    random weights rounded to float16, two clips of 1.0 and 2.1 s one at a time. It holds the
    reference's state dict (the wavlm_large_finetune.pth layout), the clips, the hidden states
    the head receives and the embeddings. Here: our ECAPAHead on those hidden states, our
    WavLM's hidden states, the whole checkpoint loaded from a .pth, the two clips in one batch."""
    golden = load_file(GOLDEN)
    state = {
        k.removeprefix("checkpoint."): v for k, v in golden.items() if k.startswith("checkpoint.")
    }
    head = speaker.ECAPAHead.from_state_dict(
        {k: v for k, v in state.items() if not k.startswith("feature_extract.")}
    )
    assert sorted(head.state_dict()) == sorted(
        k for k in state if not k.startswith("feature_extract.")
    )
    wavs = [golden["wav0"].float().numpy(), golden["wav1"].float().numpy()]
    with torch.no_grad():
        for i in range(2):
            hidden = golden[f"hidden{i}"]  # [L, T, D]
            emb = head([h[None] for h in hidden], torch.tensor([hidden.shape[1]]))[0]
            assert torch.allclose(emb, golden[f"emb{i}"], atol=1e-5, rtol=0), (
                i,
                emb,
                golden[f"emb{i}"],
            )
    torch.save({"model": state}, tmp_path / "wavlm_large_finetune.pth")
    sim_model = speaker.load_speaker_model(str(tmp_path / "wavlm_large_finetune.pth"))
    assert sim_model.wavlm.config.do_stable_layer_norm
    assert sim_model.min_samples == 400
    with torch.no_grad():
        states, _ = speaker.wavlm_hidden_states(
            sim_model.wavlm, [torch.from_numpy(sim_model.prepare(wavs[1]))]
        )
    assert torch.allclose(torch.stack(states)[:, 0], golden["hidden1"], atol=1e-5, rtol=0)
    embeddings = sim_model.embed(wavs)
    for i in range(2):
        assert torch.allclose(embeddings[i], golden[f"emb{i}"], atol=1e-5, rtol=0), i
    del state["feature_extract.model.encoder.layers.1.fc2.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(
        ValueError, match=r"broken.pth: the WavLM weights .*missing \['encoder.layers.1"
    ):
        speaker.load_speaker_model(str(tmp_path / "broken.pth"))


def test_prompts_are_embedded_once_per_content():
    model = Counting()
    judge = speaker.SpeakerSimilarity(model, cache_size=2)
    prompt, other = tone(1.0, 250), tone(1.0, 1000)
    group = [noise(1.0, k) for k in range(4)]
    first = judge.sims(group, [prompt] * 4)
    assert (model.calls, model.clips) == (1, 5)  # the prompt once, each clip once, in one call
    second = judge.sims(group, [prompt.copy() for _ in group])  # the same content, other arrays
    assert (model.calls, model.clips) == (2, 9)
    assert second == first
    judge.sims(group[:2], [other, None])  # no prompt: no sim, no embedding
    assert model.clips == 9 + 2
    judge.sims(group[:1], [tone(1.0, 500)])  # a third prompt: the least recently used one goes
    assert list(judge._cache) == [speaker._content_key(other), speaker._content_key(tone(1.0, 500))]


def test_silence_has_sim_zero_and_a_silent_prompt_none():
    """An empty, all-zero or too-short clip is no voice: 0.0 without a model call. A prompt that
    cannot be embedded gives its clips None, with a warning."""
    model = Counting()
    judge = speaker.SpeakerSimilarity(model)
    prompt = tone(1.0, 250)
    # the last: 32 samples
    silent = [np.zeros(0, np.float32), np.zeros(16000, np.float32), noise(0.002, 1)]
    assert judge.sims(silent + [None], [prompt] * 4) == [0.0, 0.0, 0.0, None]
    assert model.clips == 1  # the prompt only
    with pytest.warns(UserWarning, match="silent or shorter"):
        assert (
            judge.sims([noise(1.0, 0), np.zeros(10, np.float32)], [np.zeros(8000, np.float32)] * 2)
            == [None] * 2
        )
    with pytest.raises(ValueError, match="must match 1 to 1"):
        judge.sims([prompt], [])


def test_module_function_speaker_model(tmp_path, monkeypatch):
    """A user's embedding: the mean magnitude spectrum of 512-sample frames. Tones on bins k1 and k2
    give 256 e_k1 and 256 e_k2, their sum 256 (e_k1 + e_k2): cosines 1, 0 and 1/sqrt(2) by hand."""
    (tmp_path / "toy_voice.py").write_text(
        "import numpy as np\n\n"
        "def mean_spectrum(audio):\n"
        "    frames = audio[:len(audio) // 512 * 512].reshape(-1, 512)\n"
        "    return np.abs(np.fft.rfft(frames, axis=1)).mean(0)\n\n"
        "def flat(audio):\n"
        "    return np.zeros((2, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = speaker.load_speaker_model("toy_voice:mean_spectrum")
    bin1, bin2 = (
        np.sin(2 * np.pi * k * np.arange(8 * 512) / 512).astype(np.float32) for k in (20, 45)
    )
    judge = speaker.SpeakerSimilarity(model)
    assert judge.sims(
        [bin1, bin1, bin1 + bin2, bin1 * 0.5], [bin1, bin2, bin1, bin1]
    ) == pytest.approx([1.0, 0.0, 2**-0.5, 1.0], abs=1e-5)
    assert model.embed([bin1]).shape == (1, 257)
    with pytest.raises(ValueError, match=r"toy_voice:flat returned an embedding of shape \(2, 2\)"):
        speaker.load_speaker_model("toy_voice:flat").embed([bin1])
    with pytest.raises(AttributeError, match="has no function 'missing'"):
        speaker.load_speaker_model("toy_voice:missing")


def test_missing_models_say_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(
        FileNotFoundError, match=r"no-such.pth.*local path to Seed-TTS-eval's wavlm_large_finetune"
    ):
        speaker.load_speaker_model(str(tmp_path / "no-such.pth"))
    with pytest.raises(FileNotFoundError, match=r"'wavlm-sv:/no/such/dir'.*wavlm-sv:PATH"):
        speaker.load_speaker_model("wavlm-sv:/no/such/dir")
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.WavLMForXVector, "from_pretrained", offline)
    with pytest.raises(
        FileNotFoundError,
        match=r"'wavlm-sv' \(microsoft/wavlm-base-plus-sv\) could not be "
        r"found or downloaded.*--speaker-model wavlm-sv:PATH",
    ):
        speaker.load_speaker_model("wavlm-sv")
    for bad in ("whisper", "", None, 3):
        with pytest.raises(ValueError, match="is not 'wavlm-sv'"):
            speaker.load_speaker_model(bad)
    torch.save({"model": {"layer1.conv.weight": torch.zeros(2, 2, 5)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=re.escape("no feature_extract.model.* keys")):
        speaker.load_speaker_model(str(tmp_path / "other.pth"))


def test_sim_reaches_the_metrics():
    """outputs.clip_means averages Score's numeric fields: sim (val_sim) over clips having one."""
    scores = [
        Score(reward=0.5, sim=0.8),
        Score(reward=0.2, sim=0.4),
        Score(reward=0.0, error="x"),
        Score(reward=1.0),
    ]
    means = outputs.clip_means(scores, [0.5, 0.2, 0.0, 1.0], [True] * 4, prefix="val_")
    assert means["val_sim"] == pytest.approx(0.6)
    # never measured: no metric
    assert "sim" not in outputs.clip_means([Score(reward=1.0)], [1.0], [True])
