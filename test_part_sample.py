"""Tests for sample.py: the decode loop against transformers, sampling knobs, errors, the CLI."""
import pytest
import soundfile
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import codec
import data
import sample

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
