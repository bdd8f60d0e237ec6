"""The model GRPO trains, and its KL reference: full fine-tuning or LoRA, replicated or FSDP2-sharded.

Full fine-tuning: fp32 master weights (bf16 autocast on CUDA); the reference is a frozen copy of the
initial model (on resume, --model loaded again), none at all without a KL term.
LoRA (--lora-rank r): the base model (--model, also on resume) frozen, in bf16 on CUDA, with fp32
adapters (lora.py; on resume, the checkpoint's adapter); the reference is the same module with its
adapters off. Either way `build_policy` returns llama.LogProbs modules, sharded under --fsdp.
"""
import copy
import os

import torch

import lora
import parallel
from llama import LogProbs


def build_policy(cfg, device: torch.device, load, resume_from: str | None = None):
    """(policy, reference or None, tokenizer) for a run. load(name) -> (Hugging Face causal LM in
    fp32 on `device`, tokenizer); resume_from: a checkpoint directory or None."""
    if cfg.lora_rank:
        lm, tokenizer = load(cfg.model)  # the base: the checkpoint holds only what trains
        if device.type == "cuda":
            lm.to(torch.bfloat16)  # frozen: no fp32 master copy needed
        lora.add_adapters(lm, cfg.lora_rank, cfg.lora_alpha, lora.parse_targets(cfg.lora_targets), seed=cfg.seed)
        if resume_from:
            lora.load_adapter(lm, os.path.join(resume_from, lora.ADAPTER_DIR), cfg.lora_rank, cfg.lora_alpha,
                              lora.parse_targets(cfg.lora_targets))
        ref_lm = None
    else:
        lm, tokenizer = load(resume_from or cfg.model)
        # The reference is the initial model, also on resume; none at all without a KL term.
        ref_lm = (copy.deepcopy(lm) if not resume_from else load(cfg.model)[0]) if cfg.kl_coef else None
    if cfg.grad_checkpointing:  # transformers 5 renamed it; 4.46 has only the old name
        getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)()
        if cfg.lora_rank:  # frozen embeddings: checkpointed layers still need an input that carries grad
            lm.enable_input_require_grads()
    policy = LogProbs(lm)
    ref = LogProbs(ref_lm).eval().requires_grad_(False) if ref_lm is not None else None
    if cfg.fsdp:  # before the optimizer, which then holds (and shards) the AdamW state of the shards
        policy = parallel.shard(policy, device)
        ref = parallel.shard(ref, device) if ref is not None else None
    if cfg.lora_rank and cfg.kl_coef:
        ref = lora.AdaptersOff(policy)
    return policy, ref, tokenizer


def checkpoint_state(policy, cfg, d) -> tuple[dict | None, dict | None]:
    """(weights, adapter) for a checkpoint; a collective under FSDP, which gathers the state to rank 0
    (None, None on the others). weights: the Hugging Face directory's state dict (None: the model's
    own); with LoRA the merged plain model (fp32), and adapter its LoRA tensors (else None)."""
    if not cfg.fsdp and not cfg.lora_rank:
        return None, None
    state = parallel.full_model_state(policy, d) if cfg.fsdp else policy.lm.state_dict()
    if state is None or not cfg.lora_rank:
        return state, None
    adapter = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    return lora.merged_state(state, cfg.lora_alpha / cfg.lora_rank), adapter
