"""tools.gpu_check's part (g): FSDP2 + LoRA on a bf16 base over a real 1-rank group, the mix the
LoRA presets run: the update against the replicated one, the base frozen and bf16, gathered +
merged generate, the checkpoint (merged weights, PEFT adapter), a resume of the adapters' AdamW.
Returns its result row (figures and `checks`); --smoke runs it on a CPU (gloo, fp32 compute).
"""

import copy
import dataclasses
import os
import tempfile

import torch
import torch.distributed as dist

import llama
import lora
import models
import parallel
import policy
import sample
from tools.gpu_builders import autocast
from tools.gpu_check_fsdp import full_state, one_rank_group, rel_diff, run_update, small_case, state

ADAPTER_KEYS = (".lora_A", ".lora_B")  # the tensors a LoRA run trains


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
    """Part (g); a skipped row on torch < 2.8, where FSDP2 wants one dtype per group."""
    version = tuple(int(x) for x in torch.__version__.split(".")[:2])
    if version < (2, 8):  # as config.check_config
        return dict(
            status="skipped",
            reason="FSDP2 with a bf16 base beside fp32 adapters needs torch >= 2.8, this is "
            f"{torch.__version__}",
        )
    cuda = dev.type == "cuda"
    backend = one_rank_group(dev)
    try:
        # kl_coef 0.1: the reference = adapters off
        lm0, _, ro, cfg, allowed = small_case(dev, smoke)
        cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, fsdp=True)
        d1 = parallel.Dist(rank=0, world=1, device=dev, fsdp=True)
        rep, rep_ref = _lora_copy(lm0, dev, sharded=False)
        pol, ref = _lora_copy(lm0, dev, sharded=True)
        base = state(rep.lm)
        kw = dict(max_new_tokens=8, temperature=0, allowed_ids=allowed)
        with torch.no_grad(), autocast(dev):  # the rollout's way: merged weights, gathered (FSDP)
            with lora.merged(rep.lm):
                greedy_rep = sample.generate(rep.lm, ro.prompts, **kw).tokens
            with parallel.gathered(pol), lora.merged(pol.lm):
                greedy_fsdp = sample.generate(pol.lm, ro.prompts, **kw).tokens
        trained = [n for n, p in pol.named_parameters() if p.requires_grad]
        frozen_dtypes = {p.dtype for p in pol.parameters() if not p.requires_grad}
        st_r = run_update(rep, rep_ref, _sgd(rep), ro, cfg, d1, dev, allowed)
        st_f = run_update(pol, ref, _sgd(pol), ro, cfg, d1, dev, allowed)
        full = full_state(pol, d1)
        rel = rel_diff(full, state(rep.lm), base)
        frozen = [k for k in base if not k.endswith(ADAPTER_KEYS)]
        adapted = [k for k in base if k.endswith(ADAPTER_KEYS)]
        weights, extra = policy.checkpoint_state(pol, cfg, d1, base_model="gpu-check")
        with tempfile.TemporaryDirectory() as folder:
            copy.deepcopy(lm0).load_state_dict(weights())  # strict: a plain Llama's keys
            extra(folder)
            adapter = os.path.join(folder, lora.ADAPTER_DIR)
            back, _ = _lora_copy(lm0, dev, sharded=False, adapter=adapter)
            read_back = state(back.lm)
        diff, step = _lora_resume(lm0, ro, cfg, d1, dev, allowed)
        checks = dict(
            update_equals_replicated=rel <= (0.05 if cuda else 1e-4),
            only_adapters_train=bool(trained) and all(n.endswith(ADAPTER_KEYS) for n in trained),
            base_frozen=all(torch.equal(full[k], base[k]) for k in frozen),
            base_bf16=frozen_dtypes == {torch.bfloat16},
            adapter_round_trip=all(torch.equal(full[k], read_back[k]) for k in adapted),
            resume_equal=step > 0 and diff <= (1e-2 * step if cuda else 1e-6),
        )
        if not cuda:  # no bf16 compute cast on a CPU: the same greedy tokens
            checks["generate_equal"] = torch.equal(greedy_fsdp, greedy_rep)
        return dict(
            backend=backend,
            base_dtype="bf16",
            lora_rank=4,
            trained_tensors=len(trained),
            update_rel_err=rel,
            loss=[st_r["loss"], st_f["loss"]],
            kl=[st_r["kl"], st_f["kl"]],
            generate_tokens_equal=torch.equal(greedy_fsdp, greedy_rep),
            resume_max_diff=diff,
            resume_step_max=step,
            checks=checks,
        )
    finally:
        dist.destroy_process_group()


def _sgd(pol):
    """SGD over the trained (adapter) parameters, lr 0.5."""
    return torch.optim.SGD([p for p in pol.parameters() if p.requires_grad], lr=0.5)


def _lora_resume(lm0, ro, cfg, d1, dev, allowed) -> tuple[float, float]:
    """Two AdamW updates of the sharded LoRA policy against one, a save of its adapters and
    sharded optimizer state, and the second update from them: (max difference, max step) of the
    adapters."""

    def adapters(pol):
        return {k: v for k, v in full_state(pol, d1).items() if k.endswith(ADAPTER_KEYS)}

    def adam(pol):
        return torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-3)

    with tempfile.TemporaryDirectory() as folder:
        adapter_dir = os.path.join(folder, "adapter")
        optimizer_dir = os.path.join(folder, "optimizer")
        a, ref_a = _lora_copy(lm0, dev, sharded=True)
        opt_a = adam(a)
        run_update(a, ref_a, opt_a, ro, cfg, d1, dev, allowed)
        w1 = adapters(a)
        lora.save_adapter(adapter_dir, w1, 4, 8.0, lora.TARGETS, "gpu-check")
        parallel.save_sharded_optimizer(optimizer_dir, a, opt_a)
        run_update(a, ref_a, opt_a, ro, cfg, d1, dev, allowed)
        b, ref_b = _lora_copy(lm0, dev, sharded=True, adapter=adapter_dir)
        opt_b = adam(b)
        parallel.load_sharded_optimizer(optimizer_dir, b, opt_b)
        run_update(b, ref_b, opt_b, ro, cfg, d1, dev, allowed)
        wa = adapters(a)
        wb = adapters(b)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    step = max(float((wa[k] - w1[k]).abs().max()) for k in wa)
    return diff, step
