"""The model GRPO trains, and its KL reference: full fine-tuning or LoRA, replicated or sharded.

Full fine-tuning: fp32 master weights (bf16 autocast on CUDA); the reference is a frozen copy of
the initial model (on resume, --model loaded again), none at all without a KL term.
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
    ref_lm = None  # the reference's Hugging Face model, when it is a model of its own
    if cfg.lora_rank:
        lm, tokenizer = load(cfg.model)  # the base: the checkpoint holds only what trains
        if device.type == "cuda":  # frozen: no fp32 master copy needed (rotary buffers stay fp32)
            cast_parameters(lm, torch.bfloat16)
        targets = lora.parse_targets(cfg.lora_targets)
        lora.add_adapters(lm, cfg.lora_rank, cfg.lora_alpha, targets, seed=cfg.seed)
        if resume_from:
            folder = os.path.join(resume_from, lora.ADAPTER_DIR)
            lora.load_adapter(lm, folder, cfg.lora_rank, cfg.lora_alpha, targets)
    else:
        lm, tokenizer = load(resume_from or cfg.model)
        # The reference is the initial model, also on resume; none at all without a KL term.
        if cfg.kl_coef and resume_from:
            ref_lm = load(cfg.model)[0]
        elif cfg.kl_coef:
            ref_lm = copy.deepcopy(lm)
    if cfg.grad_checkpointing:  # transformers 5 renamed it; 4.46 has only the old name
        getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)()
        if cfg.lora_rank:
            # Frozen embeddings: checkpointed layers still need an input that carries grad.
            lm.enable_input_require_grads()
    policy = LogProbs(lm)
    ref = None
    if ref_lm is not None:
        ref = LogProbs(ref_lm).eval().requires_grad_(False)
    if (
        cfg.fsdp
    ):  # before the optimizer, which then holds (and shards) the AdamW state of the shards
        policy = parallel.shard(policy, device)
        if ref is not None:
            ref = parallel.shard(ref, device)
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
        """The whole state dict: the one gathered under FSDP, else the model's own."""
        if cfg.fsdp:
            return gathered
        return policy.lm.state_dict()

    def weights():
        """The merged plain model's weights."""
        return lora.merged_state(state(), cfg.lora_alpha / cfg.lora_rank)

    def extra(folder):
        """Writes the adapter in PEFT's layout (taken out of the whole state) into `folder`."""
        lora.save_adapter(
            os.path.join(folder, lora.ADAPTER_DIR),
            state(),
            cfg.lora_rank,
            cfg.lora_alpha,
            lora.parse_targets(cfg.lora_targets),
            base_model or cfg.model,
        )

    return weights, extra
