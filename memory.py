"""Memory per training GPU for GRPO on LLASA: `training_memory` (bytes, term by term) and
`memory_table` (the README's table). `python memory.py` prints the table.

Every term counts tensors the trainer really holds (grpo.update_policy, rollout.Sampler,
sample.generate, decode.Decoder, codec.XCodec2Decoder); the tests check them against real tensors
and CPU-measured peaks of small models (FSDP's one-layer prefetch, the CUDA SDPA kernel and the
CUDA-graph pool are taken from their design). Sizes are in bytes; the table is in GB (1e9 bytes).
The CUDA context and NCCL's buffers are fixed estimates (CUDA_CONTEXT, NCCL_BUFFERS); not counted:
allocator fragmentation and cuBLAS/cuDNN/cuFFT workspaces (the table's 10% headroom is for them),
the reference model's forward (only with --kl-coef > 0).
"""
import functools
import math

import torch

from codec import XCodec2Config, XCodec2Decoder
from lora import TARGETS as LORA_TARGETS

# Llama-3 shapes (Llasa-1B = Llama-3.2-1B, 3B = Llama-3.2-3B, 8B = Llama-3.1-8B) with LLASA's
# vocabulary of 193,800 (128,256 text + 8 markers + 65,536 speech tokens). rope scaling and
# max_position_embeddings change no tensor size and are left at LlamaConfig's defaults.
_LLAMA3 = dict(vocab_size=193_800, num_key_value_heads=8, rope_theta=500_000.0, rms_norm_eps=1e-5)
LLASA_SHAPES = {
    "llasa-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, head_dim=64, tie_word_embeddings=True),
    "llasa-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, head_dim=128, tie_word_embeddings=True),
    "llasa-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, head_dim=128, tie_word_embeddings=False),
}
SPEECH_ROWS = 65_537  # rows of lm_head the policy uses: 65,536 speech tokens + the stop token
GB = 1e9
# Fixed per-GPU costs outside torch's tensors (estimates: no GPU measures them here).
CUDA_CONTEXT = 500_000_000  # the CUDA context with torch's, cuBLAS' and cuDNN's kernels: ~0.5 GB, typical of an
#   H100 with CUDA 12 and lazy module loading (CUDA_MODULE_LOADING=LAZY, torch's default since CUDA 11.7)
NCCL_BUFFERS = 300_000_000  # one NCCL communicator's own buffers (world > 1; the trainer uses only the default
#   group): NCCL_BUFFSIZE's 4 MiB per channel and peer for the Simple protocol plus the LL/LL128 ones, over
#   the tens of channels NVLink gets: a few hundred MB; NVLS (NVLink SHARP) can add more
GRAD_BUCKET = 1 << 26  # parallel.sync_gradients' bucket_numel (replicated world > 1)
XCODEC2 = XCodec2Config()  # the published codec, on every training GPU (--codec xcodec2)
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")


def training_memory(config, *, world=1, fsdp=False, compile=None, micro_batch=2, seq_len=1600, response_len=1500,
                    prompts_per_step=8, group_size=16, rollout_chunks=1, rollout_batch=None, rollout_len=1600,
                    allowed=SPEECH_ROWS, chunk=256, grad_checkpointing=False, reference=False,
                    codec=XCODEC2, lora_rank=0, lora_targets=LORA_TARGETS) -> dict[str, int]:
    """Bytes per training GPU, term by term, for a Llama `config` (transformers config or LlamaConfig
    kwargs) trained with fp32 master weights, AdamW and bf16 autocast, on CUDA.

    world/fsdp: FSDP2 over `world` ranks (fully_shard per decoder layer and root, bf16 params in
    compute); without fsdp every rank holds everything (and sums gradients in buckets when world > 1).
    compile: rollouts through the compiled decode.Decoder (CUDA graphs); None: the trainer's CUDA
    default, on without fsdp (--fsdp --compile is refused); False: the eager loop. micro_batch
    sequences of seq_len tokens (prompt + response_len response tokens) per forward/backward.
    Rollouts: prompts_per_step * group_size per step over all ranks, in rollout_chunks chunks: R =
    rollout_batch (default that / world / rollout_chunks, rounded up) sequences of up to rollout_len
    tokens (prompt + response_len = max_new_tokens new ones) decoded at once on this rank, then R clips
    through `codec` (an XCodec2Config; None: no codec on this GPU). allowed rows of lm_head in the
    policy, their logits `chunk` positions at a time; reference: a frozen copy for the KL term.

    State: weights, grads, optimizer (fp32: 4, 4, 8 bytes per parameter; with fsdp rank 0's shard,
    ceil(dim0 / world) rows per parameter as FSDP2 pads dim 0), reference.
    Kept all run: decoder (with compile, decode.Decoder's buffers: decoder_cache, decoder_weights,
    decoder_head, decoder_buffers, graph_pool), codec_weights, cuda_context, nccl.
    Update (one micro-batch's forward and backward): fsdp_unsharded, weight_casts, activations
    (at the backward's start; with checkpointing, the layer inputs + one recomputed layer), head,
    logits. Step: optimizer_step, grad_bucket. Rollout (one call): rollout_weights, kv_cache, decode.
    Codec: codec_decode.
    Phases, each the largest moment of its terms: update (grads + the largest of the forward's end,
    the head's and a layer's backward, FSDP's last reduce-scatter), step (grads + the larger of the
    gradient all-reduce and AdamW), rollout (its terms summed, an upper bound), codec. Grads are freed
    after each step, so rollout and codec have none.
    persistent = weights + optimizer + reference + decoder + codec_weights + cuda_context + nccl;
    total = persistent + max(update, step, rollout, codec).
    lora_rank r > 0 (--lora-rank, lora.py): the base frozen in bf16 (2 bytes per parameter), adapters
    (`lora_params`) fp32 with their grads and AdamW state, no reference copy (adapters off), no
    weight casts or head gradient, bf16 activations (`layer_activation_bytes`), and an eager rollout
    runs on merged copies of the targeted weights (lora.merged) instead of autocast's casts."""
    compile = not fsdp if compile is None else compile
    if compile and fsdp:
        raise ValueError("--fsdp --compile is refused: FSDP reallocates the gathered weights at each unshard")
    c = _dims(config)
    shapes = _param_shapes(tuple(c[k] for k in _SHAPE_KEYS))
    n = world if fsdp else 1
    local = sum(math.ceil(s[0] / n) * math.prod(s[1:]) for _, s in shapes)  # this rank's elements
    params = sum(math.prod(s) for _, s in shapes)
    layers = c["num_hidden_layers"]
    layer = sum(math.prod(s) for name, s in shapes if name.startswith("model.layers.0."))
    # every decoder layer's q/k/v/o/gate/up/down (biases too)
    linear = sum(math.prod(s) for name, s in shapes if name.startswith("model.layers.") and "proj" in name)
    root = params - layers * layer  # embeddings, final norm, untied lm_head
    d, i, A, V = c["hidden_size"], c["intermediate_size"], allowed, c["vocab_size"]
    R = rollout_batch or math.ceil(prompts_per_step * group_size / world / rollout_chunks)
    tokens = micro_batch * seq_len
    one_layer = tokens * layer_activation_bytes(c, lora_rank, len(lora_targets))
    m = dict(weights=4 * local, grads=4 * local, optimizer=8 * local, reference=4 * local if reference else 0)
    adapters = lora_params(c, lora_rank, lora_targets)
    if lora_rank:  # this rank's adapter elements: FSDP2 shards A [r, in] and B [out, r] on dim 0
        mine = sum(math.ceil(a / n) * b for a, b in lora_shapes(c, lora_rank, lora_targets))
        m.update(weights=2 * local + 4 * mine, grads=4 * mine, optimizer=8 * mine, reference=0)
    # decode.Decoder (compile): built once per run, its buffers kept all run for the one shape every
    # rollout is padded to (R rows, L = the longest prompt + max_new_tokens slots rounded up to 128,
    # here at least max_new_tokens + 256): the bf16 KV cache (one tensor per layer for K and V), bf16
    # copies of the layers' linear weights (the step runs under autocast on fp32 master weights:
    # `layer_weights`), an fp32 copy of the allowed head rows [A, d] (the head's logits are fp32), the
    # step's state: tokens int64, logprobs fp32 and key_ok bool [R, L], noise fp32 and seen bool [R, A]
    # (seen only with a repetition penalty: counted anyway), index int64 [A], per-row scalars; and the
    # CUDA-graph pool, which keeps one set of the step's intermediates: the sampling transient (see
    # decode), ~32 bytes per logit (the cache is written in place, so no second copy of it).
    L = -(-max(rollout_len, response_len + 256) // 128) * 128
    m.update(decoder_cache=kv_cache_bytes(c, R, L), decoder_weights=2 * linear, decoder_head=4 * A * d,
             decoder_buffers=13 * R * L + 5 * R * A + 8 * A + 25 * R + 24, graph_pool=32 * R * A)
    dec = ("decoder_cache", "decoder_weights", "decoder_head", "decoder_buffers", "graph_pool")
    for k in dec:
        m[k] = m[k] if compile else 0
    m["decoder"] = sum(m[k] for k in dec)
    m["codec_weights"] = 4 * codec_param_count(codec) if codec else 0  # fp32, on the training GPU
    m["cuda_context"] = CUDA_CONTEXT
    m["nccl"] = NCCL_BUFFERS if world > 1 else 0
    # FSDP2 keeps the root (embeddings, final norm, untied lm_head) gathered in bf16 from the
    # forward to the end of the backward, which starts by adding the head's full [V, d] bf16 grad
    # into it; a decoder layer is gathered for its backward, with the next one prefetched, and
    # gets its bf16 grads: the most the gathers hold at once (the moments are below).
    root_g, layer_g = (2 * root + 2 * V * d, 6 * layer) if fsdp else (0, 0)
    if fsdp and lora_rank:  # frozen: no head grad, no bf16 layer grads (the adapters' are small)
        root_g, layer_g = 2 * root, 4 * layer + 2 * adapters // layers
    m["fsdp_unsharded"] = root_g + layer_g
    # Autocast caches the bf16 cast of every fp32 weight until the forward ends, and without
    # checkpointing backward keeps them (saved by the matmuls). FSDP's bf16 params need no cast.
    m["weight_casts"] = 0 if fsdp else 2 * adapters if lora_rank else 2 * linear  # LoRA: the base is bf16
    # After the layers: the final norm (fp32 input, normalized, output) and the gathered response
    # states [B, T, d] that the head's chunks keep. With checkpointing each layer keeps only its
    # fp32 input until backward recomputes it, one layer at a time.
    rest = tokens * (12 * d + 4) + micro_batch * response_len * 4 * d
    held = tokens * layers * 4 * d + rest if grad_checkpointing else layers * one_layer + rest
    m["activations"] = held + one_layer if grad_checkpointing else held
    # Backward starts with the head: head_rows' copy of the allowed rows gets its grad [A, d], and
    # index_select's backward a full [V, d] one, added into lm_head.weight.grad (fp32; with fsdp
    # the root's unsharded grad, counted above, takes it). The chunks' logits read the rows in
    # fp32 (llama.head_logits), within the same 4 * A * d.
    m["head"] = 4 * A * d + (0 if fsdp or lora_rank else 4 * V * d)
    m["logits"] = logits_bytes(micro_batch, min(chunk, response_len), A)
    m["optimizer_step"] = m["grads"]  # foreach AdamW's sqrt(exp_avg_sq): a temporary the size of all trained params
    # parallel.sync_gradients (replicated, world > 1): one flat fp32 copy of a bucket of grads at a time
    bucket = 4 * min(adapters, GRAD_BUCKET) if lora_rank else grad_bucket_bytes(config)
    m["grad_bucket"] = bucket if world > 1 and not fsdp else 0
    # One rollout call, under no_grad and bf16 autocast (rollout.Sampler, sample.generate). fsdp: the
    # eager loop on whole weights gathered in bf16 (no casts), with an fp32 copy of the head rows and
    # a cache of its own (freed after). Without fsdp, eager: autocast caches the bf16 cast of every
    # fp32 linear weight until the call ends, and the fp32 head rows are a copy (`head_rows`) too;
    # compiled: the steps read the Decoder's copies (counted above) and the eager prefill runs with
    # autocast's cache off (sample.generate), one weight's cast at a time, the largest an MLP matrix.
    m["kv_cache"] = 0 if compile else kv_cache_bytes(c, R, rollout_len)
    m["rollout_weights"] = 2 * params + 4 * A * d if fsdp else 2 * d * i if compile else 2 * linear + 4 * A * d
    if lora_rank:  # merged weights: eager, a bf16 copy of the layers' maps (lora.merged); compiled, the
        # fp32 temporaries of merging the largest map into the Decoder's copy (lora.weight_of)
        m["rollout_weights"] += 2 * linear if fsdp else 10 * d * i if compile else 0
    # The larger transient (measured on CPU): sampling, ~32 bytes per logit over [R, A] (top-p's
    # sort values and int64 order, softmaxes, the race), or the prefill, ~6i + 10d bytes per prompt
    # token (one layer's MLP: gate/silu, up and their product in bf16, plus fp32 residual and norm).
    # Compiled, the first token (and the prefill) run eagerly, outside the graph pool.
    m["decode"] = R * max(32 * A, (rollout_len - response_len) * (6 * i + 10 * d))
    # The codec decodes the R clips of a rollout call at once (right-padded; each up to response_len
    # codes), after the rollout: its own phase.
    m["codec_decode"] = codec_decode_bytes(codec, R, response_len) if codec else 0
    # The update's peak is the largest of these moments: the backward's start (the head's
    # backward), a layer's backward, the forward's end (with checkpointing, when the autocast
    # cache, or FSDP's current and next layer, sit beside the small checkpointed activations),
    # and with fsdp the root's reduce-scatter at the end (its bf16 grad and their fp32 copy).
    casts_layer = m["weight_casts"] // layers + layer_g
    if grad_checkpointing:
        forward_end = m["weight_casts"] + (2 * root + 4 * layer if fsdp else 0) + held + 2 * A * d + m["logits"]
        backward = root_g + held + max(m["head"] + m["logits"], one_layer + casts_layer)
    else:  # all activations (and weight casts) are alive until the first layer's backward
        forward_end = 0
        backward = m["weight_casts"] + root_g + held + max(m["head"] + m["logits"], layer_g)
    m["update"] = m["grads"] + max(forward_end, backward, 6 * root if fsdp else 0)
    m["step"] = m["grads"] + max(m["optimizer_step"], m["grad_bucket"])
    m["rollout"] = m["rollout_weights"] + m["kv_cache"] + m["decode"]
    m["codec"] = m["codec_decode"]
    m["persistent"] = (m["weights"] + m["optimizer"] + m["reference"] + m["decoder"] + m["codec_weights"]
                       + m["cuda_context"] + m["nccl"])
    m["total"] = m["persistent"] + max(m["update"], m["step"], m["rollout"], m["codec"])
    return m


def lora_shapes(config, rank: int, targets=None) -> list[tuple[int, int]]:
    """Shapes of every adapter matrix (A [r, in], B [out, r]) lora.add_adapters puts on a Llama."""
    c = _dims(config)
    targets = LORA_TARGETS if targets is None else targets
    out = []
    for name, s in _param_shapes(tuple(c[k] for k in _SHAPE_KEYS)):
        if rank and name.startswith("model.layers.") and name.endswith(".weight") and name.split(".")[-2] in targets:
            out += [(rank, s[1]), (s[0], rank)]
    return out


def lora_params(config, rank: int, targets=None) -> int:
    """Adapter parameters of lora.add_adapters(model, rank, targets=targets): r * (in + out) per map."""
    return sum(a * b for a, b in lora_shapes(config, rank, targets))


def layer_activation_bytes(config, lora_rank: int = 0, lora_maps: int = 7) -> int:
    """Bytes one decoder layer keeps for backward per token under bf16 autocast with fp32 weights
    (HF Llama, SDPA; the residual stream stays fp32 since the embedding output is fp32):
      16d + 8   both RMSNorms: fp32 input and fp32 normalized output, and the fp32 1/rms
      10d       bf16 casts of the normalized input for q, k, v, gate, up (autocast casts per op)
      2q + 4kv  SDPA's inputs: bf16 casts of the fp32 rotary q and k, and v
      2q        SDPA's output, the same storage as o_proj's input
      4 heads   SDPA's fp32 logsumexp (flash path; the math path would keep [heads, L, L])
      8i        MLP: gate out, silu(gate), up out, their product (bf16 each)
    with d hidden, q = heads * head_dim, kv = kv_heads * head_dim, i intermediate.
    With LoRA (lora_rank r on lora_maps maps, a bf16 base: the residual stream is bf16) the norms
    keep 14d less, and each adapted map 2r more (its bf16 A x, for B's gradient): measured on CPU
    with all seven maps adapted, the same per-token bytes as the saved tensors."""
    c = _dims(config)
    d, i, h = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    q, kv = h * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    if lora_rank:
        return 12 * d + 4 * q + 4 * kv + 8 * i + 4 * h + 8 + 2 * lora_rank * lora_maps
    return 26 * d + 4 * q + 4 * kv + 8 * i + 4 * h + 8


def logits_bytes(micro_batch: int, positions: int, rows: int) -> int:
    """fp32 logits [micro_batch, positions, rows] and their gradient: one chunk of the speech-only
    head (positions = chunk, rows = 65,537) or the old full-vocabulary head (positions = response
    length, rows = 193,800). Transients of the same size (bf16 matmul output, logits / temperature)
    come and go around them."""
    return 2 * 4 * micro_batch * positions * rows


def kv_cache_bytes(config, batch: int, max_len: int, dtype_bytes: int = 2) -> int:
    """llama.KVCache: k and v, one [batch, kv_heads, max_len, head_dim] tensor per layer each, bf16 by default."""
    c = _dims(config)
    return 2 * c["num_hidden_layers"] * batch * c["num_key_value_heads"] * max_len * c["head_dim"] * dtype_bytes


def codec_param_count(config: XCodec2Config = XCODEC2) -> int:
    """Parameters of codec.XCodec2Decoder(config) (built on the meta device): 186,983,682 by default."""
    return _codec_params(config)


def codec_decode_bytes(config: XCodec2Config, clips: int, frames: int) -> int:
    """Peak transient bytes of XCodec2Decoder.forward (no_grad, fp32) on `clips` code sequences
    right-padded to `frames` codes (frames / 50 seconds of audio each):
        clips * frames * max(44 * C, 100 * hop + 4 * C)
    with C = hidden_dim and hop = hop_length (output samples per code). Measured on CPU with the
    profiler (torch 2.13, small and default configs, with and without padding): a transformer
    block's MLP holds 11 fp32 values of width C per frame (the residual stream, the norm, fc1's 4C
    output and its silu, ...), the head and ISTFT 25 fp32 values per output sample (the head's
    4 hop + 2 outputs, the complex spectrum, the irfft frames windowed and masked, ...) beside the
    stream; linear in clips x frames, the same for any depth, no frames x frames attention (SDPA's
    fused kernels). Default config: 45,056 bytes per code (the MLP's), 4.3 GB for 64 clips of 30 s.
    Left out: the CPU convs' weight reorders (tens of MB) and cuDNN/cuFFT workspaces (the 10% headroom)."""
    C, hop = config.hidden_dim, config.hop_length
    return clips * frames * max(44 * C, 100 * hop + 4 * C)


def grad_bucket_bytes(config, bucket_numel: int = GRAD_BUCKET) -> int:
    """The largest flat fp32 buffer parallel.sync_gradients concatenates: parameters in order, a
    bucket closed by the parameter that brings it to `bucket_numel` elements (so it can hold more:
    at Llasa's vocabulary the [193800, d] embedding is a bucket of its own, 1.6 GB at 1B)."""
    c = _dims(config)
    largest = numel = 0
    for _, s in _param_shapes(tuple(c[k] for k in _SHAPE_KEYS)):
        numel += math.prod(s)
        if numel >= bucket_numel:
            largest, numel = max(largest, numel), 0
    return 4 * max(largest, numel)


def param_count(config) -> int:
    """Parameters of LlamaForCausalLM(config), tied embeddings counted once (built on the meta device)."""
    c = _dims(config)
    return sum(math.prod(s) for _, s in _param_shapes(tuple(c[k] for k in _SHAPE_KEYS)))


def memory_table(models=("llasa-1b", "llasa-3b", "llasa-8b"), replicated=(1, 2), worlds=(2, 4, 8),
                 cards=(48, 80, 141), headroom=0.1, lora_rank=0, **recipe) -> str:
    """Markdown table of `training_memory` in GB (1e9 bytes) per training GPU for each model,
    replicated over each of `replicated` and with FSDP over each of `worlds`, grad checkpointing (GC)
    off and on, compiled decoding where the trainer's default has it (not with FSDP). A card fits if
    the total is at most (1 - headroom) of its size. `recipe` overrides training_memory's defaults
    (the seed recipe). lora_rank > 0: LoRA of that rank on the default targets (--lora-rank)."""
    g = lambda b: f"{b / GB:.1f}"  # noqa: E731
    phase = lambda m: max(("update", "step", "rollout", "codec"), key=m.get)  # noqa: E731
    cols = ["model", "sharding", "w + g + Adam", "FSDP gathers", "activations (GC off / on)",
            "casts + head + logits", "decoder: cache + weights + head + rest", "rollout: KV + weights + decode",
            "codec: weights + decode", "context + NCCL", "total, GC off", "total, GC on",
            *(f"{c} GB card" for c in cards)]
    rows = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name in models:
        for w, fsdp in [(w, False) for w in replicated] + [(w, True) for w in worlds]:
            off, on = (training_memory(LLASA_SHAPES[name], world=w, fsdp=fsdp, grad_checkpointing=gc,
                                       lora_rank=lora_rank, **recipe)
                       for gc in (False, True))
            fits = ["yes" if off["total"] <= (1 - headroom) * c * GB else
                    "with GC" if on["total"] <= (1 - headroom) * c * GB else "no" for c in cards]
            rest = off["decoder_head"] and g(off["decoder_buffers"] + off["graph_pool"])
            rows.append("| " + " | ".join([
                f"{name} ({param_count(LLASA_SHAPES[name]) / 1e9:.2f}B)" + (f", LoRA r={lora_rank}" if lora_rank else ""),
                f"{'FSDP' if fsdp else 'replicated'} x{w}",
                g(off["weights"] + off["grads"] + off["optimizer"]), g(off["fsdp_unsharded"]),
                f"{g(off['activations'])} / {g(on['activations'])}",
                g(off["weight_casts"] + off["head"] + off["logits"]),
                f"{g(off['decoder'])} = {g(off['decoder_cache'])} + {g(off['decoder_weights'])} + "
                f"{g(off['decoder_head'])} + {rest}" if off["decoder"] else "eager: 0",
                f"{g(off['rollout'])} = {g(off['kv_cache'])} + {g(off['rollout_weights'])} + {g(off['decode'])}",
                f"{g(off['codec_weights'] + off['codec_decode'])} = {g(off['codec_weights'])} + "
                f"{g(off['codec_decode'])}",
                g(off["cuda_context"] + off["nccl"]),
                f"{g(off['total'])} ({phase(off)})", f"{g(on['total'])} ({phase(on)})", *fits]) + " |")
    r = {**dict(micro_batch=2, seq_len=1600, response_len=1500, prompts_per_step=8, group_size=16,
                rollout_chunks=1, chunk=256), **recipe}
    speech = training_memory(LLASA_SHAPES[models[0]], **recipe)["logits"]
    full = logits_bytes(r["micro_batch"], r["response_len"], LLASA_SHAPES[models[0]]["vocab_size"])
    n = r["prompts_per_step"] * r["group_size"]
    return "\n".join(rows + [
        "",
        f"GB = 1e9 bytes per training GPU; a card fits with {headroom:.0%} left for allocator fragmentation and "
        f"library workspaces (\"with GC\": only with --grad-checkpointing). Micro-batches of {r['micro_batch']} x "
        f"{r['seq_len']} tokens ({r['response_len']}-token responses); {n} rollouts per step over all ranks, "
        f"{n} / world / {r['rollout_chunks']} (--rollout-chunks) decoded at once per rank and then passed to the "
        "codec together. Decoder: the compiled decode step's buffers (CUDA without --fsdp), kept all run; "
        "rollout: one call's extra; context: the CUDA context (0.5 GB) and, for world > 1, NCCL's buffers "
        f"(0.3 GB); the phase in brackets is the peak: update (forward/backward), step (all-reduce, AdamW), "
        "rollout or codec.",
        f"Logits of a micro-batch (fp32 + grad): {g(speech)} GB with the speech-only head, {r['chunk']} "
        f"positions at a time; {g(full)} GB with the old full-vocabulary head over all {r['response_len']} "
        f"positions ({full / speech:.0f}x)."])


# ----------------------------------------------------------------------------- helpers

def _dims(config) -> dict:
    """The size-relevant fields of a Llama config (transformers config or LlamaConfig kwargs)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**config) if isinstance(config, dict) else config
    out = {k: getattr(cfg, k, False) for k in _SHAPE_KEYS}
    out["head_dim"] = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return out


@functools.lru_cache(maxsize=32)
def _param_shapes(key: tuple) -> tuple:
    """((name, shape), ...) of LlamaForCausalLM's parameters (tied ones once), built on the meta
    device: exact counts, no memory, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**dict(zip(_SHAPE_KEYS, key))))
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


@functools.lru_cache(maxsize=8)
def _codec_params(config: XCodec2Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in XCodec2Decoder(config).parameters())


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora-rank", type=int, default=0, help="the table for LoRA of this rank (default: 0, full "
                                                               "fine-tuning)")
    print(memory_table(lora_rank=p.parse_args().lora_rank))
