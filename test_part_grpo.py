import copy
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------- advantages and loss

def test_group_advantages_by_hand():
    from grpo import group_advantages
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = group_advantages(r, 4)
    g1 = torch.tensor([1.0, 0.0, 0.5, 0.5])
    std = math.sqrt(((g1 - 0.5) ** 2).sum().item() / 3)  # unbiased
    expect = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expect, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: 0, not NaN
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def _loss(logp, old, adv, mask, **kw):
    from grpo import policy_loss
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return policy_loss(t(logp), t(old), kw.pop("ref", None), t(adv), t(mask), **kw)


def test_policy_loss_aggregations_by_hand():
    # ratio 1 everywhere: per-token loss = -A. Row 0 has 2 tokens (A=1), row 1 one token (A=-0.5).
    logp = [[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]]
    mask, adv = [[1, 1, 0], [1, 0, 0]], [1.0, -0.5]
    loss, st = _loss(logp, logp, adv, mask, agg="token-mean", kl_coef=0.0)
    assert loss.item() == pytest.approx((-1 - 1 + 0.5) / 3)
    loss, _ = _loss(logp, logp, adv, mask, agg="seq-mean-token-mean", kl_coef=0.0)
    assert loss.item() == pytest.approx((-1 + 0.5) / 2)
    loss, _ = _loss(logp, logp, adv, mask, agg="seq-mean-token-sum-norm", kl_coef=0.0, norm_len=4)
    assert loss.item() == pytest.approx((-2 / 4 + 0.5 / 4) / 2)
    loss, _ = _loss(logp, logp, adv, mask, agg="token-mean", kl_coef=0.0, denom=10.0)
    assert loss.item() == pytest.approx(-1.5 / 10)
    assert st["clip_frac"] == 0.0 and st["kl"] == 0.0
    with pytest.raises(ValueError):
        _loss(logp, logp, adv, mask, agg="mean")


@pytest.mark.parametrize("log_ratio,adv,expect,clipped", [
    (0.5, 1.0, -1.2, 1.0),  # ratio 1.65 > 1+eps, positive advantage: clipped at 1.2
    (0.5, -1.0, math.exp(0.5), 0.0),  # negative advantage: the unclipped (pessimistic) branch
    (math.log(0.5), 1.0, -0.5, 0.0),  # ratio 0.5, positive advantage: unclipped
    (math.log(0.5), -1.0, 0.8, 1.0),  # ratio 0.5, negative advantage: clipped at 0.8
])
def test_policy_loss_clipping(log_ratio, adv, expect, clipped):
    loss, st = _loss([[log_ratio - 1.0]], [[-1.0]], [adv], [[1]], clip_eps=0.2, kl_coef=0.0)
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert st["clip_frac"] == clipped


def test_policy_loss_kl_k3_and_gradient():
    d = 0.3  # ref - logp
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = logp.detach() + d
    from grpo import policy_loss
    loss, st = policy_loss(logp, logp.detach(), ref, torch.tensor([0.0]), torch.tensor([[1.0, 0.0]]), kl_coef=0.04)
    k3 = math.exp(d) - d - 1
    assert st["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(0.04 * k3, rel=1e-5)
    loss.backward()  # d/dlogp of 0.04 * (e^(ref-logp) - (ref-logp) - 1) = 0.04 * (1 - e^d); masked token: 0
    assert logp.grad[0, 0].item() == pytest.approx(0.04 * (1 - math.exp(d)), rel=1e-5)
    assert logp.grad[0, 1].item() == 0.0


# ------------------------------------------------------------------------- the update on 1 vs 2 ranks

def _fixed_rollouts(seed=0, vocab=None):
    from grpo import Rollouts
    import data
    tok = data.tiny_tokenizer()
    g = torch.Generator().manual_seed(seed)
    sv = data.speech_vocab(tok)
    prompts = [data.prompt_ids(tok, t) for t in ["Hello.", "A longer sentence here.", "Hi", "안녕"] for _ in range(2)]
    B, T = len(prompts), 7
    tokens = torch.randint(sv.first, sv.first + sv.n, (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4])
    rewards = torch.rand(B, generator=g)
    from grpo import group_advantages
    return tok, Rollouts(prompts, tokens, lengths, group_advantages(rewards, 2))


def _one_update(rank, world, init_file, out_file, agg, updates=2):
    """One GRPO update over this rank's share of fixed rollouts; world 1 = all of them."""
    import contextlib
    import torch.distributed as dist
    from grpo import Config, Dist, Rollouts, update_policy
    from sample import tiny_llama
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tok, ro = _fixed_rollouts()
    share = slice(rank * len(ro.prompts) // world, (rank + 1) * len(ro.prompts) // world)
    ro = Rollouts(ro.prompts[share], ro.tokens[share], ro.lengths[share], ro.advantages[share])
    policy = tiny_llama(len(tok), seed=1).train()
    ref = tiny_llama(len(tok), seed=2)  # a different reference, so the KL term has a gradient
    cfg = Config(kl_coef=0.1, micro_batch=3, updates_per_rollout=updates, loss_agg=agg, temperature=0.8, lr=1e-3,
                 grad_clip=1.0, max_new_tokens=7)
    # SGD, not AdamW: Adam divides by sqrt(v) + eps, which turns the float-rounding noise of a
    # different summation order (~1e-9) in near-zero gradients into ~1e-5 parameter noise.
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = update_policy(policy, ref, opt, sched, ro, cfg, Dist(rank=rank, world=world), contextlib.nullcontext)
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in policy.named_parameters()},
                    "grads": {k: v.grad.clone() for k, v in policy.named_parameters()}, "stats": stats}, out_file)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_two_ranks_equals_one(tmp_path, agg):
    import torch.multiprocessing as mp
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _one_update(0, 1, None, one, agg)
    mp.spawn(_one_update, args=(2, str(tmp_path / "init"), two, agg), nprocs=2, join=True)
    a, b = torch.load(one), torch.load(two)
    for k in a["params"]:
        assert torch.allclose(a["grads"][k], b["grads"][k], atol=1e-7, rtol=0), k
        assert torch.allclose(a["params"][k], b["params"][k], atol=1e-6, rtol=0), k
    assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], abs=1e-6)
    assert a["stats"]["kl"] == pytest.approx(b["stats"]["kl"], rel=1e-5)
    from sample import tiny_llama
    init = tiny_llama(len(_fixed_rollouts()[0]), seed=1).state_dict()
    assert any(not torch.equal(init[k], a["params"][k]) for k in init)  # the step did move the weights


def test_response_logprobs_match_generate():
    """The trainer's teacher-forced log-probs equal the rollout's: importance ratios start at 1."""
    import data
    from grpo import response_logprobs
    from sample import generate, tiny_llama
    tok = data.tiny_tokenizer()
    sv = data.speech_vocab(tok)
    model = tiny_llama(len(tok), seed=3)
    prompts = [data.prompt_ids(tok, t) for t in ["One.", "Two words here.", "셋"]]
    roll = generate(model, prompts, max_new_tokens=12, temperature=0.8, stop_ids=(sv.end_id,),
                    allowed_ids=sv.allowed_ids(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = response_logprobs(model, prompts, roll.tokens, 0.8)
    mask = torch.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]
    assert torch.allclose(logp[mask], roll.logprobs[mask], atol=1e-4)
