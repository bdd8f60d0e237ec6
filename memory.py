"""Memory per training GPU for GRPO on LLASA: `training_memory` (bytes, term by term) and
`memory_table` (the README's table). `python memory.py` prints the table.

Every term counts tensors the trainer really holds (grpo.update_policy, sample.generate); the
tests check them against real tensors and CPU-measured peaks of small models (FSDP's one-layer
prefetch and the CUDA SDPA kernel are taken from their design). Sizes are in bytes; the table is
in GB (1e9 bytes). Not counted: the CUDA context and allocator fragmentation (the table's 10% headroom
is for them), the reference model's forward (only with --kl-coef > 0), NCCL buffers.
"""
import functools
import math

import torch

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
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")


def training_memory(config, *, world=1, fsdp=False, micro_batch=2, seq_len=1600, response_len=1500,
                    rollout_batch=64, rollout_len=1600, allowed=SPEECH_ROWS, chunk=256,
                    grad_checkpointing=False, reference=False) -> dict[str, int]:
    """Bytes per training GPU, term by term, for a Llama `config` (transformers config or LlamaConfig
    kwargs) trained with fp32 master weights, AdamW and bf16 autocast.

    world/fsdp: FSDP2 over `world` ranks (fully_shard per decoder layer and root, bf16 params in
    compute); without fsdp every rank holds everything. micro_batch sequences of seq_len tokens
    (prompt + response_len response tokens) per forward/backward; rollout_batch sequences of up to
    rollout_len tokens decoded at once on this rank; allowed rows of lm_head in the policy, their
    logits `chunk` positions at a time; reference: a frozen copy for the KL term.

    State: weights, grads, optimizer (fp32: 4, 4, 8 bytes per parameter; with fsdp rank 0's shard,
    ceil(dim0 / world) rows per parameter as FSDP2 pads dim 0), reference.
    Update (one micro-batch's forward and backward): fsdp_unsharded, weight_casts, activations
    (at the backward's start; with checkpointing, the layer inputs + one recomputed layer), head,
    logits. Optimizer step: optimizer_step. Rollout: rollout_weights, kv_cache, decode.
    Phases, each the largest moment of its terms: update (grads + the largest of the forward's end,
    the head's and a layer's backward, FSDP's last reduce-scatter), step (grads + optimizer_step),
    rollout (its terms summed, an upper bound). Grads are freed after each step, so the rollout has none.
    total = weights + optimizer + reference + max(update, step, rollout)."""
    c = _dims(config)
    shapes = _param_shapes(tuple(c[k] for k in _SHAPE_KEYS))
    n = world if fsdp else 1
    local = sum(math.ceil(s[0] / n) * math.prod(s[1:]) for _, s in shapes)  # this rank's elements
    params = sum(math.prod(s) for _, s in shapes)
    layers = c["num_hidden_layers"]
    layer = sum(math.prod(s) for name, s in shapes if name.startswith("model.layers.0."))
    linear = sum(math.prod(s) for name, s in shapes if name.startswith("model.layers.") and "proj" in name)
    root = params - layers * layer  # embeddings, final norm, untied lm_head
    d, i, A, V = c["hidden_size"], c["intermediate_size"], allowed, c["vocab_size"]
    tokens = micro_batch * seq_len
    one_layer = tokens * layer_activation_bytes(c)
    m = dict(weights=4 * local, grads=4 * local, optimizer=8 * local, reference=4 * local if reference else 0)
    # FSDP2 keeps the root (embeddings, final norm, untied lm_head) gathered in bf16 from the
    # forward to the end of the backward, which starts by adding the head's full [V, d] bf16 grad
    # into it; a decoder layer is gathered for its backward, with the next one prefetched, and
    # gets its bf16 grads: the most the gathers hold at once (the moments are below).
    root_g, layer_g = (2 * root + 2 * V * d, 6 * layer) if fsdp else (0, 0)
    m["fsdp_unsharded"] = root_g + layer_g
    # Autocast caches the bf16 cast of every fp32 weight until the forward ends, and without
    # checkpointing backward keeps them (saved by the matmuls). FSDP's bf16 params need no cast.
    m["weight_casts"] = 0 if fsdp else 2 * linear
    # After the layers: the final norm (fp32 input, normalized, output) and the gathered response
    # states [B, T, d] that the head's chunks keep. With checkpointing each layer keeps only its
    # fp32 input until backward recomputes it, one layer at a time.
    rest = tokens * (12 * d + 4) + micro_batch * response_len * 4 * d
    held = tokens * layers * 4 * d + rest if grad_checkpointing else layers * one_layer + rest
    m["activations"] = held + one_layer if grad_checkpointing else held
    # Backward starts with the head: head_rows' copy of the allowed rows gets its grad [A, d], and
    # index_select's backward a full [V, d] one, added into lm_head.weight.grad (fp32; with fsdp
    # the root's unsharded grad, counted above, takes it). Before that the chunks' bf16 copy of
    # the rows and its grad: 2 + 2 bytes per element, within the same 4 * A * d.
    m["head"] = 4 * A * d + (0 if fsdp else 4 * V * d)
    m["logits"] = logits_bytes(micro_batch, min(chunk, response_len), A)
    m["optimizer_step"] = 4 * local  # foreach AdamW's sqrt(exp_avg_sq): a temporary the size of all params
    # Decoding needs whole weights: with fsdp a gathered bf16 copy; both keep head_rows' copy of
    # the allowed rows ([A, d], the weights' dtype), and without fsdp cast one weight at a time to
    # bf16 (inference_mode: autocast caches nothing), the largest the head's or an MLP matrix.
    m["rollout_weights"] = 2 * params + 2 * A * d if fsdp else 4 * A * d + 2 * max(A * d, d * i)
    m["kv_cache"] = kv_cache_bytes(c, rollout_batch, rollout_len)
    # The larger transient (measured on CPU): sampling, ~32 bytes per logit over [B, A] (top-p's
    # sort values and int64 order, softmaxes, the race), or the prefill, ~6i + 10d bytes per prompt
    # token (one layer's MLP: gate/silu, up and their product in bf16, plus fp32 residual and norm).
    m["decode"] = rollout_batch * max(32 * A, (rollout_len - response_len) * (6 * i + 10 * d))
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
    m["step"] = m["grads"] + m["optimizer_step"]
    m["rollout"] = m["rollout_weights"] + m["kv_cache"] + m["decode"]
    m["total"] = m["weights"] + m["optimizer"] + m["reference"] + max(m["update"], m["step"], m["rollout"])
    return m


def layer_activation_bytes(config) -> int:
    """Bytes one decoder layer keeps for backward per token under bf16 autocast with fp32 weights
    (HF Llama, SDPA; the residual stream stays fp32 since the embedding output is fp32):
      16d + 8   both RMSNorms: fp32 input and fp32 normalized output, and the fp32 1/rms
      10d       bf16 casts of the normalized input for q, k, v, gate, up (autocast casts per op)
      2q + 4kv  SDPA's inputs: bf16 casts of the fp32 rotary q and k, and v
      2q        SDPA's output, the same storage as o_proj's input
      4 heads   SDPA's fp32 logsumexp (flash path; the math path would keep [heads, L, L])
      8i        MLP: gate out, silu(gate), up out, their product (bf16 each)
    with d hidden, q = heads * head_dim, kv = kv_heads * head_dim, i intermediate."""
    c = _dims(config)
    d, i, h = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    q, kv = h * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    return 26 * d + 4 * q + 4 * kv + 8 * i + 4 * h + 8


def logits_bytes(micro_batch: int, positions: int, rows: int) -> int:
    """fp32 logits [micro_batch, positions, rows] and their gradient: one chunk of the speech-only
    head (positions = chunk, rows = 65,537) or the old full-vocabulary head (positions = response
    length, rows = 193,800). Transients of the same size (bf16 matmul output, logits / temperature)
    come and go around them."""
    return 2 * 4 * micro_batch * positions * rows


def kv_cache_bytes(config, batch: int, max_len: int, dtype_bytes: int = 2) -> int:
    """llama.KVCache: k and v [layers, batch, kv_heads, max_len, head_dim], bf16 by default."""
    c = _dims(config)
    return 2 * c["num_hidden_layers"] * batch * c["num_key_value_heads"] * max_len * c["head_dim"] * dtype_bytes


def param_count(config) -> int:
    """Parameters of LlamaForCausalLM(config), tied embeddings counted once (built on the meta device)."""
    c = _dims(config)
    return sum(math.prod(s) for _, s in _param_shapes(tuple(c[k] for k in _SHAPE_KEYS)))


def memory_table(models=("llasa-1b", "llasa-3b", "llasa-8b"), worlds=(2, 4, 8), cards=(48, 80),
                 headroom=0.1, **recipe) -> str:
    """Markdown table of `training_memory` in GB (1e9 bytes) per training GPU for each model,
    replicated and with FSDP over each of `worlds`, grad checkpointing (GC) off and on. A card
    fits if the total is at most (1 - headroom) of its size. `recipe` overrides training_memory's
    defaults (the seed recipe)."""
    g = lambda b: f"{b / GB:.1f}"  # noqa: E731
    phase = lambda m: max(("update", "step", "rollout"), key=m.get)  # noqa: E731
    cols = ["model", "sharding", "w + g + Adam", "FSDP gathers", "activations (GC off / on)",
            "casts + head + logits", "rollout: KV + weights + decode", "total, GC off", "total, GC on",
            *(f"{c} GB card" for c in cards)]
    rows = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name in models:
        for w in (1, *worlds):
            off, on = (training_memory(LLASA_SHAPES[name], world=w, fsdp=w > 1, grad_checkpointing=gc, **recipe)
                       for gc in (False, True))
            fits = ["yes" if off["total"] <= (1 - headroom) * c * GB else
                    "with GC" if on["total"] <= (1 - headroom) * c * GB else "no" for c in cards]
            rows.append("| " + " | ".join([
                f"{name} ({param_count(LLASA_SHAPES[name]) / 1e9:.2f}B)", "replicated" if w == 1 else f"FSDP x{w}",
                g(off["weights"] + off["grads"] + off["optimizer"]), g(off["fsdp_unsharded"]),
                f"{g(off['activations'])} / {g(on['activations'])}",
                g(off["weight_casts"] + off["head"] + off["logits"]),
                f"{g(off['rollout'])} = {g(off['kv_cache'])} + {g(off['rollout_weights'])} + {g(off['decode'])}",
                f"{g(off['total'])} ({phase(off)})", f"{g(on['total'])} ({phase(on)})", *fits]) + " |")
    r = {**dict(micro_batch=2, seq_len=1600, response_len=1500, rollout_batch=64, chunk=256), **recipe}
    speech = training_memory(LLASA_SHAPES[models[0]], **recipe)["logits"]
    full = logits_bytes(r["micro_batch"], r["response_len"], LLASA_SHAPES[models[0]]["vocab_size"])
    return "\n".join(rows + [
        "",
        f"GB = 1e9 bytes per training GPU; a card fits with {headroom:.0%} left for the CUDA context and "
        f"fragmentation (\"with GC\": only with --grad-checkpointing). Micro-batches of {r['micro_batch']} x "
        f"{r['seq_len']} tokens ({r['response_len']}-token responses), {r['rollout_batch']} rollout sequences "
        "per rank; the phase in brackets is the peak: update (forward/backward), step (AdamW) or rollout.",
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


if __name__ == "__main__":
    print(memory_table())
