"""What tools.gpu_check's part (d) measures: peak memory beside tools.memory's prediction, for
Llasa-1B replicated (full and LoRA r=16) and 3B/8B under FSDP2 over a fake 2/4-rank group (CASES):
held state, an update micro-batch, an AdamW step and a rollout call. A measured / predicted ratio
outside MEMORY_TOL fails its check (parts d and e); on a CPU (--smoke, TINY_SHAPE) only the held
state is measured.
"""

import torch

from tools import memory
from tools.gpu_builders import autocast

# measured / predicted peak memory (parts d, e): outside these bounds, tools.memory is wrong there
MEMORY_TOL = (0.75, 1.25)
# part (d)'s model in smoke runs (LlamaConfig kwargs)
TINY_SHAPE = dict(
    vocab_size=1200,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)
# The cases as the presets train them (LoRA: --lora-rank 16):
# (model, world, fsdp, micro-batch, grad checkpointing, LoRA rank)
CASES = (
    ("llasa-1b", 1, False, 2, False, 0),
    ("llasa-1b", 1, False, 2, False, 16),
    ("llasa-3b", 2, True, 2, True, 0),
    ("llasa-8b", 4, True, 1, True, 0),
)


def within(ratio: float) -> bool:
    """Whether a measured / predicted memory ratio is one tools.memory may claim (MEMORY_TOL)."""
    return MEMORY_TOL[0] <= ratio <= MEMORY_TOL[1]


def peak_bytes(fn, dev) -> int | None:
    """Bytes allocated above the level before fn() at its peak (CUDA's allocator statistics); None
    on a CPU, where fn just runs (tests/test_memory.py measures the CPU's peaks)."""
    if dev.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - before


def memory_case(name, shape, world, fsdp, mb, gc, dev, smoke, lora_rank: int = 0) -> dict:
    """An update micro-batch, an AdamW step and a rollout call of R x (P + T) tokens (every row
    stops at once: the eager loop's cache and prefill are a whole rollout's) on a model of zero
    weights (under FSDP over a fake group: its gathers move no data). lora_rank > 0: LoRA as
    policy.py builds it (the base frozen in bf16, on a CPU too as tools.memory counts it; fp32
    adapters; rollouts on merged weights). Returns [measured, predicted] GB per phase
    (`<phase>_gb`) and their ratio where both are known (`<phase>_ratio`)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    import llama
    import lora
    import models
    import parallel
    import sample

    if smoke:
        P, T, R, A = 8, 24, 8, 200  # prompt, response tokens, rollout rows, allowed rows
    else:
        P, T, R, A = 100, 1500, 64, memory.SPEECH_ROWS
    if fsdp:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        config = LlamaConfig(**shape)
        with torch.device("meta"):
            lm = LlamaForCausalLM(config)
        # whole on the device first (sharding frees it): to_empty unties the head
        lm.to_empty(device=dev)
        lm.tie_weights()
        with torch.no_grad():
            for t in lm.parameters():
                t.zero_()
        if lora_rank:
            lora.add_adapters(models.cast_parameters(lm, torch.bfloat16), lora_rank, alpha=32.0)
        # real rotary buffers, not meta ones
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config).to(dev)
        if gc:
            getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)()
        model = llama.LogProbs(lm.train())
        if fsdp:
            parallel.shard(model, dev)
        torch.cuda.empty_cache()  # the whole weights that sharding left (a no-op without CUDA)
        V = config.vocab_size
        g = torch.Generator().manual_seed(0)
        allowed = torch.arange(
            V - A, V, device=dev
        )  # the speech rows: the last A of the vocabulary
        prompts = [torch.randint(0, V - A, (P,), generator=g).tolist() for _ in range(R)]
        tokens = allowed[torch.randint(0, A, (mb, T), generator=g).to(dev)]  # [mb, T]
        trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters
        opt = torch.optim.AdamW(trained, lr=1e-6)

        def update():
            with autocast(dev):
                logp = model(prompts[:mb], tokens, 0.8, allowed_ids=allowed)
            (logp.sum() / logp.numel()).backward()

        def rollout():  # the whole (gathered) weights set so that every row emits the stop token
            with torch.no_grad(), autocast(dev), parallel.gathered(model):
                # layers of zeros pass the embedding on; its stop row wins the head
                for t in lm.parameters():
                    t.fill_(1.0 if t is lm.model.norm.weight else 0.0)
                for w in (lm.model.embed_tokens.weight, lm.lm_head.weight):
                    w.fill_(1.0)[V - 1] = 2.0
                with lora.merged(lm):  # a no-op without adapters
                    sample.generate(
                        lm,
                        prompts,
                        max_new_tokens=T,
                        temperature=0.8,
                        top_p=0.9,
                        allowed_ids=allowed,
                        stop_ids=(V - 1,),
                        cache_dtype=torch.bfloat16 if dev.type == "cuda" else None,
                        generator=torch.Generator(dev).manual_seed(0),
                    )

        update()  # warm-up: AdamW's moments, the kernels, the allocator's pools
        opt.step()
        opt.zero_grad(set_to_none=True)
        measured = dict(
            held=_held_bytes(model, opt, dev),
            update=peak_bytes(update, dev),
            step=peak_bytes(opt.step, dev),
        )
        opt.zero_grad(set_to_none=True)
        model.eval()  # as rollout.Sampler does
        measured["rollout"] = peak_bytes(rollout, dev)
    finally:
        if fsdp:
            dist.destroy_process_group()
    m = memory.training_memory(
        config,
        world=world,
        fsdp=fsdp,
        compile=False,
        micro_batch=mb,
        seq_len=P + T,
        response_len=T,
        rollout_batch=R,
        rollout_len=P + T,
        allowed=A,
        grad_checkpointing=gc,
        codec=None,
        lora_rank=lora_rank,
    )
    # the rises beyond what the phase starts with (step: the grads)
    predicted = dict(
        held=m["weights"] + m["optimizer"],
        update=m["update"],
        step=m["step"] - m["grads"],
        rollout=m["rollout"],
    )
    row = dict(
        model=name,
        lora_rank=lora_rank,
        world=world,
        fsdp=fsdp,
        grad_checkpointing=gc,
        micro_batch=mb,
        tokens=P + T,
        rollout_rows=R,
    )
    for phase in measured:
        row[f"{phase}_gb"] = [_gb(measured[phase]), _gb(predicted[phase])]
    for phase in measured:
        if measured[phase] and predicted[phase]:
            row[f"{phase}_ratio"] = round(measured[phase] / predicted[phase], 3)
    return row


def _held_bytes(model, opt, dev) -> int:
    """Bytes the weights and AdamW state hold on this rank: CUDA's allocated memory, or on a CPU
    the sizes of this rank's shards."""
    if dev.type == "cuda":
        return torch.cuda.memory_allocated(dev)
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in [*model.parameters(), *states]]
    return sum(t.numel() * t.element_size() for t in local)


def _gb(n: int | None) -> float | None:
    """Bytes in GB (1e9), rounded to 3 places; None stays None."""
    return None if n is None else round(n / 1e9, 3)
