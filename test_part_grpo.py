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


# ------------------------------------------------------------------------- the trainer end to end

def tone_reward(audio, text):
    """Toy reward with a known optimum: the fraction of 20 ms frames of the tone codec's audio whose
    pitch (by zero crossings) is below 400 Hz, i.e. codes below about 20 of 64.
    All-low speech earns 1; silence earns 0."""
    n = len(audio) // 320
    if n == 0:
        return 0.0
    frames = audio[:n * 320].reshape(n, 320)
    crossings = (np.diff(np.sign(frames), axis=1) != 0).sum(axis=1)  # ~ 2 * f * 0.02 s
    return float(np.mean(crossings / 2 / 0.02 < 400))


def _tiny(tmp_path, *flags):
    from grpo import parse_config
    return parse_config(["--preset", "tiny", "--out", str(tmp_path / "run"), *flags])


def test_tone_reward_knows_its_optimum():
    from codec import ToneCodec
    low, high = ToneCodec().decode([[0, 5, 15, 3], [40, 50, 63, 30]])
    assert tone_reward(low, "x") == 1.0 and tone_reward(high, "x") == 0.0
    assert tone_reward(np.zeros(0, np.float32), "x") == 0.0


def test_tiny_preset_learns_a_toy_reward(tmp_path):
    """On the tiny preset, GRPO raises the mean reward of a reward whose optimum is known."""
    from grpo import train
    cfg = _tiny(tmp_path, "--reward", f"{__name__}:tone_reward", "--steps", "30", "--val-data", "",
                "--kl-coef", "0", "--lr", "3e-3", "--sample-every", "100", "--save-every", "100")
    hist = train(cfg)
    rewards = [m["reward_mean"] for m in hist]
    assert all(math.isfinite(r) for r in rewards)
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.25, (first, last, rewards)


def test_resume_continues_exactly(tmp_path):
    """Stop after 2 steps, resume from that checkpoint: steps 3-4 equal an uninterrupted run's."""
    from grpo import train
    common = ["--reward", f"{__name__}:tone_reward", "--val-data", "", "--kl-coef", "0.04", "--save-every", "2"]
    full = train(_tiny(tmp_path / "a", *common, "--steps", "4"))
    train(_tiny(tmp_path / "b", *common, "--steps", "2"))
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step_2"
    resumed = train(_tiny(tmp_path / "b", *common, "--steps", "4", "--resume", str(ckpt)))
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("reward_mean", "loss", "kl", "entropy", "response_len", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    lines = [json.loads(x) for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


def test_checkpoint_loads_to_identical_logits(tmp_path):
    import data
    from grpo import save_checkpoint
    from sample import tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = data.tiny_tokenizer(n_speech=64)
    model = tiny_llama(len(tok), seed=5)
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, model, tok, {"step": 1})
    save_checkpoint(path, model, tok, {"step": 2})  # overwriting an existing checkpoint is atomic too
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([data.prompt_ids(AutoTokenizer.from_pretrained(path), "Hello there.")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.load(os.path.join(path, "trainer_state.pt"))["step"] == 2


def test_torchrun_two_ranks_tiny_preset(tmp_path):
    """The smoke test a new user runs: 2 ranks + the Whisper worker process, offline on CPU."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "grpo.py"), "--preset", "tiny", "--steps", "2", "--out", str(out),
           "--save-every", "2", "--sample-every", "2", "--val-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("reward_mean", "loss", "kl", "entropy", "cer", "nll", "tokens_per_s", "time_reward"):
            assert math.isfinite(m[key]), (key, m)
    assert "val_reward" in lines[-1]
    samples = out / "samples" / "step_2"
    assert (samples / "0.wav").exists() and len(open(samples / "samples.jsonl").readlines()) == 2
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_2")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------- failures are loud and safe

class _FakeScorer:
    def __init__(self, value):
        self.value = value

    def score(self, audios, texts, languages=None):
        return [{"reward": self.value, "cer": None, "nll": None, "transcript": ""} for _ in audios]


def test_nan_reward_stops_with_step(tmp_path):
    from grpo import Dist, Trainer
    cfg = _tiny(tmp_path, "--val-data", "")
    tr = Trainer(cfg, Dist(), torch.device("cpu"), _FakeScorer(float("nan")))
    with pytest.raises(FloatingPointError, match="step 0: non-finite reward"):
        tr.train_step(0)


def test_nan_gradient_skips_the_step():
    """A non-finite gradient raises before the optimizer step: the weights stay as they were."""
    import contextlib
    from grpo import Config, Dist, update_policy
    from sample import tiny_llama
    tok, ro = _fixed_rollouts()
    policy = tiny_llama(len(tok), seed=1).train()
    with torch.no_grad():
        policy.lm_head.weight[ro.tokens[0, 0]] = float("nan")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        update_policy(policy, None, opt, sched, ro, Config(kl_coef=0.0), Dist(), contextlib.nullcontext)
    after = policy.state_dict()
    assert all(torch.allclose(before[k], after[k], equal_nan=True) for k in before)


def test_bad_dataset_line_is_named(tmp_path):
    from grpo import train
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"txt": "oops"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        train(_tiny(tmp_path, "--data", str(bad)))


def dying_reward(audio, text):
    os._exit(3)


def test_dead_worker_stops_training_with_exit_code(tmp_path):
    import time
    from grpo import train
    from whisper_worker import WorkerDiedError
    t0 = time.time()
    with pytest.raises(WorkerDiedError, match="3"):
        train(_tiny(tmp_path, "--reward", f"{__name__}:dying_reward", "--val-data", ""))
    assert time.time() - t0 < 90


def test_help_explains_every_flag(capsys):
    import dataclasses
    from grpo import Config, parse_config
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text
    assert text.count("(default:") >= len(dataclasses.fields(Config))
    cfg = parse_config(["--preset", "tiny", "--group-size", "8", "--no-scale-rewards"])
    assert cfg.group_size == 8 and cfg.scale_rewards is False and cfg.codec == "tone"
