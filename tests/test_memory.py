"""tools.memory: the memory model against real tensors (state, FSDP2 shards, KV cache, logits,
parameter counts, activations, measured peaks)."""

import math
import os

import pytest
import torch

import llama
import models
import sample
from helpers import REPO
from tools import memory


def _peak_bytes(fn) -> int:
    """Peak rise (bytes) of CPU memory allocated while fn() runs, from the profiler's allocation
    events (the CPU allocator caches nothing, so this is what tensors really hold)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler.kineto_results, "experimental_event_tree", None)
    if results is None:
        pytest.skip("this torch's profiler has no experimental_event_tree")
    events = []
    stack = list(results())
    while stack:
        e = stack.pop()
        if str(e.tag).endswith("Allocation"):
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    peak = 0
    now = 0
    for _, size in sorted(events):
        now += size
        peak = max(peak, now)
    return peak


def test_memory_state_bytes_match_real_tensors():
    # weights, grads and AdamW moments of real models (tied and untied) after one step
    for tied in (False, True):
        model = models.tiny_llama(
            1003, hidden_size=64, num_layers=2, tie_word_embeddings=tied
        ).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randint(0, 1003, (2, 9))).logits.float().sum().backward()
        opt.step()
        m = memory.training_memory(model.config)
        assert m["weights"] == sum(p.nbytes for p in model.parameters())
        assert m["grads"] == sum(p.grad.nbytes for p in model.parameters())
        # the moments; AdamW's "step" counters are scalars (on the host for non-capturable AdamW)
        assert m["optimizer"] == sum(
            v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step"
        )
        assert m["optimizer_step"] == m["weights"]


def test_memory_fsdp_shards_match_fully_shard():
    # FSDP2 on a fake 4-rank process group (one process): rank 0's real shards, padded on dim 0
    # (vocab 1003 is not a multiple of 4), and the whole bf16 copy gathered for rollouts.
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    world = 4
    allowed = 100
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        model = models.tiny_llama(1003, hidden_size=64, num_layers=2).train()
        m = memory.training_memory(model.config, world=world, fsdp=True, allowed=allowed)
        # about 1/4
        assert m["weights"] < sum(p.nbytes for p in model.parameters()) / world + 64 * 4 * 2
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        logits = model(torch.randint(0, 1003, (2, 9))).logits
        # after the forward the root (embeddings, norm, lm_head) stays gathered in bf16 for the
        # backward, the layers are sharded again: fsdp_unsharded = that root, lm_head's bf16 grad
        # [V, d], and a layer's bf16 params, the next layer's (prefetched) and its own grads
        root = {n: p for n, p in model.named_parameters() if not n.startswith("model.layers.")}
        assert all(
            type(p) is torch.nn.Parameter and p.dtype == torch.bfloat16 for p in root.values()
        )
        assert all(
            isinstance(p, torch.distributed.tensor.DTensor) for p in model.model.layers.parameters()
        )
        assert (
            m["fsdp_unsharded"]
            == sum(p.nbytes for p in root.values()) + 2 * 1003 * 64 + 3 * 2 * layer
        )
        logits.float().sum().backward()
        opt.step()
        assert m["weights"] == sum(p.to_local().nbytes for p in model.parameters())
        assert m["grads"] == sum(p.grad.to_local().nbytes for p in model.parameters())
        assert m["optimizer"] == sum(
            v.to_local().nbytes for s in opt.state.values() for k, v in s.items() if k != "step"
        )
        mods = [x for x in model.modules() if isinstance(x, FSDPModule)]
        for x in mods:
            x.unshard()
        gathered = sum(p.nbytes for p in model.parameters())  # bf16, whole
        rows, _ = llama.head_rows(model, torch.arange(allowed))  # as sample._generate: in fp32
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        for x in mods:
            x.reshard()
        assert m["rollout_weights"] == gathered + rows.nbytes  # + the head rows' fp32 copy
    finally:
        dist.destroy_process_group()


def test_memory_kv_cache_matches_real_cache():
    model = models.tiny_llama(500, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    cache = llama.KVCache.for_model(model, 5, 77, torch.bfloat16)
    # one tensor per layer each, or stacked
    real = sum(t.nbytes for t in _tensors((cache.k, cache.v)))
    assert memory.kv_cache_bytes(model.config, 5, 77) == real
    m = memory.training_memory(model.config, rollout_batch=5, rollout_len=77, compile=False)
    # eager: a cache per call
    assert m["kv_cache"] == real
    assert m["decoder_cache"] == 0
    # the seed recipe on Llasa-1B, one GPU: eager, 128 sequences of 1600 slots; compiled, the
    # Decoder's 1792 slots (1500 + 256, rounded up to 128), no other cache
    shape = memory.LLASA_SHAPES["llasa-1b"]
    assert (
        memory.training_memory(shape, compile=False)["kv_cache"] == 16 * 2 * 128 * 8 * 1600 * 64 * 2
    )
    m = memory.training_memory(shape)
    assert (m["kv_cache"], m["decoder_cache"]) == (0, 16 * 2 * 128 * 8 * 1792 * 64 * 2)
    # R = prompts_per_step * group_size / world / rollout_chunks rows, rounded up
    # ceil(128 / 2 / 3) = 22 rows
    chunked = memory.training_memory(shape, world=2, rollout_chunks=3)
    assert chunked["decoder_cache"] == 16 * 2 * 22 * 8 * 1792 * 64 * 2


def test_memory_logits_match_the_largest_tensor_of_head_logprobs():
    # the largest fp32 tensor over the head's rows that llama.head_logprobs creates (forward and
    # backward) is one chunk's logits [B, chunk, rows]: the logits term is it and its gradient;
    # unchunked over the whole vocabulary, the old term
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self, rows):
            super().__init__()
            self.rows = rows
            self.shape = None
            self.nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (
                    isinstance(t, torch.Tensor)
                    and t.dtype == torch.float32
                    and t.dim()
                    and t.shape[-1] == self.rows
                    and t.nbytes > self.nbytes
                ):
                    self.shape = tuple(t.shape)
                    self.nbytes = t.nbytes
            return out

    torch.manual_seed(0)
    B, T, H, V, A = 2, 40, 16, 300, 120
    chunk = 16
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    for rows, c in ((A, chunk), (V, T)):  # speech-only chunked; full vocabulary, one chunk
        with Largest(rows) as largest:
            llama.head_logprobs(
                hidden, weight[:rows], torch.randint(0, rows, (B, T)), 0.8, chunk=c
            ).sum().backward()
        assert math.prod(largest.shape) == B * c * rows  # (matmuls see [B * c, rows])
        assert (
            memory.logits_bytes(B, c, rows)
            == 2 * largest.nbytes
            == 2 * torch.empty(B, c, rows).nbytes
        )
    m = memory.training_memory(memory.LLASA_SHAPES["llasa-1b"])
    assert m["logits"] == 2 * torch.empty(2, 256, 65537, device="meta").nbytes  # 268 MB
    assert (
        memory.logits_bytes(2, 1500, 193_800)
        == 2 * torch.empty(2, 1500, 193_800, device="meta").nbytes
    )


def test_memory_llasa_param_counts_are_exact():
    # built on the meta device: Llama-3.2-1B / 3.2-3B / 3.1-8B (1.24B / 3.21B / 8.03B at vocab
    # 128,256) plus 65,544 more embedding rows (twice for the untied 8B)
    counts = {name: memory.param_count(shape) for name, shape in memory.LLASA_SHAPES.items()}
    assert counts == {
        "llasa-1b": 1_370_048_512,
        "llasa-3b": 3_414_100_992,
        "llasa-8b": 8_567_197_696,
    }
    extra = 193_800 - 128_256
    assert counts["llasa-1b"] - extra * 2048 == 1_235_814_400  # Llama-3.2-1B's published count
    assert counts["llasa-8b"] - 2 * extra * 4096 == 8_030_261_248  # Llama-3.1-8B's
    assert (
        memory.training_memory(memory.LLASA_SHAPES["llasa-8b"])["weights"] == 4 * counts["llasa-8b"]
    )


def _saved_bytes(model, batch, length):
    """Bytes of the distinct non-parameter storages autograd saves in a bf16-autocast forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(
        0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)
    )
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        model.model(input_ids=ids, use_cache=False)
    return sum(saved.values())


def test_memory_activation_bytes_match_saved_tensors():
    # Per layer per token: (2 more layers, 64 more tokens) cancels the rest of the model and the
    # per-layer constant; the constant itself is the layer's bf16 weight casts.
    shape = dict(hidden_size=256, num_heads=8, num_kv_heads=2, intermediate_size=1024)
    small, big = (models.tiny_llama(512, num_layers=n, **shape).train() for n in (2, 4))
    b = {
        (n, L): _saved_bytes(model, 2, L) for n, model in ((2, small), (4, big)) for L in (64, 128)
    }
    # bytes per layer per token
    per_token = (b[4, 128] - b[4, 64] - b[2, 128] + b[2, 64]) / (2 * 2 * 64)
    per_layer = (b[4, 64] - b[2, 64]) / 2 - per_token * 2 * 64
    formula = memory.layer_activation_bytes(small.config)
    print(f"activations per layer per token: measured {per_token:.0f} B, formula {formula} B")
    assert abs(per_token - formula) <= 0.1 * formula
    casts = memory.training_memory(small.config)["weight_casts"] / 2  # per layer
    assert abs(per_layer - casts) <= 0.01 * casts


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_memory_update_peak_matches_measurement(grad_checkpointing):
    # One micro-batch's forward + backward after another (gradients already exist), measured with
    # the profiler, against the update terms beyond the gradients.
    B, P, T, A = 2, 16, 96, 400
    chunk = 64
    model = models.tiny_llama(
        1200, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512
    ).train()
    if grad_checkpointing:  # as grpo.Trainer does (transformers 5 renamed it)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    g = torch.Generator().manual_seed(0)
    allowed = torch.arange(600, 600 + A)
    prompts = [torch.randint(0, 600, (P,), generator=g).tolist() for _ in range(B)]
    tokens = allowed[torch.randint(0, A, (B, T), generator=g)]

    def micro_batch():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = llama.response_logprobs(model, prompts, tokens, 0.8, allowed_ids=allowed)
        (logp.sum() / logp.numel()).backward()

    micro_batch()
    measured = _peak_bytes(micro_batch)
    m = memory.training_memory(
        model.config,
        micro_batch=B,
        seq_len=P + T,
        response_len=T,
        allowed=A,
        chunk=chunk,
        grad_checkpointing=grad_checkpointing,
    )
    formula = m["update"] - m["grads"]
    print(
        f"update peak (GC {grad_checkpointing}): measured {measured / 1e6:.2f} MB, "
        f"formula {formula / 1e6:.2f} MB"
    )
    assert abs(measured - formula) <= 0.1 * formula


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_memory_fsdp_update_peak_matches_measurement(grad_checkpointing):
    # The same with FSDP2 (bf16 compute params, fp32 reduction) on a fake 2-rank group, sharded as
    # parallel.shard does (each layer, then the llama.LogProbs root). The CPU has no side streams,
    # so the prefetch overlaps less than on a GPU.
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    B, P, T, A = 2, 16, 96, 400
    chunk = 64
    world = 2
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        lm = models.tiny_llama(
            3000, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512
        ).train()
        if grad_checkpointing:
            getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)()
        model = llama.LogProbs(lm)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in lm.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        g = torch.Generator().manual_seed(0)
        allowed = torch.arange(600, 600 + A)
        prompts = [torch.randint(0, 600, (P,), generator=g).tolist() for _ in range(B)]
        tokens = allowed[torch.randint(0, A, (B, T), generator=g)]

        def micro_batch():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logp = model(prompts, tokens, 0.8, allowed_ids=allowed)
            (logp.sum() / logp.numel()).backward()

        micro_batch()
        measured = _peak_bytes(micro_batch)
    finally:
        dist.destroy_process_group()
    m = memory.training_memory(
        lm.config,
        world=world,
        fsdp=True,
        micro_batch=B,
        seq_len=P + T,
        response_len=T,
        allowed=A,
        chunk=chunk,
        grad_checkpointing=grad_checkpointing,
    )
    formula = m["update"] - m["grads"]
    print(
        f"FSDP update peak (GC {grad_checkpointing}): measured {measured / 1e6:.2f} MB, "
        f"formula {formula / 1e6:.2f} MB"
    )
    assert abs(measured - formula) <= 0.15 * formula


def test_memory_optimizer_step_and_rollout_peaks_match_measurement():
    model = models.tiny_llama(
        1200, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=1024
    )
    # foreach AdamW (CUDA's default): one temporary the size of all parameters
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    opt.step()  # the first step creates the moments
    m = memory.training_memory(
        model.config,
        micro_batch=2,
        seq_len=20,
        response_len=12,
        rollout_batch=16,
        rollout_len=20,
        allowed=400,
        compile=False,
    )
    measured = _peak_bytes(opt.step)
    print(
        f"optimizer step: measured {measured / 1e6:.2f} MB, "
        f"formula {m['optimizer_step'] / 1e6:.2f} MB"
    )
    assert abs(measured - m["optimizer_step"]) <= 0.1 * m["optimizer_step"]
    # a rollout of 16 sequences (8-token prompts, 12 new tokens) on fp32 weights under bf16
    # autocast, the eager loop: autocast's cache of the bf16 weight casts, the fp32 head rows,
    # the cache, sampling
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 600, (8,), generator=g).tolist() for _ in range(16)]

    def rollout():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            sample.generate(
                model.eval(),
                prompts,
                max_new_tokens=12,
                temperature=0.8,
                top_p=0.9,
                allowed_ids=torch.arange(600, 1000),
                generator=g,
                cache_dtype=torch.bfloat16,
            )

    measured = _peak_bytes(rollout)
    print(
        f"rollout: measured {measured / 1e6:.2f} MB, formula {m['rollout'] / 1e6:.2f} MB "
        f"(kv {m['kv_cache'] / 1e6:.2f}, weights {m['rollout_weights'] / 1e6:.2f}, "
        f"decode {m['decode'] / 1e6:.2f})"
    )
    assert abs(measured - m["rollout"]) <= 0.1 * m["rollout"]


def _tensors(x):
    """Every tensor in x: a tensor, or lists / tuples / dataclasses / dicts of them, nested."""
    import dataclasses

    if torch.is_tensor(x):
        return [x]
    if dataclasses.is_dataclass(x):
        x = [getattr(x, f.name) for f in dataclasses.fields(x)]
    elif isinstance(x, dict):
        x = list(x.values())
    if not isinstance(x, (list, tuple)):
        return []
    return [t for y in x for t in _tensors(y)]


def test_memory_decoder_terms_match_a_real_decoder():
    # decode.Decoder as rollout.Sampler builds it for 256-token prompts
    # (max_len = max_new_tokens + 256) on fp32 weights under bf16 autocast, run eagerly on the CPU
    # (the same buffers as compiled, no graph pool): its cache, weight copies, head rows and state
    # against the decoder terms, and the peak of the first call (which allocates them) and of a
    # later one (which reuses them) against the terms.
    import decode

    R, P, N, A = 8, 8, 12, 400
    model = models.tiny_llama(
        1200, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512
    )
    decoder = decode.Decoder(model, compile=False, max_len=N + 256)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 600, (P,), generator=g).tolist() for _ in range(R)]

    def rollout():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            sample.generate(
                model,
                prompts,
                max_new_tokens=N,
                temperature=0.8,
                top_p=0.9,
                repetition_penalty=1.1,
                stop_ids=(999,),
                allowed_ids=torch.arange(600, 600 + A),
                generator=g,
                cache_dtype=torch.bfloat16,
                decoder=decoder,
            )

    first = _peak_bytes(rollout)
    later = _peak_bytes(rollout)
    m = memory.training_memory(
        model.config, rollout_batch=R, response_len=N, rollout_len=P + N, allowed=A
    )
    (s,) = decoder.states.values()  # one shape, one set of buffers
    assert sum(t.nbytes for t in _tensors(s.cache)) == m["decoder_cache"]  # bf16, 384 slots
    # bf16 q..down
    assert sum(t.nbytes for t in _tensors(decoder.weight_copies)) == m["decoder_weights"]
    # [A, d] fp32
    assert s.weight.dtype == torch.float32
    assert s.weight.nbytes == m["decoder_head"]
    skip = {id(t) for t in [s.weight, *_tensors(s.cache)]}
    # tokens, logprobs, noise, seen, ...
    rest = sum(t.nbytes for t in _tensors(s) if id(t) not in skip)
    assert abs(rest - m["decoder_buffers"]) <= 0.02 * m["decoder_buffers"]
    held = m["decoder"] - m["graph_pool"]  # on CUDA the pool holds one step's intermediates besides
    print(
        f"decoder: held {held / 1e6:.2f} MB; first call's peak {first / 1e6:.2f} MB (formula "
        f"{(held + m['rollout']) / 1e6:.2f}), a later call's {later / 1e6:.2f} MB "
        f"(formula {m['rollout'] / 1e6:.2f})"
    )
    assert abs(first - (held + m["rollout"])) <= 0.1 * (held + m["rollout"])
    assert abs(later - m["rollout"]) <= 0.1 * m["rollout"]


def test_memory_codec_terms_match_a_real_xcodec2_decoder():
    # parameters of the real module (default config: 187M; the checkpoint's 823M hold the encoders)
    # and the peak of a padded decode on the CPU against codec_decode_bytes: where the transformer's
    # MLP holds the peak, where the head and ISTFT do, and the default widths (one transformer
    # block: the peak is the same at any depth) on one 30 s clip
    from codec import XCodec2Config, XCodec2Decoder

    assert memory.codec_param_count() == 186_983_682
    m = memory.training_memory(memory.LLASA_SHAPES["llasa-1b"], world=2)  # 64 clips of 1500 codes
    assert m["codec_weights"] == 4 * 186_983_682
    assert m["codec_decode"] == 64 * 1500 * 44 * 1024
    for C, hop, clips, frames in ((256, 80, 2, 600), (64, 320, 2, 600), (1024, 320, 1, 1500)):
        config = XCodec2Config(
            vq_dim=2 * C, hidden_dim=C, depth=1, n_heads=16 if C == 1024 else 4, hop_length=hop
        )
        model = XCodec2Decoder(config).eval()
        assert memory.codec_param_count(config) == sum(p.numel() for p in model.parameters())
        codes = torch.randint(
            0, 65536, (clips, 1, frames), generator=torch.Generator().manual_seed(0)
        )

        def decode(model=model, codes=codes, lengths=(frames, frames * 2 // 3)[:clips]):
            return model(codes, torch.tensor(lengths))  # the lengths tensor inside the profile

        with torch.no_grad():
            measured = _peak_bytes(decode)
        formula = memory.codec_decode_bytes(config, clips, frames)
        print(
            f"codec C={C} hop={hop}: measured {measured / 1e6:.2f} MB, "
            f"formula {formula / 1e6:.2f} MB"
        )
        assert abs(measured - formula) <= 0.1 * formula


def test_memory_grad_bucket_matches_sync_gradients():
    # the largest flat buffer parallel.sync_gradients concatenates (a fake two-rank Dist records
    # what it would all-reduce), at a small bucket size; the trainer's default bucket size
    import inspect

    import parallel

    model = models.tiny_llama(1003, hidden_size=64, num_layers=3, tie_word_embeddings=True)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    d = parallel.Dist(world=2)
    sent = []

    def all_reduce(t):
        sent.append(t.nbytes)
        return t

    d.all_reduce = all_reduce
    for bucket in (10_000, 100_000):
        sent.clear()
        parallel.sync_gradients(params, d, bucket_numel=bucket)
        assert max(sent) == memory.grad_bucket_bytes(model.config, bucket)
    assert (
        inspect.signature(parallel.sync_gradients).parameters["bucket_numel"].default
        == memory.GRAD_BUCKET
    )
    # Llasa-1B: the [193800, 2048] embedding is a bucket of its own; only replicated ranks
    # (world > 1) have one
    shape = memory.LLASA_SHAPES["llasa-1b"]
    assert memory.grad_bucket_bytes(shape) == 4 * 193_800 * 2048
    assert memory.training_memory(shape, world=2)["grad_bucket"] == 4 * 193_800 * 2048
    assert memory.training_memory(shape)["grad_bucket"] == 0
    assert memory.training_memory(shape, world=2, fsdp=True)["grad_bucket"] == 0


def test_memory_llasa_1b_replicated_total():
    # The recipe (train.sh: two replicated ranks, compiled decoding, 64 rollouts each): the review's
    # terms at their sizes, and the total. The review's 43-47 GB also counted a second copy of the
    # cache in the CUDA-graph pool, which the stacked cache made (one tensor per layer now) and the
    # codec's transient at the update's peak (it runs after the rollout, when no gradients exist).
    m = memory.training_memory(memory.LLASA_SHAPES["llasa-1b"], world=2)
    assert m["decoder_cache"] == 16 * 2 * 64 * 8 * 1792 * 64 * 2  # 3.76 GB
    # 1.95 GB
    assert m["decoder_weights"] == 2 * 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)
    assert m["decoder_head"] == 4 * 65_537 * 2048  # 0.54 GB
    assert m["cuda_context"] + m["nccl"] == 800_000_000
    assert max(("update", "step", "rollout", "codec"), key=m.get) == "update"
    assert 40e9 < m["total"] <= 0.9 * 48e9  # 40.9 GB: fits a 48 GB card with 10% to spare, barely
    # with the pool's copy: the review's range
    assert 43e9 <= m["total"] + m["decoder_cache"] <= 47e9
    # compiled decoding costs its buffers all run; --compile false only a rollout call's extra
    eager = memory.training_memory(memory.LLASA_SHAPES["llasa-1b"], world=2, compile=False)
    assert eager["decoder"] == 0 < eager["kv_cache"]
    assert eager["total"] < m["total"]
    with pytest.raises(ValueError):
        memory.training_memory(memory.LLASA_SHAPES["llasa-1b"], world=2, fsdp=True, compile=True)


def test_docs_tables_are_memory_tables():
    # docs/memory.md's fit tables are what tools.memory prints (full and LoRA r = 16), row for row
    with open(os.path.join(REPO, "docs", "memory.md"), encoding="utf-8") as f:
        page = f.read()
    for table in (memory.memory_table(), memory.memory_table(lora_rank=16)):
        rows = [line for line in table.splitlines() if line.startswith("| llasa")]
        stale = "docs/memory.md: rerun python -m tools.memory (--lora-rank 16)"
        assert rows, stale
        assert all(row in page for row in rows), stale
