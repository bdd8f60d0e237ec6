"""tools.gpu_check's parts (b) and (c): NCCL and FSDP2 on one GPU, and the small training case
they and part (g) (tools/gpu_check_lora.py) share.
  b  real NCCL on a 1-rank group: the trainer's collectives; FSDP2 in bf16: gathered() + generate,
     the update against the replicated one, the full state dict, a distributed-checkpoint resume
  c  FSDP2 over 2 thread-ranks on one GPU (torch's threaded process group) against the replicated
     update
Each returns its result row (figures and `checks`); --smoke runs them on a CPU (gloo, fp32
compute).
"""

import contextlib
import copy
import math
import tempfile
import threading
import traceback

import torch
import torch.distributed as dist

import config
import data
import grpo
import llama
import models
import parallel
import sample
from tools.gpu_builders import autocast


def small_case(dev, smoke):
    """A small Llama with tied embeddings (odd vocabulary and MLP widths: FSDP2's padded shards),
    its reference, 8 fixed rollouts of speech tokens in groups of 2, the update's settings, the
    allowed ids. Returns (lm, ref, batch, cfg, allowed)."""
    tok = data.tiny_tokenizer()
    sv = data.speech_vocab(tok)
    if smoke:
        size = dict(hidden_size=64)
    else:
        size = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2)
    width = 4 * size["hidden_size"] + 1
    lm, ref = (
        models.tiny_llama(
            len(tok), seed=s, tie_word_embeddings=True, intermediate_size=width, **size
        ).to(dev)
        for s in (1, 2)
    )
    g = torch.Generator().manual_seed(0)
    texts = ["Hello.", "A longer sentence here.", "Hi", "안녕"]
    prompts = [data.prompt_ids(tok, t) for t in texts for _ in range(2)]
    tokens = torch.randint(sv.first, sv.first + sv.n, (8, 7), generator=g)  # [8, 7]
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4])
    rewards = torch.rand(8, generator=g)
    advantages = grpo.group_advantages(rewards, 2)
    batch = grpo.TrainBatch(prompts, tokens.to(dev), lengths.to(dev), advantages.to(dev))
    cfg = config.Config(
        kl_coef=0.1, micro_batch=3, temperature=0.8, lr=1e-3, grad_clip=1.0, max_new_tokens=7
    )
    return lm, ref, batch, cfg, torch.tensor(sv.allowed_ids())


def run_update(policy, ref, opt, ro, cfg, d, dev, allowed) -> dict:
    """One grpo.update_policy under the trainer's autocast, at a constant learning rate: its
    stats."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return grpo.update_policy(
        policy.train(), ref, opt, sched, ro, cfg, d, lambda: autocast(dev), allowed.to(dev)
    )


def state(lm) -> dict:
    """A model's state dict as fp32 CPU copies."""
    return {k: v.detach().float().cpu().clone() for k, v in lm.state_dict().items()}


def full_state(policy, d) -> dict | None:
    """The full state dict (parallel.full_model_state), fp32 and cloned: on a CPU it may hold the
    parameters themselves. None on ranks that get none."""
    full = parallel.full_model_state(policy, d)
    if not full:
        return full
    return {k: v.float().clone() for k, v in full.items()}


def rel_diff(a: dict, b: dict, base: dict) -> float:
    """|a - b| / |b - base| over every tensor: two updates from `base`, apart relative to the
    step."""

    def norm(x, y):
        return sum(float((x[k] - y[k]).double().square().sum()) for k in b)

    return math.sqrt(norm(a, b) / max(norm(b, base), 1e-30))


def one_rank_group(dev) -> str:
    """A real process group of one rank (NCCL on CUDA, bound to `dev` as
    parallel.setup_distributed binds it; gloo on a CPU). On CUDA the math SDPA kernel only: a
    deterministic backward, so that a resumed update is the same update. Returns the backend."""
    cuda = dev.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    bind = {"device_id": dev} if cuda else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **bind)
    return backend


def _replicated(lm0, ref0, ro, cfg, dev, allowed):
    """The reference: one update of a copy of lm0, one process, no process group.
    Returns (stats, state after)."""
    rep = copy.deepcopy(lm0)
    stats = run_update(
        llama.LogProbs(rep),
        llama.LogProbs(copy.deepcopy(ref0)),
        torch.optim.SGD(rep.parameters(), lr=0.5),
        ro,
        cfg,
        parallel.Dist(device=dev),
        dev,
        allowed,
    )
    return stats, state(rep)


def _collectives(dev) -> dict:
    """Dist's collectives over the real 1-rank group. Dist skips them at world 1, so world=2 here
    (a 1-rank sum is the identity): all_reduce, together (clean and failing), the gradient
    buckets."""
    dn = parallel.Dist(rank=0, world=2, device=dev)
    t = torch.arange(4.0, device=dev)
    summed = dn.all_reduce(t.clone()).tolist()
    largest = dn.all_reduce(t.clone(), "max").tolist()
    with dn.together("a clean stage"):
        pass
    with contextlib.suppress(KeyError), dn.together("an injected failure (gpu_check: expected)"):
        # re-raised to this rank after the agreement, and suppressed here
        raise KeyError("injected")
    grads = [torch.arange(n, device=dev, dtype=torch.float32) for n in (700, 5, 1300)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    parallel.sync_gradients(params, dn, bucket_numel=1000)  # 3 buckets
    objs = [None]
    dist.all_gather_object(objs, {"rank": 0})
    return dict(
        all_reduce=summed == largest == t.tolist(),
        gather=objs == [{"rank": 0}],
        sync_gradients=all(torch.equal(p.grad, g) for p, g in zip(params, grads)),
    )


def part_b(dev, smoke):
    """Part (b) over a real 1-rank group; returns its row."""
    cuda = dev.type == "cuda"
    backend = one_rank_group(dev)
    try:
        checks = _collectives(dev)
        lm0, ref0, ro, cfg, allowed = small_case(dev, smoke)
        base = state(lm0)
        d1 = parallel.Dist(rank=0, world=1, device=dev, fsdp=True)
        st_r, rep = _replicated(lm0, ref0, ro, cfg, dev, allowed)
        pol = parallel.shard(llama.LogProbs(copy.deepcopy(lm0)), dev)
        kw = dict(max_new_tokens=8, temperature=0, allowed_ids=allowed)
        with torch.no_grad(), autocast(dev):  # the rollout's way: whole weights gathered
            with parallel.gathered(pol):
                greedy_fsdp = sample.generate(pol.lm, ro.prompts, **kw).tokens
            greedy_rep = sample.generate(lm0, ro.prompts, **kw).tokens
        ref = parallel.shard(llama.LogProbs(copy.deepcopy(ref0)), dev)
        sgd = torch.optim.SGD(pol.parameters(), lr=0.5)
        st_f = run_update(pol, ref, sgd, ro, cfg, d1, dev, allowed)
        full = full_state(pol, d1)
        own = {
            n.removeprefix("lm."): p.full_tensor().detach().float().cpu()
            for n, p in pol.named_parameters()
        }
        # strict: every key of the Hugging Face model, the tied head too
        copy.deepcopy(lm0).load_state_dict(full)
        diff, step = _resume(lm0, ro, cfg, d1, dev, allowed)
        rel = rel_diff(full, rep, base)
        checks.update(
            update_equals_replicated=rel <= (0.05 if cuda else 1e-4),
            full_state_keys=set(full) == set(base),
            full_state_is_the_shards=all(torch.equal(full[k], own[k]) for k in own),
            resume_equal=step > 0 and diff <= (1e-2 * step if cuda else 1e-6),
        )
        # fp32 on both sides: the same greedy tokens (bf16 FSDP params on a GPU: near-ties differ)
        if not cuda:
            checks["generate_equal"] = torch.equal(greedy_fsdp, greedy_rep)
        return dict(
            backend=backend,
            fsdp_dtype="bf16" if cuda else "fp32",
            update_rel_err=rel,
            loss=[st_r["loss"], st_f["loss"]],
            grad_norm=[st_r["grad_norm"], st_f["grad_norm"]],
            generate_tokens_equal=torch.equal(greedy_fsdp, greedy_rep),
            resume_max_diff=diff,
            resume_step_max=step,
            checks=checks,
        )
    finally:
        dist.destroy_process_group()


def _resume(lm0, ro, cfg, d1, dev, allowed) -> tuple[float, float]:
    """Distributed-checkpoint resume (AdamW): update 1, save the weights and the sharded
    optimizer, update 2; then a fresh model from the saved weights and optimizer shard, update 2
    again. Returns (max difference of the two runs' weights, max step of update 2)."""

    def adam(weights=None):  # a sharded copy of lm0 (or of it with `weights`) and its AdamW
        lm = copy.deepcopy(lm0)
        lm.load_state_dict(weights or lm.state_dict())
        policy = parallel.shard(llama.LogProbs(lm), dev)
        return policy, torch.optim.AdamW(policy.parameters(), lr=1e-3)

    with tempfile.TemporaryDirectory() as folder:
        a, opt_a = adam()
        run_update(a, None, opt_a, ro, cfg, d1, dev, allowed)
        w1 = full_state(a, d1)
        parallel.save_sharded_optimizer(folder, a, opt_a)
        run_update(a, None, opt_a, ro, cfg, d1, dev, allowed)
        wa = full_state(a, d1)
        b, opt_b = adam(w1)
        parallel.load_sharded_optimizer(folder, b, opt_b)
        run_update(b, None, opt_b, ro, cfg, d1, dev, allowed)
        wb = full_state(b, d1)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    step = max(float((wa[k] - w1[k]).abs().max()) for k in wa)
    return diff, step


class _ThreadDist(parallel.Dist):
    """Dist for thread-ranks: a failing stage raises in its thread (the group wakes the peer), no
    os._exit."""

    @contextlib.contextmanager
    def together(self, stage):
        yield


def part_c(dev, smoke, world=2):
    """Part (c): `world` thread-ranks of FSDP2 on one device; returns its row, or a skipped row
    where torch's threaded process group cannot run FSDP2."""
    from torch.testing._internal.distributed import multi_threaded_pg as mt

    lm0, ref0, ro, cfg, allowed = small_case(dev, smoke)
    base = state(lm0)
    st_r, rep = _replicated(lm0, ref0, ro, cfg, dev, allowed)
    # copied here, in one thread: seeding is global
    copies = [(copy.deepcopy(lm0), copy.deepcopy(ref0)) for _ in range(world)]
    results = {}  # rank -> (stats, full state)
    errors = {}  # rank -> what it raised
    store = dist.HashStore()
    join = mt.Collective.join
    if dev.type == "cuda":
        # rank 0's thread copies every rank's tensors on its own stream: order it with theirs
        def synced_join(self, rank, data):
            torch.cuda.synchronize()
            out = join(self, rank, data)
            torch.cuda.synchronize()
            return out

        mt.Collective.join = synced_join

    def rank_main(r):
        try:
            dist.init_process_group("threaded", rank=r, world_size=world, store=store)
            d = _ThreadDist(rank=r, world=world, device=dev, fsdp=True)
            pol, ref = (parallel.shard(llama.LogProbs(m), dev) for m in copies[r])
            rows = slice(r * 8 // world, (r + 1) * 8 // world)  # 4 each: micro-batches of 3 and 1
            mine = grpo.TrainBatch(
                ro.prompts[rows], ro.tokens[rows], ro.lengths[rows], ro.advantages[rows]
            )
            sgd = torch.optim.SGD(pol.parameters(), lr=0.5)
            stats = run_update(pol, ref, sgd, mine, cfg, d, dev, allowed)
            results[r] = (stats, full_state(pol, d))
        except BaseException as e:  # reported below; the peer is woken from its collective
            errors[r] = e
            mt.ProcessLocalGroup.exception_handle(e)
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    # each thread its own registry of groups
    isolate = torch._C._distributed_c10d._set_thread_isolation_mode
    isolate(True)
    mt._install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=40)
            if t.is_alive():
                mt.ProcessLocalGroup.exception_handle(TimeoutError())
                raise TimeoutError("a thread-rank did not finish within 40 s")
    finally:
        mt._uninstall_threaded_pg()
        mt.ProcessLocalGroup.reset()
        mt.Collective.join = join
        isolate(False)
    error = next((e for e in errors.values() if not isinstance(e, SystemExit)), None)
    frames = traceback.extract_tb(error.__traceback__) if error else []
    in_torch = any("multi_threaded_pg" in f.filename for f in frames)
    if isinstance(error, NotImplementedError) or in_torch:  # its limits, not ours
        reason = f"torch's threaded process group cannot run FSDP2 here: {type(error).__name__}: "
        return dict(status="skipped", reason=(reason + str(error))[:500])
    if error:
        raise error
    st0, full = results[0]
    st1, _ = results[1]
    rel = rel_diff(full, rep, base)
    return dict(
        world=world,
        backend="threaded",
        fsdp_dtype="bf16" if dev.type == "cuda" else "fp32",
        update_rel_err=rel,
        loss=[st_r["loss"], st0["loss"], st1["loss"]],
        checks=dict(
            update_equals_replicated=rel <= (0.05 if dev.type == "cuda" else 1e-4),
            ranks_agree=st0["loss"] == st1["loss"],
            full_state_keys=set(full) == set(base),
        ),
    )
