"""Memory per training GPU for GRPO on LLASA: `training_memory` (bytes, term by term) and
`memory_table` (docs/memory.md's tables). `python -m tools.memory [--lora-rank R]` prints a table.

Every term counts tensors the trainer really holds (grpo.update_policy, rollout.Sampler,
sample.generate, decode.Decoder, codec.XCodec2Decoder); each tensor kind's size comes from
tools.memory_terms. The tests check the terms against real tensors and CPU-measured peaks of small
models (FSDP's one-layer prefetch, the CUDA SDPA kernel and the CUDA-graph pool are taken from
their design). Sizes are in bytes; the table is in GB (1e9 bytes). The CUDA context and NCCL's
buffers are fixed estimates (CUDA_CONTEXT, NCCL_BUFFERS); not counted: allocator fragmentation and
cuBLAS/cuDNN/cuFFT workspaces (the table's 10% headroom is for them), the reference model's forward
(only with --kl-coef > 0).
"""

import argparse
import math

from lora import TARGETS as LORA_TARGETS
from tools.memory_terms import (
    CUDA_CONTEXT,
    GB,
    GRAD_BUCKET,
    LLASA_SHAPES,
    NCCL_BUFFERS,
    SPEECH_ROWS,
    XCODEC2,
    codec_decode_bytes,
    codec_param_count,
    grad_bucket_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    llama_dims,
    logits_bytes,
    lora_params,
    lora_shapes,
    param_count,
    param_shapes,
)

# The terms of decode.Decoder's buffers, kept all run with the compiled step.
DECODER_TERMS = (
    "decoder_cache",
    "decoder_weights",
    "decoder_head",
    "decoder_buffers",
    "graph_pool",
)
PHASES = ("update", "step", "rollout", "codec")
# training_memory's defaults, the seed recipe (memory_table's footnote reads them)
RECIPE = dict(
    micro_batch=2,
    seq_len=1600,
    response_len=1500,
    prompts_per_step=8,
    group_size=16,
    rollout_chunks=1,
    chunk=256,
)


def training_memory(
    config,
    *,
    world=1,
    fsdp=False,
    compile=None,
    micro_batch=2,
    seq_len=1600,
    response_len=1500,
    prompts_per_step=8,
    group_size=16,
    rollout_chunks=1,
    rollout_batch=None,
    rollout_len=1600,
    allowed=SPEECH_ROWS,
    chunk=256,
    grad_checkpointing=False,
    reference=False,
    codec=XCODEC2,
    lora_rank=0,
    lora_targets=LORA_TARGETS,
) -> dict[str, int]:
    """Bytes per training GPU, term by term, for a Llama `config` (transformers config or
    LlamaConfig kwargs) trained with fp32 master weights, AdamW and bf16 autocast, on CUDA.

    world/fsdp: FSDP2 over `world` ranks (fully_shard per decoder layer and root, bf16 params in
    compute); without fsdp every rank holds everything (and sums gradients in buckets when
    world > 1). compile: rollouts through the compiled decode.Decoder (CUDA graphs); None: the
    trainer's CUDA default, on without fsdp; False: the eager loop; True with fsdp raises
    ValueError (--fsdp --compile is refused). micro_batch sequences of seq_len tokens (prompt +
    response_len response tokens) per forward/backward.
    Rollouts: prompts_per_step * group_size per step over all ranks, in rollout_chunks chunks: R =
    rollout_batch (default that / world / rollout_chunks, rounded up) sequences of up to
    rollout_len tokens (prompt + response_len = max_new_tokens new ones) decoded at once on this
    rank, then R clips through `codec` (an XCodec2Config; None: no codec on this GPU). allowed rows
    of lm_head in the policy, their logits `chunk` positions at a time; reference: a frozen copy
    for the KL term.

    State: weights, grads, optimizer (fp32: 4, 4, 8 bytes per parameter; with fsdp rank 0's
    shard, ceil(dim0 / world) rows per parameter as FSDP2 pads dim 0), reference.
    Kept all run: decoder (with compile, decode.Decoder's buffers: DECODER_TERMS), codec_weights,
    cuda_context, nccl.
    Update (one micro-batch's forward and backward): fsdp_unsharded, weight_casts, activations
    (at the backward's start; with checkpointing, the layer inputs + one recomputed layer), head,
    logits. Step: optimizer_step, grad_bucket. Rollout (one call): rollout_weights, kv_cache,
    decode. Codec: codec_decode.
    Phases, each the largest moment of its terms: update (grads + the largest of the forward's
    end, the head's and a layer's backward, FSDP's last reduce-scatter), step (grads + the larger
    of the gradient all-reduce and AdamW), rollout (its terms summed, an upper bound), codec.
    Grads are freed after each step, so rollout and codec have none.
    persistent = weights + optimizer + reference + decoder + codec_weights + cuda_context + nccl;
    total = persistent + max(update, step, rollout, codec).
    lora_rank r > 0 (--lora-rank, lora.py): the base frozen in bf16 (2 bytes per parameter),
    adapters (`lora_params`) fp32 with their grads and AdamW state, no reference copy (adapters
    off), no weight casts or head gradient, bf16 activations (`layer_activation_bytes`), and an
    eager rollout runs on merged copies of the targeted weights (lora.merged) instead of
    autocast's casts."""
    if compile is None:
        compile = not fsdp
    if compile and fsdp:
        raise ValueError(
            "--fsdp --compile is refused: FSDP reallocates the gathered weights at each unshard"
        )
    c = llama_dims(config)
    shapes = param_shapes(config)
    n = world if fsdp else 1  # ranks a parameter is sharded over
    local = sum(math.ceil(s[0] / n) * math.prod(s[1:]) for _, s in shapes)  # this rank's elements
    params = sum(math.prod(s) for _, s in shapes)
    layers = c["num_hidden_layers"]
    layer = sum(math.prod(s) for name, s in shapes if name.startswith("model.layers.0."))
    # every decoder layer's q/k/v/o/gate/up/down (biases too)
    linear = sum(
        math.prod(s) for name, s in shapes if name.startswith("model.layers.") and "proj" in name
    )
    root = params - layers * layer  # embeddings, final norm, untied lm_head
    d = c["hidden_size"]
    i = c["intermediate_size"]
    A = allowed
    V = c["vocab_size"]
    R = rollout_batch or math.ceil(prompts_per_step * group_size / world / rollout_chunks)
    tokens = micro_batch * seq_len
    one_layer = tokens * layer_activation_bytes(c, lora_rank, len(lora_targets))
    m = dict(
        weights=4 * local,
        grads=4 * local,
        optimizer=8 * local,
        reference=4 * local if reference else 0,
    )
    adapters = lora_params(c, lora_rank, lora_targets)
    if lora_rank:  # this rank's adapter elements: FSDP2 shards A [r, in] and B [out, r] on dim 0
        mine = sum(math.ceil(a / n) * b for a, b in lora_shapes(c, lora_rank, lora_targets))
        m.update(weights=2 * local + 4 * mine, grads=4 * mine, optimizer=8 * mine, reference=0)
    # decode.Decoder (compile): built once per run, its buffers kept all run for the one shape
    # every rollout is padded to (R rows, L = the longest prompt + max_new_tokens slots rounded up
    # to 128, here at least max_new_tokens + 256): the bf16 KV cache (one tensor per layer for K
    # and V), bf16 copies of the layers' linear weights (the step runs under autocast on fp32
    # master weights: `layer_weights`), an fp32 copy of the allowed head rows [A, d] (the head's
    # logits are fp32), the step's state: tokens int64, logprobs fp32 and key_ok bool [R, L],
    # noise fp32 and seen bool [R, A] (seen only with a repetition penalty: counted anyway), index
    # int64 [A], per-row scalars; and the CUDA-graph pool, which keeps one set of the step's
    # intermediates: the sampling transient (see decode), ~32 bytes per logit (the cache is
    # written in place, so no second copy of it).
    L = -(-max(rollout_len, response_len + 256) // 128) * 128
    m.update(
        decoder_cache=kv_cache_bytes(c, R, L),
        decoder_weights=2 * linear,
        decoder_head=4 * A * d,
        decoder_buffers=13 * R * L + 5 * R * A + 8 * A + 25 * R + 24,
        graph_pool=32 * R * A,
    )
    if not compile:
        for k in DECODER_TERMS:
            m[k] = 0
    m["decoder"] = sum(m[k] for k in DECODER_TERMS)
    m["codec_weights"] = 4 * codec_param_count(codec) if codec else 0  # fp32, on the training GPU
    m["cuda_context"] = CUDA_CONTEXT
    m["nccl"] = NCCL_BUFFERS if world > 1 else 0
    # FSDP2 keeps the root (embeddings, final norm, untied lm_head) gathered in bf16 from the
    # forward to the end of the backward, which starts by adding the head's full [V, d] bf16 grad
    # into it; a decoder layer is gathered for its backward, with the next one prefetched, and
    # gets its bf16 grads: the most the gathers hold at once (the moments are below).
    if fsdp and lora_rank:  # frozen: no head grad, no bf16 layer grads (the adapters' are small)
        root_g = 2 * root
        layer_g = 4 * layer + 2 * adapters // layers
    elif fsdp:
        root_g = 2 * root + 2 * V * d
        layer_g = 6 * layer
    else:
        root_g = 0
        layer_g = 0
    m["fsdp_unsharded"] = root_g + layer_g
    # Autocast caches the bf16 cast of every fp32 weight until the forward ends, and without
    # checkpointing backward keeps them (saved by the matmuls). FSDP's bf16 params need no cast;
    # with LoRA the base is bf16, so only the adapters are cast.
    if fsdp:
        m["weight_casts"] = 0
    elif lora_rank:
        m["weight_casts"] = 2 * adapters
    else:
        m["weight_casts"] = 2 * linear
    # After the layers: the final norm (fp32 input, normalized, output) and the gathered response
    # states [B, T, d] that the head's chunks keep. With checkpointing each layer keeps only its
    # fp32 input until backward recomputes it, one layer at a time.
    rest = tokens * (12 * d + 4) + micro_batch * response_len * 4 * d
    if grad_checkpointing:
        held = tokens * layers * 4 * d + rest
        m["activations"] = held + one_layer
    else:
        held = layers * one_layer + rest
        m["activations"] = held
    # Backward starts with the head: head_rows' copy of the allowed rows gets its grad [A, d], and
    # index_select's backward a full [V, d] one, added into lm_head.weight.grad (fp32; with fsdp
    # the root's unsharded grad, counted above, takes it). The chunks' logits read the rows in
    # fp32 (llama.head_logits), within the same 4 * A * d.
    m["head"] = 4 * A * d + (0 if fsdp or lora_rank else 4 * V * d)
    m["logits"] = logits_bytes(micro_batch, min(chunk, response_len), A)
    # foreach AdamW's sqrt(exp_avg_sq): a temporary the size of all trained params
    m["optimizer_step"] = m["grads"]
    # parallel.sync_gradients (replicated, world > 1): one flat fp32 copy of a bucket of grads at
    # a time
    bucket = 4 * min(adapters, GRAD_BUCKET) if lora_rank else grad_bucket_bytes(config)
    m["grad_bucket"] = bucket if world > 1 and not fsdp else 0
    # One rollout call, under no_grad and bf16 autocast (rollout.Sampler, sample.generate). fsdp:
    # the eager loop on whole weights gathered in bf16 (no casts), with an fp32 copy of the head
    # rows and a cache of its own (freed after). Without fsdp, eager: autocast caches the bf16 cast
    # of every fp32 linear weight until the call ends, and the fp32 head rows are a copy
    # (`head_rows`) too; compiled: the steps read the Decoder's copies (counted above) and the
    # eager prefill runs with autocast's cache off (sample.generate), one weight's cast at a time,
    # the largest an MLP matrix.
    m["kv_cache"] = 0 if compile else kv_cache_bytes(c, R, rollout_len)
    if fsdp:
        m["rollout_weights"] = 2 * params + 4 * A * d
    elif compile:
        m["rollout_weights"] = 2 * d * i
    else:
        m["rollout_weights"] = 2 * linear + 4 * A * d
    # LoRA's merged weights: with fsdp a bf16 copy of the layers' maps (lora.merged); compiled,
    # the fp32 temporaries of merging the largest map into the Decoder's copy (lora.weight_of);
    # eager, autocast's casts counted above.
    if lora_rank and fsdp:
        m["rollout_weights"] += 2 * linear
    elif lora_rank and compile:
        m["rollout_weights"] += 10 * d * i
    # The larger transient (measured on CPU): sampling, ~32 bytes per logit over [R, A] (top-p's
    # sort values and int64 order, softmaxes, the race), or the prefill, ~6i + 10d bytes per
    # prompt token (one layer's MLP: gate/silu, up and their product in bf16, plus fp32 residual
    # and norm). Compiled, the first token (and the prefill) run eagerly, outside the graph pool.
    m["decode"] = R * max(32 * A, (rollout_len - response_len) * (6 * i + 10 * d))
    # The codec decodes the R clips of a rollout call at once (right-padded; each up to
    # response_len codes), after the rollout: its own phase.
    m["codec_decode"] = codec_decode_bytes(codec, R, response_len) if codec else 0
    # The update's peak is the largest of these moments: the backward's start (the head's
    # backward), a layer's backward, the forward's end (with checkpointing, when the autocast
    # cache, or FSDP's current and next layer, sit beside the small checkpointed activations),
    # and with fsdp the root's reduce-scatter at the end (its bf16 grad and their fp32 copy).
    casts_layer = m["weight_casts"] // layers + layer_g
    head_moment = m["head"] + m["logits"]
    if grad_checkpointing:
        gathered = 2 * root + 4 * layer if fsdp else 0
        forward_end = m["weight_casts"] + gathered + held + 2 * A * d + m["logits"]
        backward = root_g + held + max(head_moment, one_layer + casts_layer)
    else:  # all activations (and weight casts) are alive until the first layer's backward
        forward_end = 0
        backward = m["weight_casts"] + root_g + held + max(head_moment, layer_g)
    reduce_scatter = 6 * root if fsdp else 0
    m["update"] = m["grads"] + max(forward_end, backward, reduce_scatter)
    m["step"] = m["grads"] + max(m["optimizer_step"], m["grad_bucket"])
    m["rollout"] = m["rollout_weights"] + m["kv_cache"] + m["decode"]
    m["codec"] = m["codec_decode"]
    kept = ("weights", "optimizer", "reference", "decoder", "codec_weights", "cuda_context", "nccl")
    m["persistent"] = sum(m[k] for k in kept)
    m["total"] = m["persistent"] + max(m[phase] for phase in PHASES)
    return m


def _gb(n: int) -> str:
    """Bytes as GB (1e9) with one decimal."""
    return f"{n / GB:.1f}"


def _peak_phase(m: dict) -> str:
    """The phase (PHASES) with the largest bytes in a training_memory result."""
    return max(PHASES, key=m.get)


def _fits(off: dict, on: dict, card_gb: float, headroom: float) -> str:
    """A card's column: 'yes', 'with GC' (only with grad checkpointing) or 'no'."""
    usable = (1 - headroom) * card_gb * GB
    if off["total"] <= usable:
        return "yes"
    if on["total"] <= usable:
        return "with GC"
    return "no"


def _row(name, w, fsdp, off, on, cards, headroom, lora_rank) -> str:
    """One markdown row of memory_table: a model and sharding, GC off (`off`) and on (`on`)."""
    model = f"{name} ({param_count(LLASA_SHAPES[name]) / 1e9:.2f}B)"
    if lora_rank:
        model += f", LoRA r={lora_rank}"
    if off["decoder"]:
        rest = _gb(off["decoder_buffers"] + off["graph_pool"])
        decoder = (
            f"{_gb(off['decoder'])} = {_gb(off['decoder_cache'])} + "
            f"{_gb(off['decoder_weights'])} + {_gb(off['decoder_head'])} + {rest}"
        )
    else:
        decoder = "eager: 0"
    rollout = (
        f"{_gb(off['rollout'])} = {_gb(off['kv_cache'])} + {_gb(off['rollout_weights'])} + "
        f"{_gb(off['decode'])}"
    )
    codec = (
        f"{_gb(off['codec_weights'] + off['codec_decode'])} = {_gb(off['codec_weights'])} + "
        f"{_gb(off['codec_decode'])}"
    )
    cells = [
        model,
        f"{'FSDP' if fsdp else 'replicated'} x{w}",
        _gb(off["weights"] + off["grads"] + off["optimizer"]),
        _gb(off["fsdp_unsharded"]),
        f"{_gb(off['activations'])} / {_gb(on['activations'])}",
        _gb(off["weight_casts"] + off["head"] + off["logits"]),
        decoder,
        rollout,
        codec,
        _gb(off["cuda_context"] + off["nccl"]),
        f"{_gb(off['total'])} ({_peak_phase(off)})",
        f"{_gb(on['total'])} ({_peak_phase(on)})",
        *(_fits(off, on, card, headroom) for card in cards),
    ]
    return "| " + " | ".join(cells) + " |"


def memory_table(
    models=("llasa-1b", "llasa-3b", "llasa-8b"),
    replicated=(1, 2),
    worlds=(2, 4, 8),
    cards=(48, 80, 141),
    headroom=0.1,
    lora_rank=0,
    **recipe,
) -> str:
    """Markdown table of `training_memory` in GB (1e9 bytes) per training GPU for each model,
    replicated over each of `replicated` and with FSDP over each of `worlds`, grad checkpointing
    (GC) off and on, compiled decoding where the trainer's default has it (not with FSDP), and two
    footnote lines. A card fits if the total is at most (1 - headroom) of its size. `recipe`
    overrides training_memory's defaults (RECIPE, the seed's). lora_rank > 0: LoRA of that rank on
    the default targets (--lora-rank)."""
    cols = [
        "model",
        "sharding",
        "w + g + Adam",
        "FSDP gathers",
        "activations (GC off / on)",
        "casts + head + logits",
        "decoder: cache + weights + head + rest",
        "rollout: KV + weights + decode",
        "codec: weights + decode",
        "context + NCCL",
        "total, GC off",
        "total, GC on",
        *(f"{c} GB card" for c in cards),
    ]
    rows = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    shardings = [(w, False) for w in replicated] + [(w, True) for w in worlds]
    for name in models:
        for w, fsdp in shardings:
            kw = dict(world=w, fsdp=fsdp, lora_rank=lora_rank, **recipe)
            off = training_memory(LLASA_SHAPES[name], grad_checkpointing=False, **kw)
            on = training_memory(LLASA_SHAPES[name], grad_checkpointing=True, **kw)
            rows.append(_row(name, w, fsdp, off, on, cards, headroom, lora_rank))
    r = {**RECIPE, **recipe}
    speech = training_memory(LLASA_SHAPES[models[0]], **recipe)["logits"]
    vocab = LLASA_SHAPES[models[0]]["vocab_size"]
    full = logits_bytes(r["micro_batch"], r["response_len"], vocab)
    n = r["prompts_per_step"] * r["group_size"]
    footnote = (
        f"GB = 1e9 bytes per training GPU; a card fits with {headroom:.0%} left for allocator "
        'fragmentation and library workspaces ("with GC": only with --grad-checkpointing). '
        f"Micro-batches of {r['micro_batch']} x {r['seq_len']} tokens ({r['response_len']}-token "
        f"responses); {n} rollouts per step over all ranks, {n} / world / {r['rollout_chunks']} "
        "(--rollout-chunks) decoded at once per rank and then passed to the codec together. "
        "Decoder: the compiled decode step's buffers (CUDA without --fsdp), kept all run; "
        "rollout: one call's extra; context: the CUDA context (0.5 GB) and, for world > 1, NCCL's "
        "buffers (0.3 GB); the phase in brackets is the peak: update (forward/backward), step "
        "(all-reduce, AdamW), rollout or codec."
    )
    logits = (
        f"Logits of a micro-batch (fp32 + grad): {_gb(speech)} GB with the speech-only head, "
        f"{r['chunk']} positions at a time; {_gb(full)} GB with the old full-vocabulary head over "
        f"all {r['response_len']} positions ({full / speech:.0f}x)."
    )
    return "\n".join([*rows, "", footnote, logits])


def main(argv=None) -> None:
    """Print memory_table for full fine-tuning, or for LoRA of --lora-rank."""
    p = argparse.ArgumentParser(
        prog="python -m tools.memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="the table for LoRA of this rank (default: 0, full fine-tuning)",
    )
    args = p.parse_args(argv)
    print(memory_table(lora_rank=args.lora_rank))


if __name__ == "__main__":
    main()
