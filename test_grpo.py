"""The llasa-grpo test suite: CPU, offline, seeded; `python -m pytest -q` at the root runs it all.

This file holds the algorithm and trainer tests (grpo.py); tests/test_<file>.py holds the tests of
the project's <file>.py: test_reward, test_scorer (WhisperScorer, the custom reward), test_worker
(the worker process, its client, the CLI, real Whisper), test_data, test_llama (the speech-only
head, log-probs, logits processing), test_sample (generation against transformers' generate,
loading models, the CLI), test_decode (the static decode step, --compile), test_codec,
test_prosody, test_config, test_parallel (rank agreement, FSDP2), test_memory, test_outputs
(checkpoints, --out and --resume, metrics), test_demo (demo.py, plot.py), test_bench, and
test_layout (the import graph, the length of files). Shared fixtures are in tests/conftest.py,
shared helpers in tests/helpers.py.

Tiny random models stand in for the real ones (a tiny Llama with a LLASA-style tokenizer, a tiny
random Whisper, the tone codec, a small random XCodec2 decoder with a golden file). Tests that need
real speech recognition read Whisper tiny.en and spoken clips from $TEST_ASSETS (default
../shared/assets) and skip with a reason where it is absent.

Here, in order: advantages and loss; log-probs and the update on 1 vs 2 ranks; the trainer end to
end; overlapped rollouts; the prosody guard on toy rewards; failures (loud and safe); the CUDA
paths (each test skips without a CUDA device; `.ci/gpu-check` runs them from this file). Some
names must stay at module level here: mp.spawn's children import `_one_update` from test_grpo
(tests/test_parallel.py uses it, `_fixed_rollouts` and `_port` too), and runs name
`test_grpo:tone_reward`, `test_grpo:short_reward`, `test_grpo:monotone_reward` and
`test_grpo:dying_reward` as their --reward (the Whisper worker imports this file by name).
"""

import contextlib
import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import batch
import codec
import config
import data
import decode
import grpo
import llama
import models
import parallel
import sample
import scorer as scoring
import update
import whisper_worker as ww
from reward import Score

REPO = os.path.dirname(os.path.abspath(__file__))
# tests/helpers.py: for a run of this file alone, and for the child processes that import test_grpo
if os.path.join(REPO, "tests") not in sys.path:
    sys.path.insert(0, os.path.join(REPO, "tests"))
import helpers  # noqa: E402
from helpers import (  # noqa: E402
    COMPILE_TEXTS,
    _FakeScorer,
    _ScriptedScorer,
    _tiny,
    hf_greedy,
    noise,
    read_jsonl,
)

one_thread = helpers.one_thread  # autouse, as tests/conftest.py registers it for tests/


# ==================================================================================================
# grpo.py: the algorithm (advantages, loss, log-probs, update, trainer)
# ==================================================================================================

# ---- advantages and loss -------------------------------------------------------------------------


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = grpo.group_advantages(r, 4)
    g1 = torch.tensor([1.0, 0.0, 0.5, 0.5])
    std = math.sqrt(((g1 - 0.5) ** 2).sum().item() / 3)  # unbiased
    expect = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expect, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: 0, not NaN
    assert torch.allclose(
        grpo.group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, 0.0, 0.0])
    )
    with pytest.raises(ValueError):
        grpo.group_advantages(r, 3)


def _loss(logp, old, adv, mask, **kw):
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return grpo.policy_loss(t(logp), t(old), kw.pop("ref", None), t(adv), t(mask), **kw)


def test_policy_loss_aggregations_by_hand():
    # ratio 1 everywhere: per-token loss = -A. Row 0 has 2 tokens (A=1), row 1 one token (A=-0.5).
    logp = [[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]]
    mask = [[1, 1, 0], [1, 0, 0]]
    adv = [1.0, -0.5]
    loss, st = _loss(logp, logp, adv, mask, agg="token-mean", kl_coef=0.0)
    assert loss.item() == pytest.approx((-1 - 1 + 0.5) / 3)
    loss, _ = _loss(logp, logp, adv, mask, agg="seq-mean-token-mean", kl_coef=0.0)
    assert loss.item() == pytest.approx((-1 + 0.5) / 2)
    loss, _ = _loss(logp, logp, adv, mask, agg="seq-mean-token-sum-norm", kl_coef=0.0, norm_len=4)
    assert loss.item() == pytest.approx((-2 / 4 + 0.5 / 4) / 2)
    loss, _ = _loss(logp, logp, adv, mask, agg="token-mean", kl_coef=0.0, denom=10.0)
    assert loss.item() == pytest.approx(-1.5 / 10)
    assert st["clip_frac"] == 0.0
    assert st["kl"] == 0.0
    with pytest.raises(ValueError):
        _loss(logp, logp, adv, mask, agg="mean")


@pytest.mark.parametrize(
    "log_ratio,adv,expect,clipped",
    [
        (0.5, 1.0, -1.2, 1.0),  # ratio 1.65 > 1+eps, positive advantage: clipped at 1.2
        (0.5, -1.0, math.exp(0.5), 0.0),  # negative advantage: the unclipped (pessimistic) branch
        (math.log(0.5), 1.0, -0.5, 0.0),  # ratio 0.5, positive advantage: unclipped
        (math.log(0.5), -1.0, 0.8, 1.0),  # ratio 0.5, negative advantage: clipped at 0.8
    ],
)
def test_policy_loss_clipping(log_ratio, adv, expect, clipped):
    loss, st = _loss([[log_ratio - 1.0]], [[-1.0]], [adv], [[1]], clip_eps=0.2, kl_coef=0.0)
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert st["clip_frac"] == clipped


def test_policy_loss_kl_k3_and_gradient():
    d = 0.3  # ref - logp
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = logp.detach() + d
    loss, st = grpo.policy_loss(
        logp, logp.detach(), ref, torch.tensor([0.0]), torch.tensor([[1.0, 0.0]]), kl_coef=0.04
    )
    k3 = math.exp(d) - d - 1
    assert st["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(0.04 * k3, rel=1e-5)
    # d/dlogp of 0.04 * (e^(ref-logp) - (ref-logp) - 1) = 0.04 * (1 - e^d); masked token: 0
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(0.04 * (1 - math.exp(d)), rel=1e-5)
    assert logp.grad[0, 1].item() == 0.0


def test_policy_loss_dual_clip_by_hand():
    """verl's dual clip: for A < 0 the per-token loss is capped at -A * clip_ratio_c."""
    mask = torch.ones(1, 1)
    # A = -1, ratio = e^2 = 7.39: PPO alone gives max(7.39, 1.2) = 7.39; dual clip caps it at 3.
    loss, st = grpo.policy_loss(
        torch.tensor([[2.0]]),
        torch.zeros(1, 1),
        None,
        torch.tensor([-1.0]),
        mask,
        clip_eps=0.2,
        kl_coef=0.0,
        clip_ratio_c=3.0,
    )
    assert loss.item() == pytest.approx(3.0)
    assert st["dual_clip_frac"] == 1.0
    assert st["clip_frac"] == 0.0
    # A = -1, ratio = 2: max(2, 1.2) = 2 < 3, no dual clip.
    loss, st = grpo.policy_loss(
        torch.tensor([[math.log(2.0)]]),
        torch.zeros(1, 1),
        None,
        torch.tensor([-1.0]),
        mask,
        clip_eps=0.2,
        kl_coef=0.0,
        clip_ratio_c=3.0,
    )
    assert loss.item() == pytest.approx(2.0)
    assert st["dual_clip_frac"] == 0.0
    # A = +2, ratio = e^2: the PPO clip alone, -min(2 * 7.39, 2 * 1.2) = -2.4;
    # no dual clip for A > 0.
    loss, st = grpo.policy_loss(
        torch.tensor([[2.0]]),
        torch.zeros(1, 1),
        None,
        torch.tensor([2.0]),
        mask,
        clip_eps=0.2,
        kl_coef=0.0,
        clip_ratio_c=3.0,
    )
    assert loss.item() == pytest.approx(-2.4)
    assert st["clip_frac"] == 1.0
    assert st["dual_clip_frac"] == 0.0
    # The log-ratio is clamped at 20: a huge one stays finite (and is dual-clipped for A < 0).
    loss, _ = grpo.policy_loss(
        torch.tensor([[80.0]]),
        torch.zeros(1, 1),
        None,
        torch.tensor([-0.5]),
        mask,
        clip_eps=0.2,
        kl_coef=0.0,
        clip_ratio_c=3.0,
    )
    assert loss.item() == pytest.approx(1.5)
    # Gradient: zero where dual-clipped (the cap is a constant), -A * ratio where not.
    logp = torch.tensor([[2.0, math.log(2.0)]], requires_grad=True)
    loss, _ = grpo.policy_loss(
        logp,
        torch.zeros(1, 2),
        None,
        torch.tensor([-1.0]),
        torch.ones(1, 2),
        clip_eps=0.2,
        kl_coef=0.0,
        clip_ratio_c=3.0,
    )
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 2.0 / 2])


def test_policy_loss_clip_higher_by_hand():
    """--clip-eps-high (DAPO's clip-higher): clip(ratio, 1 - eps, 1 + eps_high); same low side."""
    mask = torch.ones(1, 2)
    # A = +1: ratio 1.25 is inside [0.8, 1.28] (unclipped, gradient -A * ratio); ratio e^0.3 = 1.35
    # is clipped at 1.28 (gradient 0). Token mean over 2 tokens.
    logp = torch.tensor([[math.log(1.25), 0.3]], requires_grad=True)
    loss, st = grpo.policy_loss(
        logp,
        torch.zeros(1, 2),
        None,
        torch.tensor([1.0]),
        mask,
        clip_eps=0.2,
        clip_eps_high=0.28,
        kl_coef=0.0,
    )
    assert loss.item() == pytest.approx((-1.25 - 1.28) / 2, abs=1e-6)
    assert st["clip_frac"] == 0.5
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.25 / 2, 0.0], abs=1e-6)
    # Unset, the high bound is --clip-eps: both tokens clipped at 1.2, no gradient.
    logp.grad = None
    loss, st = grpo.policy_loss(
        logp, torch.zeros(1, 2), None, torch.tensor([1.0]), mask, clip_eps=0.2, kl_coef=0.0
    )
    loss.backward()
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert st["clip_frac"] == 1.0
    assert logp.grad.tolist()[0] == [0.0, 0.0]
    # The low side: ratio 0.5 with A = -1 is clipped at 1 - eps = 0.8 whatever eps_high.
    loss, _ = _loss(
        [[math.log(0.5)]], [[0.0]], [-1.0], [[1]], clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.0
    )
    assert loss.item() == pytest.approx(0.8, abs=1e-6)


def _gspo_reference(logp, old, adv, mask, lo, hi):
    """GSPO's objective written directly at the sequence level (paper eq. 5, as a loss):
    s_i = exp(mean over sequence i's tokens of logp - old),
    loss = mean_i max(-A s_i, -A clip(s_i, 1 - lo, 1 + hi))."""
    s = torch.exp(((logp - old) * mask).sum(1) / mask.sum(1))
    return torch.maximum(-adv * s, -adv * s.clamp(1 - lo, 1 + hi)).mean(), s


def test_policy_loss_gspo_caps_a_stale_sequence_like_verl():
    """verl's compute_policy_loss_gspo caps log s_i at 10: a sequence that drifted far (log-ratio
    15, A < 0, possible with --updates-per-rollout > 1) costs |A| e^10 per token and pushes no
    gradient; one below the cap keeps its gradient -A s_i / |y_i| / B."""
    mask = torch.ones(2, 2)
    old = torch.tensor([[-3.0, -4.0], [-1.0, -1.0]])
    logp = (old + torch.tensor([[15.0, 15.0], [0.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([-1.0, -1.0])
    loss, _ = grpo.policy_loss(
        logp,
        old,
        None,
        adv,
        mask,
        kl_coef=0.0,
        agg="seq-mean-token-mean",
        importance_level="sequence",
    )
    loss.backward()
    assert loss.item() == pytest.approx((math.exp(10.0) + math.exp(0.5)) / 2, rel=1e-6)
    assert logp.grad[0].tolist() == [0.0, 0.0]
    assert logp.grad[1].tolist() == pytest.approx([math.exp(0.5) / 2 / 2] * 2, rel=1e-6)


@pytest.mark.parametrize("lo,hi", [(0.2, 0.28), (3e-4, 4e-4)])  # GSPO's paper: 3e-4 / 4e-4
def test_policy_loss_gspo_sequence_ratio_values_and_gradients(lo, hi):
    """--importance-level sequence: one ratio per sequence, clipped per sequence; value and gradient
    equal the sequence-level formula's: d/dlogp_t = -A_i s_i / |y_i| / B where s_i is unclipped."""
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1]])
    base = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0], [-0.4, -0.9, -1.6]])
    # logp - old per token; row 1's masked token is far off and must not count
    delta = torch.tensor([[0.05, 0.15, 0.1], [-0.1, -0.02, 5.0], [1e-4, -1e-4, 2e-4]])
    old = base - delta
    adv = torch.tensor([1.0, -0.5, 0.7])
    logp = base.clone().requires_grad_(True)
    loss, st = grpo.policy_loss(
        logp,
        old,
        None,
        adv,
        mask,
        clip_eps=lo,
        clip_eps_high=hi,
        kl_coef=0.0,
        agg="seq-mean-token-mean",
        importance_level="sequence",
    )
    loss.backward()
    ref_logp = base.clone().requires_grad_(True)
    ref, s = _gspo_reference(ref_logp, old, adv, mask, lo, hi)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(logp.grad, ref_logp.grad, atol=1e-6)
    # By hand: s = exp([0.1, -0.06, 6.67e-5]); a clipped sequence has no gradient.
    assert s.tolist() == pytest.approx(
        [math.exp(0.1), math.exp(-0.06), math.exp(2e-4 / 3)], rel=1e-5
    )
    clipped = [
        bool((s[i] > 1 + hi and adv[i] > 0) or (s[i] < 1 - lo and adv[i] < 0)) for i in range(3)
    ]
    assert clipped == ([False, False, False] if lo == 0.2 else [True, True, False])
    lengths = mask.sum(1)
    for i in range(3):
        g = 0.0 if clipped[i] else (-adv[i] * s[i] / lengths[i] / 3).item()
        assert logp.grad[i].tolist() == pytest.approx((g * mask[i]).tolist(), abs=1e-7)
    assert st["clip_frac"] == pytest.approx(
        sum(c * n for c, n in zip(clipped, lengths.tolist())) / 8
    )
    assert st["dual_clip_frac"] == 0.0
    # Token-level on the same numbers differs (per-token ratios); on-policy both are the same loss.
    tok, _ = grpo.policy_loss(
        base,
        old,
        None,
        adv,
        mask,
        clip_eps=lo,
        clip_eps_high=hi,
        kl_coef=0.0,
        agg="seq-mean-token-mean",
    )
    # (GSPO's tiny range clips both alike here)
    assert abs(tok.item() - loss.item()) > 1e-6 or lo != 0.2
    on_seq, _ = grpo.policy_loss(
        base, base, None, adv, mask, kl_coef=0.0, importance_level="sequence"
    )
    on_tok, _ = grpo.policy_loss(base, base, None, adv, mask, kl_coef=0.0)
    assert on_seq.item() == pytest.approx(on_tok.item(), abs=1e-7)
    with pytest.raises(ValueError):
        grpo.policy_loss(base, old, None, adv, mask, importance_level="seq")


def test_tis_weights_cap_and_fraction_by_hand():
    """--tis-cap: w = min(exp(old - rollout), cap), detached, 1 on padding; it weights the
    policy-gradient term only (not the KL), and its token mean and capped fraction are reported."""
    old = torch.zeros(2, 3)
    # old - rollout = log of these
    rollout = -torch.log(torch.tensor([[0.5, 1.5, 3.0], [1.0, 0.25, 100.0]]))
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    w, capped = grpo.tis_weights(old, rollout, mask, 2.0)
    # padding: 1
    assert w.tolist() == [pytest.approx([0.5, 1.5, 2.0]), pytest.approx([1.0, 0.25, 1.0])]
    assert capped.tolist() == [[False, False, True], [False, False, False]]
    # In the loss, on-policy (ratio 1), A = [1, -2]: per-token pg loss -A * w; KL term unweighted.
    logp = old.clone().requires_grad_(True)
    ref = logp.detach() + 0.3
    adv = torch.tensor([1.0, -2.0])
    loss, st = grpo.policy_loss(
        logp, old, ref, adv, mask, kl_coef=0.1, rollout_logp=rollout, tis_cap=2.0
    )
    k3 = math.exp(0.3) - 0.3 - 1
    pg = -1 * (0.5 + 1.5 + 2.0) + 2 * (1.0 + 0.25)
    assert loss.item() == pytest.approx((pg + 5 * 0.1 * k3) / 5, rel=1e-5)
    assert st["tis_weight_mean"] == pytest.approx((0.5 + 1.5 + 2.0 + 1.0 + 0.25) / 5)
    assert st["tis_capped_frac"] == pytest.approx(1 / 5)
    assert st["kl"] == pytest.approx(k3, rel=1e-5)
    loss.backward()  # d/dlogp: -A * w * ratio (ratio 1) + 0.1 * (1 - e^0.3), over 5 tokens
    kl_g = 0.1 * (1 - math.exp(0.3))
    expect = [
        [(-0.5 + kl_g) / 5, (-1.5 + kl_g) / 5, (-2.0 + kl_g) / 5],
        [(2.0 + kl_g) / 5, (0.5 + kl_g) / 5, 0.0],
    ]
    assert logp.grad.tolist() == [pytest.approx(r, abs=1e-6) for r in expect]
    # Off (cap 0) or without rollout log-probs: no weights, no TIS stats.
    for kw in (dict(rollout_logp=rollout, tis_cap=0.0), dict(rollout_logp=None, tis_cap=2.0)):
        plain, st = grpo.policy_loss(old, old, None, adv, mask, kl_coef=0.0, **kw)
        assert plain.item() == pytest.approx((-3 + 4) / 5)
        assert "tis_weight_mean" not in st


# ---- log-probs and the update on 1 vs 2 ranks ----------------------------------------------------


def test_response_logprobs_match_generate():
    """The trainer's teacher-forced log-probs equal the rollout's: importance ratios start at 1."""
    tok = data.tiny_tokenizer()
    sv = data.speech_vocab(tok)
    model = models.tiny_llama(len(tok), seed=3)
    prompts = [data.prompt_ids(tok, t) for t in ["One.", "Two words here.", "셋"]]
    for allowed in (sv.allowed_ids(), None):  # the speech-only policy, and the whole vocabulary
        roll = sample.generate(
            model,
            prompts,
            max_new_tokens=12,
            temperature=0.8,
            stop_ids=(sv.end_id,),
            allowed_ids=allowed,
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            logp = llama.response_logprobs(model, prompts, roll.tokens, 0.8, allowed_ids=allowed)
        mask = torch.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]
        assert torch.allclose(logp[mask], roll.logprobs[mask], atol=1e-4)


def _fixed_rollouts(seed=0, vocab=None):
    tok = data.tiny_tokenizer()
    g = torch.Generator().manual_seed(seed)
    sv = data.speech_vocab(tok)
    prompts = [
        data.prompt_ids(tok, t)
        for t in ["Hello.", "A longer sentence here.", "Hi", "안녕"]
        for _ in range(2)
    ]
    B, T = len(prompts), 7
    tokens = torch.randint(sv.first, sv.first + sv.n, (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4])
    rewards = torch.rand(B, generator=g)
    return tok, grpo.TrainBatch(prompts, tokens, lengths, grpo.group_advantages(rewards, 2))


def _port():
    """A free port for a rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_share(rank, world, init_method):
    """In a spawned rank: one thread, the gloo group (world > 1), and (tokenizer, this rank's share
    of `_fixed_rollouts`); world 1 = all of them."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    tok, ro = _fixed_rollouts()
    share = slice(rank * len(ro.prompts) // world, (rank + 1) * len(ro.prompts) // world)
    return tok, grpo.TrainBatch(
        ro.prompts[share], ro.tokens[share], ro.lengths[share], ro.advantages[share]
    )


def _one_update(rank, world, init_method, out_file, agg, updates=2):
    """One GRPO update over this rank's share of fixed rollouts; world 1 = all of them."""
    tok, ro = _rank_share(rank, world, init_method)
    policy = models.tiny_llama(len(tok), seed=1).train()
    # a different reference, so the KL term has a gradient
    ref = models.tiny_llama(len(tok), seed=2)
    cfg = config.Config(
        kl_coef=0.1,
        micro_batch=3,
        updates_per_rollout=updates,
        loss_agg=agg,
        temperature=0.8,
        lr=1e-3,
        grad_clip=1.0,
        max_new_tokens=7,
    )
    # SGD, not AdamW: Adam divides by sqrt(v) + eps, which turns the float-rounding noise of a
    # different summation order (~1e-9) in near-zero gradients into ~1e-5 parameter noise.
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = grpo.update_policy(
        policy,
        ref,
        opt,
        sched,
        ro,
        cfg,
        parallel.Dist(rank=rank, world=world),
        contextlib.nullcontext,
    )
    if rank == 0:
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in policy.named_parameters()},
                "stats": stats,
            },
            out_file,
        )
    if world > 1:  # small buckets: several collectives, each gradient summed exactly once
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (700, 5, 1300, 1)]
        for p in params:
            p.grad = torch.full_like(p, float(rank + 1)) * torch.arange(p.numel())
        parallel.sync_gradients(params, parallel.Dist(rank=rank, world=world), bucket_numel=1000)
        assert all(torch.equal(p.grad, 3.0 * torch.arange(p.numel()).float()) for p in params)
        dist.barrier()  # nobody tears gloo down while a peer is still talking to it
        dist.destroy_process_group()
        # Skip interpreter teardown: a gloo thread of this short-lived child has been seen to abort
        # there ("terminate called without an active exception") after all the work was done.
        sys.stdout.flush()
        os._exit(0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_two_ranks_equals_one(tmp_path, agg):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _one_update(0, 1, None, one, agg)
    mp.spawn(_one_update, args=(2, f"tcp://127.0.0.1:{_port()}", two, agg), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    for k in a["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], atol=1e-6, rtol=0), k
    assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], abs=1e-6)
    assert a["stats"]["kl"] == pytest.approx(b["stats"]["kl"], rel=1e-5)
    init = models.tiny_llama(len(_fixed_rollouts()[0]), seed=1).state_dict()
    # the step did move the weights
    assert any(not torch.equal(init[k], a["params"][k]) for k in init)


def test_grad_checkpointing_gives_the_same_update():
    tok, ro = _fixed_rollouts()
    params = []
    for checkpointing in (False, True):
        policy = models.tiny_llama(len(tok), seed=1).train()
        if checkpointing:
            getattr(
                policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable
            )()
            assert policy.model.gradient_checkpointing
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        grpo.update_policy(
            policy,
            None,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            ro,
            config.Config(kl_coef=0.0, micro_batch=4),
            parallel.Dist(),
            contextlib.nullcontext,
        )
        # SGD: same step = same grads
        params.append({k: p.detach().clone() for k, p in policy.named_parameters()})
    for k in params[0]:
        assert torch.allclose(params[0][k], params[1][k], atol=1e-7), k


def test_policy_loss_tensor_stats_equal_float_stats():
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(3, 5, generator=g) for _ in range(3))
    adv = torch.randn(3, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    loss, floats = grpo.policy_loss(logp, old, ref, adv, mask, kl_coef=0.1)
    loss_t, tensors = grpo.policy_loss(logp, old, ref, adv, mask, kl_coef=0.1, tensor_stats=True)
    assert torch.equal(loss, loss_t)
    assert set(floats) == set(tensors)
    assert all(
        torch.is_tensor(v) and v.dim() == 0 and v.item() == floats[k] for k, v in tensors.items()
    )
    # values, not just zeros, compared
    assert floats["dual_clip_frac"] > 0
    assert floats["kl"] > 0


def _speech_update(micro_batch, logprobs=None, **cfg_kw):
    """update_policy over the fixed rollouts with the speech-only head; returns its stats."""
    tok, ro = _fixed_rollouts()
    ro.logprobs = logprobs
    policy = models.tiny_llama(len(tok), seed=1).train()
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    cfg = config.Config(
        kl_coef=0.0, micro_batch=micro_batch, temperature=0.8, max_new_tokens=7, **cfg_kw
    )
    return grpo.update_policy(
        policy,
        None,
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        ro,
        cfg,
        parallel.Dist(),
        contextlib.nullcontext,
        data.speech_vocab(tok).allowed_ids(),
    )


def test_update_host_syncs_do_not_grow_with_micro_batches(monkeypatch):
    """Every read of a tensor's value on the host (item, tolist, bool, int, float, cpu) waits for a
    GPU: the update's own code does a few per step, none per micro-batch (8 micro-batches of 1 do
    what 1 of 8 does). Counted where our code reads them; transformers' forward checks its
    position ids for packed sequences once per pass, which is its own."""
    ours = {os.path.join(helpers.REPO, f) for f in ("grpo.py", "llama.py", "parallel.py")}
    counts = []
    for micro_batch in (8, 1):
        calls = Counter()
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
            real = getattr(torch.Tensor, name)

            def counted(self, *a, _real=real, _name=name, _calls=calls, **kw):
                if sys._getframe(1).f_code.co_filename in ours:
                    _calls[_name] += 1
                return _real(self, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)
        _speech_update(micro_batch)
        monkeypatch.undo()
        counts.append(dict(calls))
    assert counts[0] == counts[1], counts
    assert 0 < sum(counts[0].values()) <= 16, counts[0]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_trains_on_kept_rows_only(agg):
    """Rows with keep False (--dynamic-sampling's fill) change nothing: the update equals the one
    on the kept rows alone; with none kept, the gradient is 0 (not 0 / 0)."""
    tok, ro = _fixed_rollouts()
    keep = torch.tensor([True, True, False, False, True, True, False, False])
    rows = keep.nonzero().flatten().tolist()
    alone = grpo.TrainBatch(
        [ro.prompts[i] for i in rows], ro.tokens[keep], ro.lengths[keep], ro.advantages[keep]
    )
    cfg = config.Config(kl_coef=0.1, micro_batch=3, temperature=0.8, max_new_tokens=7, loss_agg=agg)
    out = []
    for r in (
        grpo.TrainBatch(ro.prompts, ro.tokens, ro.lengths, ro.advantages, keep=keep),
        alone,
        grpo.TrainBatch(
            ro.prompts, ro.tokens, ro.lengths, ro.advantages, keep=torch.zeros(8, dtype=torch.bool)
        ),
    ):
        policy = models.tiny_llama(len(tok), seed=1).train()
        opt = torch.optim.SGD(policy.parameters(), lr=0.5)
        stats = grpo.update_policy(
            policy,
            models.tiny_llama(len(tok), seed=2),
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            r,
            cfg,
            parallel.Dist(),
            contextlib.nullcontext,
        )
        out.append((stats, dict(policy.named_parameters())))
    (a, pa), (b, pb), (c, _) = out
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-6)
    assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-6)
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-7), k
    assert c["loss"] == 0.0
    assert c["grad_norm"] == 0.0
    # and takes no optimizer step: AdamW's weight decay would otherwise move the weights
    policy = models.tiny_llama(len(tok), seed=1).train()
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    opt = torch.optim.AdamW(policy.parameters(), lr=0.1, weight_decay=0.5)
    grpo.update_policy(
        policy,
        None,
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        grpo.TrainBatch(
            ro.prompts, ro.tokens, ro.lengths, ro.advantages, keep=torch.zeros(8, dtype=torch.bool)
        ),
        config.Config(kl_coef=0.0, micro_batch=3),
        parallel.Dist(),
        contextlib.nullcontext,
    )
    assert all(torch.equal(before[k], v) for k, v in policy.named_parameters())


def test_logp_mismatch_measures_rollout_against_training_logprobs():
    """logp_mismatch: mean and max |rollout - training| log-prob over response tokens (padding
    ignored): exactly the offset put into the rollout's log-probs."""
    tok, ro = _fixed_rollouts()
    policy = models.tiny_llama(len(tok), seed=1)
    with torch.no_grad():
        train = llama.response_logprobs(
            policy, ro.prompts, ro.tokens, 0.8, allowed_ids=data.speech_vocab(tok).allowed_ids()
        )
    mask = torch.arange(ro.tokens.shape[1])[None, :] < ro.lengths[:, None]
    offset = torch.where(mask, 0.25, 100.0)  # padding far off: it must not count
    offset[0, 0] = -0.75  # the largest gap, on a response token
    stats = _speech_update(8, logprobs=train + offset)
    n = int(mask.sum())
    assert stats["logp_mismatch"] == pytest.approx(((n - 1) * 0.25 + 0.75) / n, abs=1e-5)
    assert stats["logp_mismatch_max"] == pytest.approx(0.75, abs=1e-5)
    assert "logp_mismatch" not in _speech_update(8)  # no rollout log-probs, no figure


@pytest.mark.parametrize("micro_batch", [8, 3])
def test_update_reports_tis_weights_over_micro_batches(micro_batch):
    """--tis-cap in the update: w = min(exp(training - rollout log-prob), cap) (one update:
    old = the training pass), token means over every micro-batch; nothing without --tis-cap or
    rollout log-probs."""
    tok, ro = _fixed_rollouts()
    with torch.no_grad():
        train = llama.response_logprobs(
            models.tiny_llama(len(tok), seed=1),
            ro.prompts,
            ro.tokens,
            0.8,
            allowed_ids=data.speech_vocab(tok).allowed_ids(),
        )
    mask = torch.arange(ro.tokens.shape[1])[None, :] < ro.lengths[:, None]
    offset = torch.where(mask, math.log(2.0), -100.0)  # w = 0.5; padding far off: it must not count
    offset[0, 0] = -math.log(3.0)  # w = 3, capped at 2
    stats = _speech_update(
        micro_batch, logprobs=train + offset, tis_cap=2.0, importance_level="sequence"
    )
    n = int(mask.sum())
    assert stats["tis_weight_mean"] == pytest.approx((2.0 + (n - 1) * 0.5) / n, abs=1e-5)
    assert stats["tis_capped_frac"] == pytest.approx(1 / n)
    assert "tis_weight_mean" not in _speech_update(micro_batch, logprobs=train + offset)
    assert "tis_weight_mean" not in _speech_update(micro_batch, tis_cap=2.0)


# ---- the trainer end to end ----------------------------------------------------------------------


def tone_reward(audio, text):
    """Toy reward with a known optimum: the fraction of 20 ms frames of the tone codec's audio whose
    pitch (by zero crossings) is below 400 Hz, i.e. codes below about 20 of 64.
    All-low speech earns 1; silence earns 0."""
    n = len(audio) // 320
    if n == 0:
        return 0.0
    frames = audio[: n * 320].reshape(n, 320)
    crossings = (np.diff(np.sign(frames), axis=1) != 0).sum(axis=1)  # ~ 2 * f * 0.02 s
    return float(np.mean(crossings / 2 / 0.02 < 400))


def test_tone_reward_knows_its_optimum():
    low, high = codec.ToneCodec().decode([[0, 5, 15, 3], [40, 50, 63, 30]])
    assert tone_reward(low, "x") == 1.0
    assert tone_reward(high, "x") == 0.0
    assert tone_reward(np.zeros(0, np.float32), "x") == 0.0


def test_tiny_preset_learns_a_toy_reward(tmp_path):
    """On the tiny preset, GRPO raises the mean reward of a reward whose optimum is known."""
    cfg = _tiny(
        tmp_path,
        "--reward",
        f"{__name__}:tone_reward",
        "--steps",
        "30",
        "--val-data",
        "",
        "--kl-coef",
        "0",
        "--lr",
        "3e-3",
        "--sample-every",
        "100",
        "--save-every",
        "100",
    )
    hist = grpo.train(cfg)
    rewards = [m["reward_mean"] for m in hist]
    assert all(math.isfinite(r) for r in rewards)
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.25, (first, last, rewards)


def test_validation_in_training_sized_chunks(tmp_path):
    # chunks of 2 of the 6 val texts
    cfg = _tiny(tmp_path, "--prompts-per-step", "1", "--group-size", "2")
    calls = []

    class Counting(_FakeScorer):
        def score(self, audios, texts, languages=None):
            calls.append(len(audios))
            return super().score(audios, texts, languages)

    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), Counting(0.5))
    val, shown = tr.validate()
    assert calls == [2, 2, 2]
    assert shown["texts"] == [ex.text for ex in tr.val_examples[: cfg.n_samples]]
    assert len(shown["audios"]) == 2
    assert 0 < val["val_finished"] <= 1
    assert val["val_reward"] == pytest.approx(0.5 * val["val_finished"])


def test_trainer_logp_mismatch_is_zero_on_cpu(tmp_path):
    """The rollout's log-probs (decode loop, KV cache) and the update's (one teacher-forced pass)
    are the same fp32 formula: on a CPU they agree to float rounding."""
    tr = grpo.Trainer(
        _tiny(tmp_path, "--val-data", ""), parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5)
    )
    metrics, _ = tr.train_step(0)
    assert 0 <= metrics["logp_mismatch"] < 1e-5, metrics
    assert metrics["logp_mismatch_max"] < 1e-4, metrics


def half_flat_reward(audio, text):
    """A reward that is the same for every sample of an even-length text (groups that teach nothing,
    for --dynamic-sampling to drop) and tone_reward otherwise."""
    return 0.5 if len(text) % 2 == 0 else tone_reward(audio, text)


def test_trainer_dynamic_sampling_trains_on_informative_groups(tmp_path, monkeypatch):
    """--dynamic-sampling: a step whose groups are mostly flat runs refill rounds, and the update
    gets a full batch whose trained rows all belong to groups with unequal rewards."""
    cfg = _tiny(tmp_path, "--val-data", "", "--dynamic-sampling", "--max-refill-rounds", "4")
    first = [
        ex.text for ex in data.step_examples(data.load_dataset(cfg.data), 0, cfg, parallel.Dist())
    ]

    # step 0's first three prompts score 0 (truncated too), others by length
    class Flat(_FakeScorer):
        def score(self, audios, texts, languages=None):
            return [
                Score(reward=0.0 if t in first[:3] else len(a) % 997 / 997)
                for a, t in zip(audios, texts)
            ]

    seen = []
    real = grpo.update_policy

    def update_policy(*a, **k):
        seen.append(a[4])  # the rollouts
        return real(*a, **k)

    monkeypatch.setattr(grpo, "update_policy", update_policy)
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), Flat(0.5))
    metrics, _ = tr.train_step(0)
    ro = seen[0]
    assert metrics["dyn_rounds"] >= 2
    assert ro.tokens.shape[0] == cfg.prompts_per_step * cfg.group_size
    assert metrics["dyn_rollouts_per_kept_group"] == pytest.approx(
        metrics["dyn_rounds"] * cfg.prompts_per_step * cfg.group_size / metrics["dyn_groups_kept"]
    )
    groups = ro.advantages.view(-1, cfg.group_size).cpu()
    kept = ro.keep.view(-1, cfg.group_size)[:, 0]
    assert kept.sum() == metrics["dyn_groups_kept"]
    assert (groups[kept].abs().sum(dim=1) > 0).all()
    assert (groups[~kept] == 0).all()


def test_trainer_step_with_the_peer_recipe_flags(tmp_path):
    """A step with clip-higher, GSPO's sequence ratio and TIS: on a CPU the rollout's and the
    update's log-probs agree, so every TIS weight is 1 and none is capped."""
    cfg = _tiny(
        tmp_path,
        "--val-data",
        "",
        "--clip-eps-high",
        "0.28",
        "--importance-level",
        "sequence",
        "--loss-agg",
        "seq-mean-token-mean",
        "--tis-cap",
        "2",
    )
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    metrics, _ = tr.train_step(0)
    assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["tis_capped_frac"] == 0.0
    assert math.isfinite(metrics["loss"])


class _PromptScorer(_FakeScorer):
    """Records what it is asked; sim = 1 for clips of the "low" voice's prompt, 0 otherwise."""

    def __init__(self):
        super().__init__(0.5)
        self.prompts = []

    def score(self, audios, texts, languages=None, prompts=None):
        self.prompts.append(prompts)
        return [
            Score(reward=0.5, sim=None if p is None else float(p.mean() < 0.01))
            for p in prompts or [None] * len(audios)
        ]


def test_clone_rollouts_continue_after_the_prompt_voice(tmp_path):
    """With voice prompts: each prompt's audio is encoded once per run, the rollout prompt is
    LLASA's clone prompt ending in the prompt's speech tokens, only generated tokens come back (and
    are what is trained and heard), the scorer gets each clip's prompt audio, and the tone codec's
    seam cut (--prompt-decode context) gives exactly the audio decoded alone."""
    cfg = _tiny(
        tmp_path,
        "--data",
        os.path.join(helpers.REPO, "data", "clone", "train.jsonl"),
        "--val-data",
        "",
    )
    scorer = _PromptScorer()
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), scorer)
    encodes = []
    real = tr.sampler.codec.encode

    def encode(audios):
        encodes.append(len(audios))
        return real(audios)

    tr.sampler.codec.encode = encode
    for step in range(2):
        metrics, _ = tr.train_step(step)
    assert encodes == [1, 1]  # two distinct prompt recordings, each encoded once in two steps
    ex = tr.examples[0]
    codes = codec.ToneCodec().encode([data.read_audio(ex.prompt_wav)])[0]
    sv = data.speech_vocab(tr.tokenizer)
    ids = tr.sampler.prompt(ex)
    assert ids == data.prompt_ids(tr.tokenizer, ex.text, ex.prompt_text, codes)
    assert ids[-len(codes) :] == [sv.first + c for c in codes]
    assert ids[-len(codes) - 1] == sv.start_id
    prompts = scorer.prompts[-1]
    assert len(prompts) == 16
    assert all(p is not None and len(p) == 30 * codec.SAMPLES_PER_CODE for p in prompts)
    assert metrics["sim"] == pytest.approx(np.mean([float(p.mean() < 0.01) for p in prompts]))
    roll = tr.sampler.rollout([ex, tr.examples[1]], torch.Generator().manual_seed(0))
    assert int(roll.lengths.max()) <= cfg.max_new_tokens  # the generated part only
    alone = tr.sampler.decode_audio(roll, [ex, tr.examples[1]])
    # Whisper hears just the generated codes (stop token aside): 320 samples each, no prompt audio.
    assert [len(a) for a in alone] == [
        (int(n) - int(f)) * codec.SAMPLES_PER_CODE for n, f in zip(roll.lengths, roll.finished)
    ]
    tr.cfg.prompt_decode = "context"
    for a, b in zip(alone, tr.sampler.decode_audio(roll, [ex, tr.examples[1]])):
        np.testing.assert_array_equal(a, b)


def test_sim_weight_adds_a_separately_normalized_advantage():
    """GLM-TTS's combination: each reward normalized within its group, then weighted and summed; a
    clip without a similarity (or truncated) takes its group's mean, adding nothing."""
    scores = [Score(reward=r, sim=s) for r, s in [(0.2, 0.9), (0.4, 0.5), (0.6, None), (0.8, 0.7)]]
    finished = torch.tensor([True, True, True, False])
    sims = batch.step_sims(scores, finished, 4)
    # None and truncated: the mean of 0.9, 0.5
    assert sims.tolist() == pytest.approx([0.9, 0.5, 0.7, 0.7])
    adv = grpo.group_advantages(
        torch.tensor([0.2, 0.4, 0.6, 0.8]), 4
    ) + 0.5 * grpo.group_advantages(sims, 4)
    mean = 0.7
    std = float(torch.tensor([0.9, 0.5, 0.7, 0.7]).std())
    assert adv[0].item() == pytest.approx(
        -0.3 / 0.2582 + 0.5 * (0.9 - mean) / (std + 1e-6), rel=1e-3
    )


class _VaryingScorer(_FakeScorer):
    """Rewards and similarities differing clip by clip (from the audio), for the advantage test."""

    def score(self, audios, texts, languages=None, prompts=None):
        return [
            Score(reward=float(np.abs(a).mean()) if len(a) else 0.0, sim=(len(a) % 7) / 7)
            for a in audios
        ]


def test_trainer_step_with_sim_weight_trains_on_both_normalized_advantages(tmp_path, monkeypatch):
    """A train_step with --sim-weight 0.5: the advantages the update receives are, group by group,
    (r - mean) / (std + eps) + 0.5 (sim - mean) / (std + eps), computed here by hand from the step's
    rewards and similarities."""
    cfg = _tiny(
        tmp_path,
        "--data",
        os.path.join(helpers.REPO, "data", "clone", "train.jsonl"),
        "--val-data",
        "",
        "--sim-weight",
        "0.5",
    )
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _VaryingScorer(0.0))
    rounds = []
    seen = []
    real_round = tr.scored_round
    real_update = grpo.update_policy

    def scored_round(*a, **k):
        rounds.append(real_round(*a, **k))
        return rounds[-1]

    def update_policy(pol, ref, opt, sch, ro, *a):
        seen.append(ro.advantages)
        return real_update(pol, ref, opt, sch, ro, *a)

    monkeypatch.setattr(tr, "scored_round", scored_round)
    monkeypatch.setattr(grpo, "update_policy", update_policy)
    tr.train_step(0)
    G = cfg.group_size
    r = rounds[0].rewards.double().view(-1, G).numpy()
    sims = rounds[0].sims.double().view(-1, G).numpy()
    # both terms act
    assert np.ptp(sims, axis=1).max() > 0
    assert np.ptp(r, axis=1).max() > 0

    def norm(x):
        return (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-6)

    # float32 in the trainer
    np.testing.assert_allclose(
        seen[0].double().numpy(), (norm(r) + 0.5 * norm(sims)).reshape(-1), rtol=1e-3, atol=1e-5
    )


def test_disallowed_lm_head_rows_never_change(tmp_path):
    """The policy is speech-only: after a training step, lm_head rows of text tokens are untouched
    (AdamW with no gradient moves nothing), and some speech rows did move."""

    class Varied(_FakeScorer):
        def score(self, audios, texts, languages=None):
            return [Score(reward=float(len(a) % 7) / 7) for a in audios]

    cfg = _tiny(tmp_path, "--val-data", "", "--kl-coef", "0")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), Varied(0.0))
    before = tr.policy.lm.lm_head.weight.detach().clone()
    tr.train_step(0)
    after = tr.policy.lm.lm_head.weight.detach()
    allowed = torch.zeros(len(before), dtype=torch.bool)
    allowed[tr.sampler.allowed_ids] = True
    assert torch.equal(before[~allowed], after[~allowed])
    assert not torch.equal(before[allowed], after[allowed])


def test_torchrun_two_ranks_tiny_preset(tmp_path):
    """The smoke test a new user runs: 2 ranks + the Whisper worker process, offline on CPU."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(REPO, "grpo.py"),
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--out",
        str(out),
        "--save-every",
        "2",
        "--sample-every",
        "2",
        "--val-every",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [0, 1, 2]  # 0: the validation before any update
    assert math.isfinite(lines[0]["val_reward"])
    assert "reward_mean" not in lines[0]
    # eval.py's WER/CER (outputs.table_metrics)
    assert any(k.startswith("val_table_") for k in lines[0])
    for m in lines[1:]:
        for key in (
            "reward_mean",
            "loss",
            "kl",
            "entropy",
            "cer",
            "nll",
            "tokens_per_s",
            "time_reward",
        ):
            assert math.isfinite(m[key]), (key, m)
    assert "val_reward" in lines[-1]
    samples = out / "samples" / "step_2"
    assert (samples / "0.wav").exists()
    with open(samples / "samples.jsonl") as f:
        assert len(f.readlines()) == 2
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_2")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torchrun_two_ranks_tiny_clone_preset(tmp_path):
    """The voice-cloning path on 2 ranks: prompts encoded, speaker similarity from the worker in the
    metrics (sim, val_sim) and in samples.jsonl."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(REPO, "grpo.py"),
        "--preset",
        "tiny-clone",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert all(-1 <= m["sim"] <= 1 for m in lines[1:])
    assert -1 <= lines[0]["val_sim"] <= 1
    rows = read_jsonl(out / "samples" / "step_2" / "samples.jsonl")
    assert rows
    assert all(-1 <= r["sim"] <= 1 for r in rows)


# ---- overlapped rollouts and rewards -------------------------------------------------------------


class SlowScorer:
    """A deterministic reward that takes time, like Whisper: the fraction of low codes' energy."""

    def __init__(self, seconds=0.0):
        self.seconds = seconds
        self.calls = []

    def score(self, audios, texts, languages=None):
        self.calls.append(len(audios))
        time.sleep(self.seconds)
        return [Score(reward=float(np.abs(a).mean()) if len(a) else 0.0) for a in audios]


def test_overlapped_step_equals_sequential_step(tmp_path):
    """--rollout-chunks 2: scoring chunk 1 while chunk 2 is generated gives the same samples, the
    same rewards and the same parameters after the update as scoring each chunk before going on."""
    results = []
    for overlap in (False, True):
        cfg = _tiny(tmp_path, "--val-data", "", "--rollout-chunks", "2", "--kl-coef", "0.04")
        scorer = SlowScorer(0.3)
        tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), scorer)
        real = tr.sampler.rollout_and_score
        tr.sampler.rollout_and_score = functools.partial(real, overlap=overlap)
        metrics, _ = tr.train_step(0)
        assert scorer.calls == [8, 8]  # two chunks of the 16 rollouts
        results.append(
            (metrics, {k: v.detach().clone() for k, v in tr.policy.state_dict().items()})
        )
    (seq, p_seq), (ovl, p_ovl) = results
    for key in ("reward_mean", "reward_std", "loss", "entropy", "response_len", "grad_norm"):
        assert seq[key] == ovl[key], key
    assert all(torch.equal(p_seq[k], p_ovl[k]) for k in p_seq)
    # Sequential waits for every chunk's 0.3 s; overlapped hides the first one behind generation.
    assert seq["time_reward"] >= 0.55
    assert ovl["time_reward"] < seq["time_reward"]


# ---- the prosody guard on toy rewards ------------------------------------------------------------


def short_reward(audio, text):
    """Toy reward for shorter (faster) speech: 1 for an empty clip, 0 at tiny's cap of 64 codes."""
    return float(max(0.0, 1.0 - len(audio) / (64 * 320)))


def monotone_reward(audio, text):
    """Toy reward favouring one repeated code: the fraction of 20 ms frames whose zero-crossing
    count (the tone codec's pitch) equals the clip's most common one."""
    n = len(audio) // 320
    if n == 0:
        return 0.0
    frames = audio[: n * 320].reshape(n, 320)
    return float(np.bincount((np.diff(np.sign(frames), axis=1) != 0).sum(axis=1)).max() / n)


def high_pitch_reward(audio, text):
    """Toy reward for higher tones: the spectral centroid of the clip, 0 at 0 Hz, 1 at 1100 Hz."""
    if len(audio) < 320:
        return 0.0
    power = np.abs(np.fft.rfft(audio[: len(audio) // 320 * 320].reshape(-1, 320), axis=1)).mean(0)
    return float(min(1.0, (power * np.fft.rfftfreq(320, 1 / 16000)).sum() / power.sum() / 1100))


def tone_voice(audio):
    """Toy speaker embedding for the tone codec: the mean magnitude spectrum up to 1200 Hz."""
    audio = audio[: max(320, len(audio) // 320 * 320)]
    audio = np.pad(audio, (0, max(0, 320 - len(audio))))
    return np.abs(np.fft.rfft(audio.reshape(-1, 320), axis=1)).mean(0)[:25]


def test_sim_guard_toy_experiment(tmp_path):
    """A reward for higher tones pulls the policy away from a low voice's prompt: speaker
    similarity falls without --guard sim, and stays near the start with it."""
    rows = [
        {
            "text": t,
            "prompt_wav": os.path.join(REPO, "data", "clone", "low.wav"),
            "prompt_text": "A low voice says this.",
        }
        for t in ("Hello there.", "One two three.", "Good morning.")
    ]
    (tmp_path / "low.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for guard in (False, True):
        flags = [
            "--preset",
            "tiny-clone",
            "--out",
            str(tmp_path / f"g{guard}"),
            "--data",
            str(tmp_path / "low.jsonl"),
            "--val-data",
            "",
            "--reward",
            f"{__name__}:high_pitch_reward",
            "--speaker-model",
            f"{__name__}:tone_voice",
            "--steps",
            "15",
            "--kl-coef",
            "0",
            "--lr",
            "3e-3",
            "--save-every",
            "1000",
            "--sample-every",
            "1000",
        ] + (["--guard", "sim"] if guard else [])
        runs[guard] = grpo.train(config.parse_config(flags))
    free, held = ([m["sim"] for m in runs[g]] for g in (False, True))
    ref = runs[True][0]["ref_sim"]
    assert np.mean(free[-3:]) < np.mean(free[:3]) - 0.1, free  # the voice drifts
    assert np.mean(held[-3:]) > ref - 0.1, (held, ref)
    assert np.mean(held[-3:]) > np.mean(free[-3:]) + 0.05, (held, ref)
    # the toy reward was learned
    assert runs[False][-1]["reward_mean"] > runs[False][0]["reward_mean"]


def _toy_run(tmp_path, reward, guard, steps=15):
    """A tiny run of `steps` on a toy reward; guard: a --guard spec, or None."""
    flags = [
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / f"{reward}_{guard}"),
        "--reward",
        f"{__name__}:{reward}",
        "--steps",
        str(steps),
        "--kl-coef",
        "0",
        "--lr",
        "3e-3",
        "--val-every",
        "1000",
        "--save-every",
        "1000",
        "--sample-every",
        "1000",
    ] + (["--guard", guard] if guard else [])
    return grpo.train(config.parse_config(flags))


@pytest.mark.parametrize(
    "reward, measure, band, faster, steps",
    [
        ("short_reward", "chars_per_s", 8.0, True, 15),
        ("monotone_reward", "f0_std_semitones", 1.1, False, 15),
        ("tone_reward", "f0_median_hz", 40.0, False, 30),
    ],
)
def test_guard_toy_experiment(tmp_path, reward, measure, band, faster, steps):
    """On the tone codec, a reward favouring shorter audio drives the speaking rate up, one
    favouring a repeated code drives the pitch spread down, one favouring low tones drives the
    median pitch down; with --guard MEASURE:BAND each stays near the initial policy's (the
    reference measured at the start, reported as ref_*)."""
    free = [m[measure] for m in _toy_run(tmp_path, reward, None, steps)]
    guarded_run = _toy_run(tmp_path, reward, f"{measure}:{band}", steps)
    guarded = [m[measure] for m in guarded_run]
    ref = guarded_run[0][f"ref_{measure}"]
    assert all(m[f"ref_{measure}"] == ref for m in guarded_run)
    # the band's edge the reward pushes towards
    if faster:
        edge = ref + band
    else:
        edge = ref - band
    end_free, end_guarded = np.median(free[-5:]), np.median(guarded[-5:])
    if faster:
        assert end_free > 1.5 * edge, (ref, free, guarded)
        assert end_guarded <= 1.25 * edge, (ref, free, guarded)
    else:
        assert end_free < edge, (ref, free, guarded)
        assert end_guarded >= edge / 1.25, (ref, free, guarded)
    assert all(0 < m["guard_factor"] <= 1 for m in guarded_run)


# ==================================================================================================
# failures are loud and safe: bad data, non-finite values, dead workers, unscorable steps
# ==================================================================================================


def test_bad_dataset_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"txt": "oops"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        grpo.train(_tiny(tmp_path, "--data", str(bad)))


def test_unknown_language_is_rejected_at_load(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "language": "ko"}\n{"text": "oops", "language": "klingon"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: language 'klingon'"):
        grpo.train(_tiny(tmp_path, "--data", str(bad)))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:1: language 'ko' is not one Whisper 'tiny.en' knows"
    ):
        grpo.train(_tiny(tmp_path, "--data", str(bad), "--whisper", "tiny.en"))
    with pytest.raises(ValueError, match=r"--language"):
        grpo.train(_tiny(tmp_path, "--language", "xx"))


def test_nan_reward_stops_with_step(tmp_path):
    cfg = _tiny(tmp_path, "--val-data", "")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(float("nan")))
    with pytest.raises(FloatingPointError, match="step 1: non-finite reward"):
        tr.train_step(0)


def test_nan_gradient_skips_the_step():
    """A non-finite gradient skips the optimizer step (no raise): the weights and AdamW's state stay
    as they were, the gradients are dropped, the schedule moves on, and the stats say `skipped`."""
    tok, ro = _fixed_rollouts()
    policy = models.tiny_llama(len(tok), seed=1).train()
    with torch.no_grad():
        policy.lm_head.weight[ro.tokens[0, 0]] = float("nan")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = grpo.update_policy(
        policy,
        None,
        opt,
        sched,
        ro,
        config.Config(kl_coef=0.0),
        parallel.Dist(),
        contextlib.nullcontext,
    )
    assert stats["skipped"] == 1
    assert not math.isfinite(stats["grad_norm"])
    after = policy.state_dict()
    assert all(torch.allclose(before[k], after[k], equal_nan=True) for k in before)
    assert opt.state_dict()["state"] == {}
    assert all(p.grad is None for p in policy.parameters())
    assert sched.last_epoch == 1


class _ClosableScorer(_ScriptedScorer):
    """Rewards that vary within each group (the update has gradients), in place of the worker."""

    def __init__(self):
        super().__init__(lambda i: Score(reward=0.1 * (i % 4), transcript="x", cer=0.5, nll=1.0))

    def close(self):
        pass


def _poison_steps(monkeypatch, bad: set) -> list:
    """grpo.train in this process, without the Whisper worker; a NaN in one gradient element at
    the steps (1-based) in `bad`. Returns the trained parameters as they were before each step's
    optimizer step (one list of tensors per step)."""
    monkeypatch.setattr(parallel, "start_scorer", lambda *a, **kw: (None, _ClosableScorer()))
    at = {}
    before = []
    real_step = grpo.Trainer.train_step
    real_sync = update.sync_gradients

    def train_step(self, step):
        at["step"] = step + 1
        return real_step(self, step)

    def sync(params, d):
        real_sync(params, d)
        before.append([p.detach().clone() for p in params])
        if at["step"] in bad:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("nan")

    monkeypatch.setattr(grpo.Trainer, "train_step", train_step)
    monkeypatch.setattr(update, "sync_gradients", sync)
    return before


def test_a_nan_gradient_skips_its_step_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """Step 2's gradient has a NaN: the step is skipped (weights as they were, said on stderr and
    in its metrics), the learning-rate warm-up and the data move on, and the run finishes."""
    before = _poison_steps(monkeypatch, {2})
    flags = ["--val-data", "", "--steps", "4", "--warmup-steps", "8", "--save-every", "2"]
    history = grpo.train(_tiny(tmp_path, *flags))
    assert [m["skipped"] for m in history] == [0, 1, 0, 0]
    assert [m["skipped_total"] for m in history] == [0, 1, 1, 1]
    assert not math.isfinite(history[1]["grad_norm"])
    assert math.isfinite(history[2]["grad_norm"])
    assert [m["lr"] for m in history] == pytest.approx([1e-3 * k / 8 for k in (1, 2, 3, 4)])
    assert all(torch.equal(a, b) for a, b in zip(before[1], before[2]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(before[2], before[3]))  # step 3 trained
    assert "step 2 skipped: non-finite gradient norm" in capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in lines] == [0, 1, 0, 0]
    assert lines[1]["grad_norm"] is None  # strict JSON: a non-finite number is written null
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_2" / "trainer_state.pt")
    assert state["skips"] == {"total": 1, "in_row": 1}


def test_max_skipped_steps_in_a_row_stop_the_run_with_a_hint(tmp_path, monkeypatch, capsys):
    """Steps 2 and 3 non-finite with --max-skipped-steps 2: the run stops after step 3's metrics,
    in one line saying what to try, exit status 1 (no traceback)."""
    _poison_steps(monkeypatch, {2, 3})
    argv = [
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "run"),
        "--val-data",
        "",
        "--steps",
        "5",
        "--max-skipped-steps",
        "2",
    ]
    with pytest.raises(SystemExit) as e:
        grpo.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("grpo.py: step 3: 2 steps in a row skipped"), err
    assert "--lr" in err, err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["skipped"]) for m in lines] == [(1, 0), (2, 1), (3, 1)]


def test_skip_counts_resume_exactly(tmp_path, monkeypatch):
    """The counters are trainer state: resumed after skipped step 2, a skipped step 3 is the
    second in a row (--max-skipped-steps 2 stops there); a clean one continues the run exactly."""
    _poison_steps(monkeypatch, {2})
    common = ["--val-data", "", "--save-every", "2", "--max-skipped-steps", "2", "--steps", "4"]
    full = grpo.train(_tiny(tmp_path / "a", *common))
    ckpt = str(tmp_path / "a" / "run" / "checkpoints" / "step_2")
    resumed = grpo.train(_tiny(tmp_path / "b", *common, "--resume", ckpt))
    for a, b in zip(full[2:], resumed):
        for key in ("loss", "grad_norm", "lr", "skipped", "skipped_total"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    _poison_steps(monkeypatch, {3})
    with pytest.raises(batch.TooManySkipped, match="step 3: 2 steps in a row"):
        grpo.train(_tiny(tmp_path / "c", *common, "--resume", ckpt))


def test_a_step_where_no_clip_could_be_scored_stops(tmp_path):
    cfg = _tiny(tmp_path, "--val-data", "")
    tr = grpo.Trainer(
        cfg,
        parallel.Dist(),
        torch.device("cpu"),
        _ScriptedScorer(
            lambda i: Score(reward=0.0, error="scoring failed: RuntimeError: CUDA error")
        ),
    )
    with pytest.raises(
        RuntimeError, match="step 1: not one of 16 clips could be scored: scoring failed"
    ):
        tr.train_step(0)


def dying_reward(audio, text):
    os._exit(3)


def test_dead_worker_stops_training_with_exit_code(tmp_path):
    t0 = time.time()
    with pytest.raises(ww.WorkerDiedError, match="3"):
        grpo.train(_tiny(tmp_path, "--reward", f"{__name__}:dying_reward", "--val-data", ""))
    assert time.time() - t0 < 90


# ==================================================================================================
# GPU: the CUDA paths (each test skips without a CUDA device; `.ci/gpu-check` runs them)
# ==================================================================================================

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _greedy_agree(model, prompts, ours, theirs):
    """Token for token, or up to the first position where the top two logits of the reference's
    own forward tie in bf16 (gap < 2^-6 relative): from there either choice is right. Returns the
    number of positions compared."""
    for i, p in enumerate(prompts):
        a, b = ours[i].tolist(), theirs[i].tolist()
        n = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + b[:n]], device="cuda")).logits[0, -1].float()
        top2 = logits.topk(2).values
        assert (top2[0] - top2[1]).abs() <= top2[0].abs() * 2**-6 + 1e-3, (i, n, a, b)
    return len(prompts)


@cuda
def test_cuda_bf16_greedy_equals_hf_generate():
    tok = data.tiny_tokenizer(n_speech=64)
    model = models.tiny_llama(len(tok), seed=1).to("cuda", torch.bfloat16)
    prompts = [
        data.prompt_ids(tok, t) for t in ("Hello.", "A longer sentence, to pad the others.", "안녕")
    ]
    ours = sample.generate(model, prompts, max_new_tokens=24, temperature=0).tokens
    # one at a time: no HF padding
    theirs = torch.cat([hf_greedy(model, [p], 24).cpu() for p in prompts])
    assert _greedy_agree(model, prompts, ours.cpu(), theirs) == 3


@cuda
def test_cuda_compiled_decode_equals_eager():
    tok = data.tiny_tokenizer(n_speech=64)
    sv = data.speech_vocab(tok)
    model = models.tiny_llama(len(tok), seed=1).to("cuda", torch.bfloat16)
    prompts = [data.prompt_ids(tok, t) for t in COMPILE_TEXTS]
    kw = dict(max_new_tokens=32, temperature=0, stop_ids=(sv.end_id,), allowed_ids=sv.allowed_ids())
    eager = sample.generate(model, prompts, **kw)
    decoder = decode.Decoder(model, compile=True, max_len=256)
    compiled = sample.generate(model, prompts, decoder=decoder, **kw)
    again = sample.generate(model, prompts, decoder=decoder, **kw)  # the captured graph, replayed
    assert torch.equal(compiled.tokens, again.tokens)
    _greedy_agree(model, prompts, compiled.tokens.cpu(), eager.tokens.cpu())


@cuda
def test_cuda_tiny_preset_end_to_end(tmp_path, capfd):
    """The tiny preset with the policy and the Whisper worker both on cuda:0 (and --compile's
    default, on for CUDA: the compiled step ran, no fallback to the eager loop)."""
    hist = grpo.train(
        _tiny(
            tmp_path,
            "--device",
            "auto",
            "--whisper-device",
            "cuda:0",
            "--steps",
            "2",
            "--save-every",
            "2",
            "--val-every",
            "2",
        )
    )
    assert "the compiled decode step failed" not in capfd.readouterr().err
    assert [m["step"] for m in hist] == [1, 2]
    for m in hist:
        for key in ("reward_mean", "loss", "entropy", "grad_norm", "kl", "tokens_per_s"):
            assert math.isfinite(m[key]), (key, m)
    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step_2")
        is not None
    )


@cuda
def test_cuda_lora_step_on_a_bf16_base(tmp_path):
    """--lora-rank on CUDA: the frozen base in bf16, fp32 adapters, the compiled step on merged
    copies; the step's numbers are finite and the rollout's log-probs stay near the update's."""
    cfg = _tiny(tmp_path, "--device", "auto", "--val-data", "", "--lora-rank", "4", "--lr", "1e-2")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cuda:0"), _FakeScorer(0.5))
    params = dict(tr.policy.lm.named_parameters())
    assert all(
        p.dtype == (torch.float32 if "lora_" in k else torch.bfloat16) for k, p in params.items()
    )
    tr.sampler.scorer = _ScriptedScorer(lambda i: Score(reward=(i % 3) / 2))
    metrics, _ = tr.train_step(0)
    assert all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "entropy", "logp_mismatch"))
    assert metrics["logp_mismatch"] < 0.05
    assert tr.sampler.decoder_works


@cuda
def test_cuda_whisper_fp16_scores_match_fp32():
    audios = [
        noise(2.0, 1),
        noise(5.0, 2, scale=0.3),
        (0.3 * np.sin(np.arange(48000) / 7.0)).astype(np.float32),
    ]
    texts = ["hello there", "a longer sentence to score", "one two three"]
    kw = dict(language="en", max_transcript_tokens=8)
    fp32 = scoring.WhisperScorer("random-tiny", "cpu", **kw).score(audios, texts)
    fp16 = scoring.WhisperScorer("random-tiny", "cuda", **kw).score(audios, texts)
    for a, b in zip(fp32, fp16):
        assert a.error is None
        assert b.error is None
        assert b.nll == pytest.approx(a.nll, rel=2e-2), (a, b)


def test_quality_and_guards_logged_each_step(tmp_path):
    """--quality dnsmos with guards on pace, median pitch and quality: the initial policy's medians
    are logged as ref_* on every step, the measures' step means beside them, and each clip's
    ratings in samples.jsonl."""
    pytest.importorskip("speechmos", reason="--quality dnsmos needs speechmos")
    pytest.importorskip("onnxruntime", reason="--quality dnsmos needs onnxruntime")
    guards = ["--guard", "chars_per_s", "--guard", "f0_median_hz", "--guard", "dnsmos_ovrl"]
    flags = ["--val-data", "", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2"]
    flags += ["--sample-every", "1", "--n-samples", "2", "--quality", "dnsmos", *guards]
    history = grpo.train(_tiny(tmp_path, *flags))
    for name in ("chars_per_s", "f0_median_hz", "dnsmos_ovrl"):
        assert history[0][f"ref_{name}"] == history[1][f"ref_{name}"]
        assert history[0][f"ref_{name}"] > 0
    for m in history:
        assert 1.0 <= m["dnsmos_ovrl"] <= 5.0
        assert m["f0_median_hz"] > 0
        assert 0.0 <= m["guard_factor"] <= 1.0
    clips = read_jsonl(tmp_path / "run" / "samples" / "step_1" / "samples.jsonl")
    assert all(1.0 <= clip["dnsmos_p808"] <= 5.0 for clip in clips)
