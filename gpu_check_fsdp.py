"""gpu_check.py's parts (b), (c) and (g): NCCL and FSDP2 on one GPU.
  b  real NCCL on a 1-rank group: the trainer's collectives; FSDP2 in bf16: gathered() + generate, the update
     against the replicated one, the full state dict, a distributed-checkpoint resume
  c  FSDP2 over 2 thread-ranks on one GPU (torch's threaded process group) against the replicated update
  g  FSDP2 + LoRA on a bf16 base over a real 1-rank group: the update against the replicated one, the base
     frozen and bf16, gathered + merged generate, the checkpoint (merged weights, PEFT adapter), a resume
Each returns its result row (figures and `checks`); --smoke runs them on a CPU (gloo, fp32 compute).
"""
import contextlib
import copy
import dataclasses
import math
import os
import tempfile
import threading
import traceback

import torch
import torch.distributed as dist

import config
import data
import grpo
import llama
import lora
import models
import parallel
import policy
import sample
from bench_gpu import autocast as _autocast

# ----------------------------------------------------------------------------- b, c: NCCL and FSDP2

def _small(dev, smoke):
    """A small Llama with tied embeddings (odd vocabulary and MLP widths: FSDP2's padded shards), its
    reference, 8 fixed rollouts of speech tokens in groups of 2, the update's settings, the allowed ids."""
    sv = data.speech_vocab(tok := data.tiny_tokenizer())
    size = dict(hidden_size=64) if smoke else dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2)
    lm, ref = (models.tiny_llama(len(tok), seed=s, tie_word_embeddings=True, intermediate_size=4 * size["hidden_size"]
                                 + 1, **size).to(dev) for s in (1, 2))
    g = torch.Generator().manual_seed(0)
    prompts = [data.prompt_ids(tok, t) for t in ["Hello.", "A longer sentence here.", "Hi", "안녕"] for _ in range(2)]
    tokens = torch.randint(sv.first, sv.first + sv.n, (8, 7), generator=g)
    lengths, rewards = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4]), torch.rand(8, generator=g)
    ro = grpo.TrainBatch(prompts, tokens.to(dev), lengths.to(dev), grpo.group_advantages(rewards, 2).to(dev))
    cfg = config.Config(kl_coef=0.1, micro_batch=3, temperature=0.8, lr=1e-3, grad_clip=1.0, max_new_tokens=7)
    return lm, ref, ro, cfg, torch.tensor(sv.allowed_ids())


def _update(policy, ref, opt, ro, cfg, d, dev, allowed):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return grpo.update_policy(policy.train(), ref, opt, sched, ro, cfg, d, lambda: _autocast(dev), allowed.to(dev))


def _state(lm) -> dict:
    return {k: v.detach().float().cpu().clone() for k, v in lm.state_dict().items()}


def _full(policy, d) -> dict | None:  # the full state dict, cloned: on a CPU it may hold the parameters themselves
    return (state := parallel.full_model_state(policy, d)) and {k: v.float().clone() for k, v in state.items()}


def _rel(a: dict, b: dict, base: dict) -> float:
    """|a - b| / |b - base| over every tensor: two updates from `base`, apart relative to the step."""
    norm = lambda x, y: sum(float((x[k] - y[k]).double().square().sum()) for k in b)  # noqa: E731
    return math.sqrt(norm(a, b) / max(norm(b, base), 1e-30))


def _replicated(lm0, ref0, ro, cfg, dev, allowed):  # the reference: one update, one process, no process group
    rep = copy.deepcopy(lm0)
    return _update(llama.LogProbs(rep), llama.LogProbs(copy.deepcopy(ref0)), torch.optim.SGD(rep.parameters(), lr=0.5),
                   ro, cfg, parallel.Dist(device=dev), dev, allowed), _state(rep)


def _collectives(dev) -> dict:
    """Dist's collectives over the real 1-rank group. Dist skips them at world 1, so world=2 here (a
    1-rank sum is the identity): all_reduce, together (clean and failing), the gradient buckets."""
    dn, t = parallel.Dist(rank=0, world=2, device=dev), torch.arange(4.0, device=dev)
    reduced = dn.all_reduce(t.clone()).tolist() == dn.all_reduce(t.clone(), "max").tolist() == t.tolist()
    with dn.together("a clean stage"):
        pass
    with contextlib.suppress(KeyError), dn.together("an injected failure (gpu_check: expected)"):
        raise KeyError("injected")  # re-raised to this rank after the agreement, and suppressed here
    grads = [torch.arange(n, device=dev, dtype=torch.float32) for n in (700, 5, 1300)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    parallel.sync_gradients(params, dn, bucket_numel=1000)  # 3 buckets
    dist.all_gather_object(objs := [None], {"rank": 0})
    return dict(all_reduce=reduced, gather=objs == [{"rank": 0}],
                sync_gradients=all(torch.equal(p.grad, g) for p, g in zip(params, grads)))


def part_b(dev, smoke):
    cuda, backend = dev.type == "cuda", "nccl" if dev.type == "cuda" else "gloo"
    if cuda:  # the math SDPA kernel: a deterministic backward, so that a resumed update is the same update
        torch.cuda.set_device(dev)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": dev} if cuda else {}))  # as parallel.setup_distributed binds NCCL
    try:
        checks = _collectives(dev)
        lm0, ref0, ro, cfg, allowed = _small(dev, smoke)
        base, d1 = _state(lm0), parallel.Dist(rank=0, world=1, device=dev, fsdp=True)
        st_r, rep = _replicated(lm0, ref0, ro, cfg, dev, allowed)
        pol = parallel.shard(llama.LogProbs(copy.deepcopy(lm0)), dev)
        with torch.no_grad(), _autocast(dev):  # the rollout's way: whole weights gathered around generate
            kw = dict(max_new_tokens=8, temperature=0, allowed_ids=allowed)
            with parallel.gathered(pol):
                greedy_fsdp = sample.generate(pol.lm, ro.prompts, **kw).tokens
            greedy_rep = sample.generate(lm0, ro.prompts, **kw).tokens
        st_f = _update(pol, parallel.shard(llama.LogProbs(copy.deepcopy(ref0)), dev),
                       torch.optim.SGD(pol.parameters(), lr=0.5), ro, cfg, d1, dev, allowed)
        full = _full(pol, d1)
        own = {n.removeprefix("lm."): p.full_tensor().detach().float().cpu() for n, p in pol.named_parameters()}
        copy.deepcopy(lm0).load_state_dict(full)  # strict: every key of the Hugging Face model, the tied head too
        # Distributed-checkpoint resume (AdamW): update 1, save the weights and the sharded optimizer, update 2;
        # then a fresh model from the saved weights and optimizer shard, update 2 again: the same weights.
        def adam(weights=None):  # a sharded copy of lm0 (or of it with `weights`) and its AdamW
            lm = copy.deepcopy(lm0)
            lm.load_state_dict(weights or lm.state_dict())
            policy = parallel.shard(llama.LogProbs(lm), dev)
            return policy, torch.optim.AdamW(policy.parameters(), lr=1e-3)
        with tempfile.TemporaryDirectory() as folder:
            a, opt_a = adam()
            for i in range(2):
                _update(a, None, opt_a, ro, cfg, d1, dev, allowed)
                if i == 0:
                    w1 = _full(a, d1)
                    parallel.save_sharded_optimizer(folder, a, opt_a)
            wa, (b, opt_b) = _full(a, d1), adam(w1)
            parallel.load_sharded_optimizer(folder, b, opt_b)
            _update(b, None, opt_b, ro, cfg, d1, dev, allowed)
            wb = _full(b, d1)
        diff, step = (max(float((x[k] - y[k]).abs().max()) for k in wa) for x, y in ((wa, wb), (wa, w1)))
        rel = _rel(full, rep, base)
        checks.update(update_equals_replicated=rel <= (0.05 if cuda else 1e-4), full_state_keys=set(full) == set(base),
                      full_state_is_the_shards=all(torch.equal(full[k], own[k]) for k in own),
                      resume_equal=step > 0 and diff <= (1e-2 * step if cuda else 1e-6))
        if not cuda:  # fp32 on both sides: the same greedy tokens (bf16 FSDP params on a GPU: near-ties may differ)
            checks["generate_equal"] = torch.equal(greedy_fsdp, greedy_rep)
        return dict(backend=backend, fsdp_dtype="bf16" if cuda else "fp32", update_rel_err=rel,
                    loss=[st_r["loss"], st_f["loss"]], grad_norm=[st_r["grad_norm"], st_f["grad_norm"]],
                    generate_tokens_equal=torch.equal(greedy_fsdp, greedy_rep), resume_max_diff=diff,
                    resume_step_max=step, checks=checks)
    finally:
        dist.destroy_process_group()


class _ThreadDist(parallel.Dist):
    """Dist for thread-ranks: a failing stage raises in its thread (the group wakes the peer), no os._exit."""
    @contextlib.contextmanager
    def together(self, stage):
        yield


def part_c(dev, smoke, world=2):
    from torch.testing._internal.distributed import multi_threaded_pg as mt
    lm0, ref0, ro, cfg, allowed = _small(dev, smoke)
    base, (st_r, rep) = _state(lm0), _replicated(lm0, ref0, ro, cfg, dev, allowed)
    copies = [(copy.deepcopy(lm0), copy.deepcopy(ref0)) for _ in range(world)]  # here: seeding is global
    results, errors, store, join = {}, {}, dist.HashStore(), mt.Collective.join
    if dev.type == "cuda":  # rank 0's thread copies every rank's tensors on its own stream: order it with theirs
        mt.Collective.join = lambda self, rank, data: (torch.cuda.synchronize(), join(self, rank, data),
                                                       torch.cuda.synchronize())[1]

    def rank_main(r):
        try:
            dist.init_process_group("threaded", rank=r, world_size=world, store=store)
            d = _ThreadDist(rank=r, world=world, device=dev, fsdp=True)
            pol, ref = (parallel.shard(llama.LogProbs(m), dev) for m in copies[r])
            s = slice(r * 8 // world, (r + 1) * 8 // world)  # 4 rows each: micro-batches of 3 and 1
            mine = grpo.TrainBatch(ro.prompts[s], ro.tokens[s], ro.lengths[s], ro.advantages[s])
            stats = _update(pol, ref, torch.optim.SGD(pol.parameters(), lr=0.5), mine, cfg, d, dev, allowed)
            results[r] = (stats, _full(pol, d))
        except BaseException as e:  # noqa: BLE001 -- reported below; the peer is woken from its collective
            errors[r] = e
            mt.ProcessLocalGroup.exception_handle(e)
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    isolate = torch._C._distributed_c10d._set_thread_isolation_mode  # each thread its own registry of groups
    isolate(True)
    mt._install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        if any(t.join(timeout=40) or t.is_alive() for t in threads):
            mt.ProcessLocalGroup.exception_handle(TimeoutError())
            raise TimeoutError("a thread-rank did not finish within 40 s")
    finally:
        mt._uninstall_threaded_pg()
        mt.ProcessLocalGroup.reset()
        mt.Collective.join = join
        isolate(False)
    error = next((e for e in errors.values() if not isinstance(e, SystemExit)), None)
    frames = traceback.extract_tb(error.__traceback__) if error else []
    if isinstance(error, NotImplementedError) or any("multi_threaded_pg" in f.filename for f in frames):
        return dict(status="skipped", reason=f"torch's threaded process group cannot run FSDP2 here: "
                                             f"{type(error).__name__}: {error}"[:500])  # its limits, not ours
    if error:
        raise error
    (st0, full), (st1, _), rel = results[0], results[1], _rel(results[0][1], rep, base)
    return dict(world=world, backend="threaded", fsdp_dtype="bf16" if dev.type == "cuda" else "fp32",
                update_rel_err=rel, loss=[st_r["loss"], st0["loss"], st1["loss"]],
                checks=dict(update_equals_replicated=rel <= (0.05 if dev.type == "cuda" else 1e-4),
                            ranks_agree=st0["loss"] == st1["loss"], full_state_keys=set(full) == set(base)))


def _lora_copy(lm0, dev, sharded: bool, adapter: str | None = None):
    """lm0 as the trainer's LoRA policy on a bf16 base (policy.build_policy on CUDA): frozen bf16
    weights, fp32 adapters (r=4, B seeded non-zero so the adapted maps differ from the base; or
    read from an `adapter` folder, as --resume does), the adapters-off reference; sharded by FSDP2
    or not. Returns (policy, reference)."""
    lm = models.cast_parameters(copy.deepcopy(lm0), torch.bfloat16)
    lora.add_adapters(lm, rank=4, alpha=8.0, seed=0)
    g = torch.Generator().manual_seed(1)
    for _, m in lora.adapters(lm):
        m.lora_B.data = (0.01 * torch.randn(m.lora_B.shape, generator=g)).to(dev)
    if adapter:
        lora.load_adapter(lm, adapter, 4, 8.0, lora.TARGETS)
    pol = llama.LogProbs(lm)
    if sharded:
        pol = parallel.shard(pol, dev)
    return pol, lora.AdaptersOff(pol)


def part_g(dev, smoke):
    """FSDP2 + LoRA on a bf16 base over a real 1-rank group: the update against the replicated one,
    the frozen base untouched and bf16, the rollout's gathered + merged generate, the checkpoint
    (merged weights, PEFT adapter) and a distributed-checkpoint resume of the adapters' AdamW."""
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 8):  # as config.check_config
        return dict(status="skipped", reason=f"FSDP2 with a bf16 base beside fp32 adapters needs torch "
                                             f">= 2.8, this is {torch.__version__}")
    cuda = dev.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:  # the math SDPA kernel: a deterministic backward, so a resumed update is the same
        torch.cuda.set_device(dev)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": dev} if cuda else {}))
    try:
        lm0, _, ro, cfg, allowed = _small(dev, smoke)  # kl_coef 0.1: the reference = adapters off
        cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, fsdp=True)
        d1 = parallel.Dist(rank=0, world=1, device=dev, fsdp=True)
        rep, rep_ref = _lora_copy(lm0, dev, sharded=False)
        pol, ref = _lora_copy(lm0, dev, sharded=True)
        base = _state(rep.lm)
        kw = dict(max_new_tokens=8, temperature=0, allowed_ids=allowed)
        with torch.no_grad(), _autocast(dev):  # the rollout's way: merged weights, gathered (FSDP)
            with lora.merged(rep.lm):
                greedy_rep = sample.generate(rep.lm, ro.prompts, **kw).tokens
            with parallel.gathered(pol), lora.merged(pol.lm):
                greedy_fsdp = sample.generate(pol.lm, ro.prompts, **kw).tokens
        trained = [n for n, p in pol.named_parameters() if p.requires_grad]
        frozen_dtypes = {p.dtype for p in pol.parameters() if not p.requires_grad}
        st_r = _update(rep, rep_ref, _sgd(rep), ro, cfg, d1, dev, allowed)
        st_f = _update(pol, ref, _sgd(pol), ro, cfg, d1, dev, allowed)
        full = _full(pol, d1)
        rel = _rel(full, _state(rep.lm), base)
        frozen = [k for k in base if not k.endswith(ADAPTER_KEYS)]
        weights, extra = policy.checkpoint_state(pol, cfg, d1, base_model="gpu-check")
        with tempfile.TemporaryDirectory() as folder:
            copy.deepcopy(lm0).load_state_dict(weights())  # strict: a plain Llama's keys
            extra(folder)
            adapter = os.path.join(folder, lora.ADAPTER_DIR)
            back, _ = _lora_copy(lm0, dev, sharded=False, adapter=adapter)
            read_back = _state(back.lm)
        diff, step = _lora_resume(lm0, ro, cfg, d1, dev, allowed)
        checks = dict(update_equals_replicated=rel <= (0.05 if cuda else 1e-4),
                      only_adapters_train=bool(trained)
                      and all(n.endswith(ADAPTER_KEYS) for n in trained),
                      base_frozen=all(torch.equal(full[k], base[k]) for k in frozen),
                      base_bf16=frozen_dtypes == {torch.bfloat16},
                      adapter_round_trip=all(torch.equal(full[k], read_back[k]) for k in base
                                             if k.endswith(ADAPTER_KEYS)),
                      resume_equal=step > 0 and diff <= (1e-2 * step if cuda else 1e-6))
        if not cuda:  # no bf16 compute cast on a CPU: the same greedy tokens
            checks["generate_equal"] = torch.equal(greedy_fsdp, greedy_rep)
        return dict(backend=backend, base_dtype="bf16", lora_rank=4, trained_tensors=len(trained),
                    update_rel_err=rel, loss=[st_r["loss"], st_f["loss"]],
                    kl=[st_r["kl"], st_f["kl"]],
                    generate_tokens_equal=torch.equal(greedy_fsdp, greedy_rep),
                    resume_max_diff=diff, resume_step_max=step, checks=checks)
    finally:
        dist.destroy_process_group()


ADAPTER_KEYS = (".lora_A", ".lora_B")  # the tensors a LoRA run trains


def _sgd(pol):
    return torch.optim.SGD([p for p in pol.parameters() if p.requires_grad], lr=0.5)


def _lora_resume(lm0, ro, cfg, d1, dev, allowed) -> tuple[float, float]:
    """Two AdamW updates of the sharded LoRA policy against one, a save of its adapters and sharded
    optimizer state, and the second update from them: (max difference, max step) of the adapters."""
    def adapters(pol):
        return {k: v for k, v in _full(pol, d1).items() if k.endswith(ADAPTER_KEYS)}

    def adam(pol):
        return torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-3)

    with tempfile.TemporaryDirectory() as folder:
        a, ref_a = _lora_copy(lm0, dev, sharded=True)
        opt_a = adam(a)
        _update(a, ref_a, opt_a, ro, cfg, d1, dev, allowed)
        w1 = adapters(a)
        lora.save_adapter(os.path.join(folder, "adapter"), w1, 4, 8.0, lora.TARGETS, "gpu-check")
        parallel.save_sharded_optimizer(os.path.join(folder, "optimizer"), a, opt_a)
        _update(a, ref_a, opt_a, ro, cfg, d1, dev, allowed)
        b, ref_b = _lora_copy(lm0, dev, sharded=True, adapter=os.path.join(folder, "adapter"))
        opt_b = adam(b)
        parallel.load_sharded_optimizer(os.path.join(folder, "optimizer"), b, opt_b)
        _update(b, ref_b, opt_b, ro, cfg, d1, dev, allowed)
        wa, wb = adapters(a), adapters(b)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    step = max(float((wa[k] - w1[k]).abs().max()) for k in wa)
    return diff, step
