"""parallel.py: one failing rank stops the job; FSDP2 (the update equals the replicated one, whole
checkpoints, a torchrun run resumed exactly).

Child processes import this file by name: the ranks of test_one_failing_rank_stops_the_job call
`_failing_rank` (tests/ on their sys.path), mp.spawn's children `_fsdp_update`; the replicated
update and the fixed rollouts are test_grpo.py's."""

import contextlib
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import config
import grpo
import llama
import models
import outputs
import parallel
import update
import whisper_worker as ww
from helpers import REPO, TESTS, read_json, read_jsonl
from test_grpo import _fixed_rollouts, _one_update, _port, _rank_share

# ---- rank agreement: one failing rank stops the job ----------------------------------------------


def _failing_rank(rank: int, port: int, out: str, where: str):
    """One rank of a 2-rank tiny run (no torchrun agent: the ranks must stop by themselves)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    if rank == 1 and where == "reward":
        real = ww.WorkerClient.score
        calls = []

        def score(self, *args):  # call 1: the validation before step 1; 2: step 1; 3: step 2
            calls.append(1)
            if len(calls) == 3:
                raise TimeoutError("injected: the Whisper worker did not answer (rank 1, step 2)")
            return real(self, *args)

        ww.WorkerClient.score = score
    if rank == 1 and where == "validation":
        import rollout as rollouts

        real_rollout = rollouts.Sampler.rollout
        real_stage = rollouts.Sampler.sample_and_score
        validations = []

        def sample_and_score(self, examples, stage):
            validations.append(stage == "validation")
            try:
                return real_stage(self, examples, stage)
            finally:
                validations.append(False)

        def rollout(self, texts, generator):
            # inside the validation after step 2 (the first is before step 1)
            if validations and validations[-1] and validations.count(True) == 2:
                raise RuntimeError("injected: validation broke on rank 1")
            return real_rollout(self, texts, generator)

        rollouts.Sampler.sample_and_score = sample_and_score
        rollouts.Sampler.rollout = rollout
    extra = []
    # under FSDP, the peer is then inside the rollout's all-gather
    if rank == 1 and where == "fsdp-rollout":
        import rollout as rollouts

        real_generate = rollouts.Sampler._generate
        calls = []

        def generate(self, texts, generator):
            calls.append(1)
            if len(calls) == 3:  # the validation before step 1, step 1, then step 2's rollout
                raise RuntimeError("injected: rollout broke on rank 1 under FSDP")
            return real_generate(self, texts, generator)

        rollouts.Sampler._generate = generate
    if where == "fsdp-rollout":
        extra = [
            "--fsdp",
            "--reward",
            "test_grpo:tone_reward",
            "--val-data",
            os.path.join(TESTS, "one_text.jsonl"),
        ]
    grpo.main(
        [
            "--preset",
            "tiny",
            "--steps",
            "4",
            "--out",
            out,
            "--save-every",
            "1",
            "--val-every",
            "2",
            "--sample-every",
            "9",
            *extra,
        ]
    )


@pytest.mark.parametrize("where", ["reward", "validation"])
def test_one_failing_rank_stops_the_job(tmp_path, where):
    """Rank 1 fails at step 2; both ranks exit non-zero within 60 s (no torchrun agent to kill
    them), rank 1 prints its message, and the step-1 checkpoint on disk is whole."""
    port = _port()
    out = str(tmp_path / "run")
    code = (
        f"import sys; sys.path[:0] = [{REPO!r}, {TESTS!r}]; "
        f"import test_parallel as t; t._failing_rank(int(sys.argv[1]), {port}, {out!r}, {where!r})"
    )
    t0 = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    elapsed = time.time() - t0
    codes = [p.returncode for p in procs]
    assert all(c != 0 for c in codes), (codes, results[0][1][-2000:], results[1][1][-2000:])
    assert elapsed < 60, elapsed
    assert "injected" in results[1][1]
    assert "[rank 1]" in results[1][1]
    assert "rank 1 failed during" in results[0][1], results[0][1][-2000:]
    ckpt = os.path.join(out, "checkpoints", "step_1")
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)["step"] == 1
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_2"))


def test_a_failing_rank_under_fsdp_leaves_without_a_hang(tmp_path):
    """--fsdp: rank 1 fails in its step-2 rollout while rank 0 is in that rollout's all-gather.
    An agreement all-reduce would never meet the all-gather (both wait until the NCCL watchdog).
    Rank 1 prints its error and leaves at once, rank 0's collective fails: both exit non-zero in
    seconds."""
    port = _port()
    code = (
        f"import sys; sys.path[:0] = [{REPO!r}, {TESTS!r}]; import test_parallel as t; "
        f"t._failing_rank(int(sys.argv[1]), {port}, {str(tmp_path / 'run')!r}, 'fsdp-rollout')"
    )
    t0 = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode != 0 for p in procs] == [True, True], [r[1][-2000:] for r in results]
    assert time.time() - t0 < 90
    assert "[rank 1] failed during step 2's rollouts and rewards" in results[1][1], results[1][1][
        -2000:
    ]
    assert "injected: rollout broke on rank 1 under FSDP" in results[1][1]
    # rank 0's collective failed because rank 1 left: one line that says so, no traceback of its own
    assert (
        "[rank 0] stops during step 2's rollouts and rewards: a peer rank left" in results[0][1]
    ), results[0][1][-2000:]
    assert "Traceback" not in results[0][1]


def test_fsdp_with_fewer_validation_texts_than_ranks_does_not_hang(tmp_path):
    """--fsdp, a validation set of one text over 2 ranks: rank 1 has no share, yet runs the same
    rollouts (every rollout gathers the weights, a collective) and the run ends with val metrics."""
    metrics = _torchrun(
        tmp_path / "run", "--val-data", os.path.join(TESTS, "one_text.jsonl"), steps=1
    )
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["val_clips"] == 1 and math.isfinite(m["val_reward"]) for m in metrics), metrics


def _uneven_validation(rank, world, init_method, out_file):
    """A spawned rank: Sampler.sample_and_score over 9 texts (2 * its batch of 4 + 1: rank 0's share
    is 2 chunks, rank 1's one), first with the policy sharded by FSDP2 (every rollout gathers the
    weights, a collective), then replicated; rank 0 saves both results."""
    import numpy as np

    import codec
    import data
    import rollout
    from reward import Score

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)

    class Loudness:  # a reward that tells samples apart: their audio's mean level
        def score(self, audios, texts, languages=None):
            return [Score(reward=float(np.abs(a).mean())) for a in audios]

    tok = data.tiny_tokenizer(n_speech=64)
    texts = data.load_dataset(data.SAMPLE_DATA)[:9]
    cfg = config.Config(
        prompts_per_step=4, group_size=2, max_new_tokens=24, temperature=1.0, top_p=1.0
    )
    results = []
    for fsdp in (True, False):
        policy = llama.LogProbs(models.tiny_llama(len(tok), seed=1))
        policy = parallel.shard(policy, torch.device("cpu")) if fsdp else policy
        sampler = rollout.Sampler(
            cfg,
            parallel.Dist(rank=rank, world=world, fsdp=fsdp),
            torch.device("cpu"),
            policy,
            tok,
            codec.ToneCodec(),
            Loudness(),
            contextlib.nullcontext,
        )
        assert sampler.batch == 4
        assert len(texts[rank::world]) == 5 - rank
        scores, rewards, finished, shown = sampler.sample_and_score(texts, "validation")
        results.append(([s.reward for s in scores], rewards, finished, len(shown["audios"])))
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_fsdp_validation_with_uneven_chunks_does_not_hang(tmp_path):
    """--fsdp, validation texts that split into 2 chunks on rank 0 and 1 on rank 1: rank 1 runs a
    second (stand-in) rollout too, so rank 0's second rollout finds its peer in the weights' gather.
    No hang, and the same scores as replicated (fp32 on a CPU: the same samples)."""
    out = str(tmp_path / "uneven.pt")
    ctx = mp.spawn(
        _uneven_validation, args=(2, f"tcp://127.0.0.1:{_port()}", out), nprocs=2, join=False
    )
    deadline = time.time() + 45  # the pass takes ~6 s
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hangs in sample_and_score under FSDP with uneven validation chunks")
    (rewards_fsdp, *rest_fsdp), (rewards_rep, *rest_rep) = torch.load(out, weights_only=False)
    # every text scored once, in rank order
    assert len(rewards_fsdp) == 9
    assert len(set(rewards_fsdp)) > 1
    assert rewards_fsdp == rewards_rep
    assert rest_fsdp == rest_rep


def _failing_checkpoint(out: str):
    """A torchrun rank: rank 0's first checkpoint write raises (a full disk, say)."""
    if os.environ["RANK"] == "0":

        def full_disk(*args, **kwargs):
            raise OSError(28, "injected: No space left on device (rank 0, checkpoint)")

        outputs.save_checkpoint = full_disk
    grpo.main(
        [
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--out",
            out,
            "--reward",
            "test_grpo:tone_reward",
            "--val-data",
            "",
            "--save-every",
            "1",
            "--sample-every",
            "9",
        ]
    )


def test_rank_0_failing_in_a_checkpoint_write_prints_its_error_under_torchrun(tmp_path):
    """Rank 1 learns of the failure in the agreement and exits first; torchrun then kills rank 0.
    Rank 0 printed its error before the agreement, so the cause is in the job's output."""
    script = tmp_path / "rank.py"
    script.write_text(
        f"import sys; sys.path[:0] = [{REPO!r}, {TESTS!r}]\nimport test_parallel as t\n"
        f"if __name__ == '__main__':  # the Whisper worker's spawn imports this file too\n"
        f"    t._failing_checkpoint({str(tmp_path / 'run')!r})\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[rank 0] failed during writing checkpoint" in out, out[-3000:]
    assert "injected: No space left on device" in out, out[-3000:]
    assert "rank 0 failed during writing checkpoint" in out  # rank 1's side of the agreement


def _nan_loss_on_rank_1(rank, world, init_method, out_file):
    """One update where only rank 1's loss share is non-finite (its gradients stay finite, so the
    global norm is finite on both ranks): every rank must skip the step alike."""
    tok, ro = _rank_share(rank, world, init_method)
    if rank == 1:
        real = update.policy_loss

        def inf_loss(*a, **kw):
            loss, stats = real(*a, **kw)
            return loss + float("inf"), stats  # a constant: no gradient of its own

        update.policy_loss = inf_loss
    policy = models.tiny_llama(len(tok), seed=1).train()
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = config.Config(kl_coef=0.0, micro_batch=3, temperature=0.8, max_new_tokens=7)
    stats = grpo.update_policy(
        policy,
        None,
        opt,
        sched,
        ro,
        cfg,
        parallel.Dist(rank=rank, world=world),
        contextlib.nullcontext,
    )
    moved = any(not torch.equal(before[k], v) for k, v in policy.named_parameters())
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"skipped": stats["skipped"], "moved": moved, "grad_norm": stats["grad_norm"]}, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    out = str(tmp_path / "stats")
    mp.spawn(_nan_loss_on_rank_1, args=(2, f"tcp://127.0.0.1:{_port()}", out), nprocs=2, join=True)
    got = [read_json(f"{out}.{rank}") for rank in range(2)]
    assert all(math.isfinite(g["grad_norm"]) for g in got), got  # only the loss flags it
    assert [(g["skipped"], g["moved"]) for g in got] == [(1, False), (1, False)], got


# ---- FSDP2 ---------------------------------------------------------------------------------------


def _fsdp_update(rank, world, init_method, out_file, ckpt):
    """_one_update's rollouts and settings, with the policy and reference sharded by FSDP2."""
    tok, ro = _rank_share(rank, world, init_method)
    policy = parallel.shard(
        llama.LogProbs(models.tiny_llama(len(tok), seed=1)).train(), torch.device("cpu")
    )
    ref = parallel.shard(llama.LogProbs(models.tiny_llama(len(tok), seed=2)), torch.device("cpu"))
    cfg = config.Config(
        kl_coef=0.1,
        micro_batch=3,
        updates_per_rollout=2,
        loss_agg="token-mean",
        temperature=0.8,
        lr=1e-3,
        grad_clip=1.0,
        max_new_tokens=7,
        fsdp=True,
    )
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    d = parallel.Dist(rank=rank, world=world)
    stats = grpo.update_policy(policy, ref, opt, sched, ro, cfg, d, contextlib.nullcontext)
    weights = parallel.full_model_state(policy, d)
    if rank == 0:
        torch.save({"params": weights, "stats": stats}, out_file)
        outputs.save_checkpoint(ckpt, policy.lm, tok, {"step": 1}, weights=weights)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_fsdp_update_equals_replicated_and_checkpoints_whole_weights(tmp_path):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "fsdp.pt")
    ckpt = str(tmp_path / "ckpt")
    _one_update(0, 1, None, one, "token-mean")
    mp.spawn(_fsdp_update, args=(2, f"tcp://127.0.0.1:{_port()}", two, ckpt), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert set(a["params"]) == set(b["params"])
    for k in a["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], atol=1e-5, rtol=0), k
    assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], abs=1e-6)
    assert a["stats"]["grad_norm"] == pytest.approx(b["stats"]["grad_norm"], rel=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()  # whole weights, a plain HF model
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, b["params"][k]), k
    ref = models.tiny_llama(len(_fixed_rollouts()[0]), seed=1)
    ref.load_state_dict(b["params"])
    ids = torch.tensor([_fixed_rollouts()[1].prompts[0]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def _torchrun(out, *flags, steps):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(REPO, "grpo.py"),
        "--preset",
        "tiny",
        "--fsdp",
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--reward",
        "test_grpo:tone_reward",
        "--val-data",
        "",
        "--save-every",
        "2",
        "--sample-every",
        "9",
        *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_jsonl(out / "metrics.jsonl")


@pytest.mark.parametrize("flags", [[], ["--lora-rank", "4", "--lr", "1e-2"]], ids=["full", "lora"])
def test_fsdp_tiny_preset_runs_and_resumes_exactly(tmp_path, flags):
    """torchrun --nproc_per_node=2 grpo.py --preset tiny --fsdp (and with LoRA); a run resumed from
    its step-2 checkpoint (sharded AdamW state; with LoRA, the adapter) gives step 3 equal to the
    uninterrupted run's, and the checkpoints are whole Hugging Face models."""
    full = _torchrun(tmp_path / "a", *flags, steps=3)
    assert [m["step"] for m in full] == [1, 2, 3]
    for m in full:
        for key in ("reward_mean", "loss", "entropy", "grad_norm", "kl"):
            assert math.isfinite(m[key]), (key, m)
    ckpt = tmp_path / "a" / "checkpoints" / "step_2"
    assert os.path.isdir(ckpt / "optimizer")
    assert os.path.isdir(ckpt / "adapter") == bool(flags)
    resumed = _torchrun(tmp_path / "b", "--resume", str(ckpt), *flags, steps=3)
    assert [m["step"] for m in resumed] == [3]
    for key in ("reward_mean", "loss", "kl", "entropy", "response_len", "grad_norm", "lr"):
        assert full[2][key] == pytest.approx(resumed[0][key], abs=1e-6), key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoints" / "step_3")
    assert all(torch.isfinite(p).all() for p in model.parameters())
