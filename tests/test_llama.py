"""llama.py: token sampling and logits processing against transformers', and the speech-only head
(the policy restricted to allowed_ids and renormalized, its chunked log-probs and gradients)."""

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import llama
import models
import sample
from helpers import PROMPTS, VOCAB, left_padded

# ---- sampling and logits processing --------------------------------------------------------------


def test_sample_token_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.log().expand(40000, -1)  # 40000 independent draws in one batch
    draws = llama.sample_token(logits, greedy=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[4] == 0


def test_logits_processing_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, generator=g) * 3
    ids = torch.randint(0, 64, (6, 20), generator=g)
    seen = torch.zeros(6, 64, dtype=torch.bool).scatter_(1, ids, True)
    close = dict(atol=1e-6, rtol=1e-6)

    torch.testing.assert_close(
        llama.apply_repetition_penalty(logits, seen, 1.3),
        RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()),
        **close,
    )
    for k in (1, 5, 64, 100):
        torch.testing.assert_close(
            llama.apply_top_k(logits, k), TopKLogitsWarper(k)(ids, logits.clone()), **close
        )
    for p in (0.05, 0.5, 0.9, 0.999):
        torch.testing.assert_close(
            llama.apply_top_p(logits, p), TopPLogitsWarper(p)(ids, logits.clone()), **close
        )
    torch.testing.assert_close(
        llama.process_logits(logits, temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
        TemperatureLogitsWarper(0.7)(ids, logits.clone()),
        **close,
    )

    # The whole chain, in HF's order: repetition penalty, temperature, top-k, top-p.
    expected = logits.clone()
    for proc in (
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.9),
    ):
        expected = proc(ids, expected)
    got = llama.process_logits(
        logits, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seen=seen
    )
    torch.testing.assert_close(got, expected, **close)
    # the filters did something
    assert torch.isinf(got).any()
    assert torch.isfinite(got).any()


# ---- the speech-only head: the policy restricted to allowed_ids and renormalized (DESIGN.md §2) --

ALLOWED = list(range(100, 160)) + [299]  # holds some prompt ids (100, 150) and one stop id


def masked_hf_greedy(model, prompts, n, allowed, **kw):
    """HF greedy with a logits processor that sets every id outside `allowed` to -inf."""

    def mask(input_ids, scores):
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
        keep[allowed] = True
        return scores.masked_fill(~keep, float("-inf"))

    ids, att = left_padded(prompts)
    out = model.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([mask]),
        **kw,
    )
    return out[:, ids.shape[1] :]


def test_allowed_ids_greedy_equals_masked_hf_generate():
    """Logits of the allowed rows only pick the same tokens as masking the full logits, with a
    stop id, and with the repetition penalty over the allowed ids of prompt and output."""
    model = models.tiny_llama(VOCAB, seed=1)
    n = 24
    free = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, allowed_ids=ALLOWED)
    assert torch.equal(free.tokens, masked_hf_greedy(model, PROMPTS, n, ALLOWED, min_new_tokens=n))
    stop = int(free.tokens[1, 5])  # a stop id row 1 emits mid-way
    ours = sample.generate(
        model, PROMPTS, max_new_tokens=n, temperature=0, allowed_ids=ALLOWED, stop_ids=(stop,)
    )
    assert torch.equal(ours.tokens, masked_hf_greedy(model, PROMPTS, n, ALLOWED, eos_token_id=stop))
    assert ours.finished[1]
    assert int(ours.lengths[1]) <= 6
    pen = sample.generate(
        model, PROMPTS, max_new_tokens=n, temperature=0, allowed_ids=ALLOWED, repetition_penalty=1.5
    )
    # one at a time: in a left-padded batch HF would penalize the pads
    for i, p in enumerate(PROMPTS):
        ref = masked_hf_greedy(model, [p], n, ALLOWED, min_new_tokens=n, repetition_penalty=1.5)[0]
        assert pen.tokens[i].tolist() == ref.tolist()
    assert not torch.equal(pen.tokens, free.tokens)  # the penalty changed something


def test_allowed_ids_logprobs_are_the_restricted_policy():
    """Rollout log-probs with allowed_ids are log_softmax over the allowed ids of a teacher-forced
    forward's logits / T, at the sampled token, whatever top-k and the penalty did to sampling."""
    model = models.tiny_llama(VOCAB, seed=2)
    T = 0.8
    out = sample.generate(
        model,
        PROMPTS * 2,
        max_new_tokens=20,
        temperature=T,
        top_k=10,
        repetition_penalty=1.3,
        stop_ids=(299, 150),
        allowed_ids=ALLOWED,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.finished.any()
    assert not out.finished.all()
    allowed = torch.tensor(sorted(ALLOWED))
    for i, p in enumerate(PROMPTS * 2):
        n = int(out.lengths[i])
        gen = out.tokens[i, :n]
        assert set(gen.tolist()) <= set(ALLOWED)
        with torch.no_grad():
            # [n, V]
            logits = model(torch.tensor([p + gen.tolist()])).logits[0, len(p) - 1 : len(p) - 1 + n]
        restricted = torch.log_softmax(logits[:, allowed] / T, dim=-1)  # [n, A]
        expected = restricted.gather(1, torch.searchsorted(allowed, gen)[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[i, :n], expected, atol=1e-5, rtol=0)
        full = torch.log_softmax(logits / T, dim=-1).gather(1, gen[:, None])[:, 0]
        assert (
            out.logprobs[i, :n] > full + 1e-3
        ).all()  # renormalized: not the full-vocabulary log-probs
        assert (out.logprobs[i, n:] == 0).all()


def direct_logprobs(hidden, weight, targets, temperature):
    """The unchunked reference: [B, T, A] logits at once."""
    return torch.log_softmax(hidden @ weight.T / temperature, dim=-1).gather(
        -1, targets[..., None]
    )[..., 0]


def test_head_logprobs_chunks_equal_the_unchunked_computation():
    """Chunks of 8 over T = 37 (an uneven last chunk): the same log-probs, entropy and gradients
    (w.r.t. hidden and weight) as all logits at once, and backward keeps no [B, T, A] tensor."""
    g = torch.Generator().manual_seed(0)
    B, T, H, A = 2, 37, 16, 50
    temp = 0.7
    targets = torch.randint(0, A, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        weight = (
            torch.randn(A, H, generator=g, dtype=torch.float64).mul(0.3).to(dtype).requires_grad_()
        )
        ref = direct_logprobs(hidden, weight, targets, temp)
        ref_grads = torch.autograd.grad(ref, (hidden, weight), upstream.to(dtype))
        logp, entropy = llama.head_logprobs(
            hidden, weight, targets, temp, chunk=8, with_entropy=True
        )
        grads = torch.autograd.grad(logp, (hidden, weight), upstream.to(dtype))
        assert logp.shape == (B, T)
        assert logp.dtype == dtype
        torch.testing.assert_close(logp, ref, atol=tol, rtol=0)
        # fp32: summation order only, a few ulps of |grad| ~ 10
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=0)
        p = torch.softmax(hidden @ weight.T / temp, dim=-1)
        torch.testing.assert_close(entropy, -(p * p.log()).sum(-1).detach(), atol=tol, rtol=0)
        assert not entropy.requires_grad
        with torch.no_grad():  # the no-grad path (old and reference log-probs) is the same formula
            torch.testing.assert_close(
                llama.head_logprobs(hidden, weight, targets, temp, chunk=8),
                ref.detach(),
                atol=tol,
                rtol=0,
            )

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    # Checkpointed chunks: autograd keeps only the chunks' inputs, never logits ([..., A]).
    kept = saved_shapes(lambda: llama.head_logprobs(hidden, weight, targets, temp, chunk=8))
    assert kept, kept
    assert all(s[-1] != A for s in kept), kept
    # the hook sees them
    assert (B, T, A) in saved_shapes(lambda: direct_logprobs(hidden, weight, targets, temp))


def test_head_rows_train_only_allowed_rows():
    """The trainer's recipe (hidden states of a teacher-forced forward -> head_logprobs over the
    allowed rows) gives the rollout policy's log-probs; only allowed lm_head rows get gradient."""
    model = models.tiny_llama(VOCAB, seed=6)
    allowed_ids = [299] + list(range(159, 99, -1)) + [120]  # any order, duplicates allowed
    weight, index = llama.head_rows(model, allowed_ids)
    assert index.tolist() == sorted(ALLOWED)
    assert weight.shape == (
        len(ALLOWED),
        model.config.hidden_size,
    )
    assert torch.equal(weight, model.lm_head.weight[index])
    tokens = torch.tensor([[150, 101, 299, 0, 0], [100, 159, 159, 120, 299]])  # row 0 right-padded
    valid = tokens != 0
    rows = llama.to_rows(tokens, index, valid)
    assert torch.equal(index[rows][valid], tokens[valid])
    assert (rows[~valid] == 0).all()
    with pytest.raises(ValueError, match=r"token ids \[0\] are not among the 61 allowed ids"):
        llama.to_rows(tokens, index)  # pads not marked invalid are not allowed ids
    prompt = [5, 6, 7, 8]
    ids = torch.cat([torch.tensor([prompt] * 2), tokens], dim=1)  # [2, 9]
    # [2, 5, H]: predicts tokens
    hidden = model.model(input_ids=ids).last_hidden_state[:, len(prompt) - 1 : -1]
    logp = llama.head_logprobs(hidden, weight, rows, 0.9, chunk=2)
    with torch.no_grad():
        logits = model(ids).logits[:, len(prompt) - 1 : -1, index] / 0.9
    torch.testing.assert_close(
        logp, torch.log_softmax(logits, -1).gather(-1, rows[..., None])[..., 0], atol=1e-5, rtol=0
    )
    (logp * valid).sum().backward()
    grad = model.lm_head.weight.grad  # [V, H]
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[index] = False
    assert (grad[outside] == 0).all()
    assert (grad[index].abs().sum(-1) > 0).all()  # every allowed row is in the softmax's gradient
    full, full_index = llama.head_rows(model)  # None: the full head, no copy
    assert full is model.lm_head.weight
    assert torch.equal(full_index, torch.arange(VOCAB))
    with pytest.raises(
        ValueError, match="allowed_ids must be a non-empty set of ids in \\[0, 300\\)"
    ):
        llama.head_rows(model, [5, VOCAB])


def test_head_logits_are_fp32_under_autocast():
    """bf16 autocast would round the head's matmul to bf16 (steps of 0.125 at |logit| 16-32): the
    head computes in fp32 whatever the autocast, and head_logprobs with it."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 64, generator=g) * 4
    w = torch.randn(300, 64, generator=g)
    exact = torch.nn.functional.linear(h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = torch.nn.functional.linear(h, w)
        ours = llama.head_logits(h, w)
        lp = llama.head_logprobs(h[None], w, torch.arange(4)[None], 1.0)
    assert rounded.dtype == torch.bfloat16
    assert (rounded.float() - exact).abs().max() > 0.01
    assert ours.dtype == torch.float32
    assert torch.equal(ours, exact)
    assert torch.allclose(lp[0], llama.token_logprobs(exact, torch.arange(4), 1.0), atol=1e-6)
    assert llama.head_logits(h.double(), w).dtype == torch.float64  # float64 stays
