"""The static-shape decode step that `--compile` captures (gpt-fast's design): one new token per
row, with shapes that never change and no host sync.

`DecodeState` holds every tensor the step reads or writes (the KV cache, one tensor per layer,
written in place at a position tensor; the outputs; the sampling state), preallocated and kept at
fixed addresses by `decode.Decoder`, which compiles `decode_step` once per attention span.
`emit_token` samples and records a token as tensor ops; `forward_static` is llama.py's `forward`
for one token at a slot given as a tensor, over a fixed prefix of the cache.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llama import KVCache, head_logits, process_logits, rotate, sample_token, token_logprobs


class LayerWeights(NamedTuple):
    """One decoder layer's linear maps as (weight, bias or None) pairs, as F.linear takes them."""

    q: tuple
    k: tuple
    v: tuple
    o: tuple
    gate: tuple
    up: tuple
    down: tuple


def attention_static(x, cos, sin, k_cache, v_cache, slot, mask, w: LayerWeights):
    """`attention` for one new token per row, with shapes that never change: x [B, 1, hidden] is
    written in place at cache slot `slot` ([1] long tensor, not a Python int) of one layer's
    k_cache/v_cache [B, kv_heads, T_max, head_dim], and attends over their first `span` slots
    under mask [B, 1, 1, span] bool (True = a filled, real slot; span = the mask's length, a
    constant of the graph). w: the layer's projections. Returns [B, 1, hidden]."""
    B = x.shape[0]
    Hkv = k_cache.shape[1]
    D = k_cache.shape[3]
    q = F.linear(x, *w.q).view(B, 1, -1, D).transpose(1, 2)  # [B, H, 1, D]
    k = F.linear(x, *w.k).view(B, 1, Hkv, D).transpose(1, 2)  # [B, Hkv, 1, D]
    v = F.linear(x, *w.v).view(B, 1, Hkv, D).transpose(1, 2)
    q = rotate(q, cos, sin)
    k = rotate(k, cos, sin)
    k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
    H = q.shape[1]
    span = mask.shape[-1]
    q = q.reshape(B, Hkv, H // Hkv, D)  # GQA as in `attention`: KV head g's query heads as rows
    keys = k_cache[:, :, :span]
    values = v_cache[:, :, :span]
    out = F.scaled_dot_product_attention(q.to(k_cache.dtype), keys, values, attn_mask=mask)
    out = out.to(x.dtype).reshape(B, 1, H * D)  # out was [B, Hkv, n_rep, D]: heads in HF order
    return F.linear(out, *w.o)


def forward_static(model, cache: KVCache, ids, pos, slot, mask, weights: list):
    """`forward` for one token per row at cache slot `slot` ([1] long), attending over the cache's
    first span slots under mask [B, 1, 1, span] bool; weights: `LayerWeights` per layer (the
    projections and MLP, `Decoder.layer_weights`). Returns the final-norm hidden states
    [B, 1, hidden]."""
    m = model.model
    x = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(x, pos)
    cos = cos.unsqueeze(1)  # [B, 1, 1, D]
    sin = sin.unsqueeze(1)
    for i, (layer, w) in enumerate(zip(m.layers, weights)):
        h = layer.input_layernorm(x)
        x = x + attention_static(h, cos, sin, cache.k[i], cache.v[i], slot, mask, w)
        h = layer.post_attention_layernorm(x)
        gated = layer.mlp.act_fn(F.linear(h, *w.gate)) * F.linear(h, *w.up)  # LlamaMLP
        x = x + F.linear(gated, *w.down)
    return m.norm(x)


@dataclass
class Sampling:
    """The sampling knobs of one `generate` call: constants of the compiled step (a change
    recompiles)."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float


@dataclass
class DecodeState:
    """Every tensor the static step reads or writes, preallocated by `Decoder` for one shape and
    reused across calls; the step mutates them in place, so their addresses never change (what
    CUDA graphs need). B rows, L cache slots, A policy rows (`head_rows`)."""

    # layers x [B, kv_heads, L, head_dim] for K and V, zeros: masked slots stay finite
    cache: KVCache
    # [B, L] bool: False on prompt pads, True elsewhere (later slots: cut by the step)
    key_ok: torch.Tensor
    # [B] long, real prompt lengths: rotary position of generated token t is lens + t
    lens: torch.Tensor
    start: torch.Tensor  # [1] long, P: the cache slot of generated token 0
    # [1] long, tokens generated so far; the step feeds token t - 1 and emits token t
    t: torch.Tensor
    token: torch.Tensor  # [B] long, the last emitted token (the next step's input)
    # [A, H] head rows, fp32 (a copy refreshed per call, or an fp32 lm_head.weight itself)
    weight: torch.Tensor
    index: torch.Tensor  # [A] long, row -> vocab id
    stop: torch.Tensor  # [S] long stop ids (S may be 0)
    seen: torch.Tensor | None  # [B, A] bool, tokens the repetition penalty applies to (None: off)
    noise: torch.Tensor | None  # [B, A] float32 uniform draws for sampling (None: greedy)
    done: torch.Tensor  # [B] bool, emitted a stop id
    lengths: torch.Tensor  # [B] long
    tokens: torch.Tensor  # [B, L] long (the first N columns used), 0 past each length
    logprobs: torch.Tensor  # [B, L] float32, 0 past each length


def emit_token(logits, s: DecodeState, k: Sampling):
    """From next-token logits [B, A] float32, pick token t of every row and record it in `s`, all
    in place with static shapes and no host sync: tokens/logprobs column t, lengths, done, seen,
    token, then t += 1. A row that has stopped emits 0 with log-prob 0 and does not count."""
    processed = process_logits(
        logits,
        temperature=k.temperature,
        top_k=k.top_k,
        top_p=k.top_p,
        repetition_penalty=k.repetition_penalty,
        seen=s.seen,
    )
    row = sample_token(processed, greedy=k.temperature == 0, noise=s.noise)  # [B] in [0, A)
    tok = s.index[row].masked_fill(s.done, 0)  # [B] vocab ids
    lp = token_logprobs(logits, row, k.temperature).masked_fill(s.done, 0.0)  # [B]
    s.tokens.index_copy_(1, s.t, tok[:, None])
    s.logprobs.index_copy_(1, s.t, lp[:, None])
    s.lengths.add_((~s.done).long())
    if s.stop.numel():
        s.done.logical_or_(torch.isin(tok, s.stop))
    if s.seen is not None:
        s.seen.scatter_(1, row[:, None], True)
    s.token.copy_(tok)
    s.t.add_(1)


def decode_step(model, weights: list, s: DecodeState, k: Sampling, span: int):
    """One static-shape decode step, the function `Decoder` compiles: feed `s.token` (generated
    token t - 1) at cache slot start + t - 1 and rotary position lens + t - 1, attend over the
    cache's first `span` slots (a Python int: one graph per span; they must hold that slot), pads
    and later slots masked, then `emit_token` token t. weights: `LayerWeights` per layer. Returns
    nothing: every result is written into `s`."""
    slot = s.start + s.t - 1  # [1] long
    mask = s.key_ok[:, :span] & (torch.arange(span, device=slot.device) <= slot)  # [B, span]
    ids = s.token[:, None]  # [B, 1]
    pos = (s.lens + s.t - 1)[:, None]  # [B, 1]
    hidden = forward_static(model, s.cache, ids, pos, slot, mask[:, None, None, :], weights)
    emit_token(head_logits(hidden[:, 0], s.weight), s, k)  # logits [B, A] fp32
