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
from models import cast_parameters


def build_policy(cfg, device: torch.device, load, resume_from: str | None = None):
    """(policy, reference or None, tokenizer) for a run. load(name) -> (Hugging Face causal LM in
    fp32 on `device`, tokenizer); resume_from: a checkpoint directory or None."""
    if cfg.lora_rank:
        lm, tokenizer = load(cfg.model)  # the base: the checkpoint holds only what trains
        if device.type == "cuda":  # frozen: no fp32 master copy needed (rotary buffers stay fp32)
            cast_parameters(lm, torch.bfloat16)
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


def checkpoint_state(policy, cfg, d, base_model: str = "") -> tuple:
    """(weights, extra) for outputs.save_everywhere. weights: None (the model's own state), a state
    dict, or a function returning one; extra: None or a function writing more files into the
    checkpoint folder. Full fine-tuning under FSDP: the whole state, gathered to rank 0 here (a
    collective). LoRA: functions that rank 0 runs inside the checkpoint's write, so a failure there
    is agreed on like any other: the merged plain model (fp32, tensor by tensor on the CPU: no
    second copy of the model on the GPU) and the adapter in PEFT's layout (`base_model` named in
    its config)."""
    gathered = parallel.full_model_state(policy, d) if cfg.fsdp else None  # CPU, rank 0 only
    if not cfg.lora_rank:
        return gathered, None

    def state():
        return gathered if cfg.fsdp else policy.lm.state_dict()

    def weights():
        return lora.merged_state(state(), cfg.lora_alpha / cfg.lora_rank)

    def extra(folder):  # (save_adapter takes the adapter's tensors out of the whole state)
        lora.save_adapter(os.path.join(folder, lora.ADAPTER_DIR), state(), cfg.lora_rank, cfg.lora_alpha,
                          lora.parse_targets(cfg.lora_targets), base_model or cfg.model)
    return weights, extra
