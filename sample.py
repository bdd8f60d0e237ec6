"""Rollouts and TTS inference: a hand-written batched decode loop over a Hugging Face Llama.

`generate` prefills a left-padded batch of prompts, then adds one token per step to a KV cache it
preallocates and owns, running the model's own modules (embeddings, layers, norm, rotary embedding,
lm_head) with F.scaled_dot_product_attention. No `model.generate`, no HF Cache objects: the loop
is a few small functions (logits processing, sampling, prefill, decode_one_token) one can read,
test against transformers and time (bench.py sample).

With `compile=True` or a `Decoder`, the same loop runs a static-shape step instead (gpt-fast's
design): a fixed batch and cache length, the KV cache written in place at a position tensor,
attention over the whole preallocated cache under a boolean mask, sampling as tensor ops with no
host sync. That step is what `torch.compile` captures (CUDA graphs on GPU), once per shape; the
dynamic loop stays the reference it is tested against.

The policy is speech-only (DESIGN.md §2): with `allowed_ids`, it is the model's distribution
restricted to those ids and renormalized. Only the allowed rows of lm_head are multiplied
(`head_rows`), and `token_logprobs` / `head_logprobs` are the one log-prob formula of the decode
loop and the trainer; `head_logprobs` works in chunks of positions, so a long response never
holds [B, T, vocab] floats at once.

CLI (TTS inference):
    python sample.py --model DIR --text "Hello there." --out out.wav
    python sample.py --model tiny --codec tone --text "hi" --out /tmp/t.wav   # offline smoke test
    (--compile / --no-compile: the compiled static-shape step; default on for cuda, off for cpu)
"""
import argparse
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data


@dataclass
class Rollout:
    """Output of `generate`; B prompts, T = the longest generated length."""
    tokens: torch.Tensor  # [B, T] long, right-padded with 0
    lengths: torch.Tensor  # [B] long, generated tokens per row, the stop token included
    logprobs: torch.Tensor  # [B, T] float32, log-prob of each generated token, 0 past the length
    finished: torch.Tensor  # [B] bool, True if the row ended with a stop id (False: hit max_new_tokens)


def cat_rollouts(rolls: list) -> Rollout:
    """Rollouts of several chunks as one: tokens and log-probs right-padded to the longest."""
    T = max(r.tokens.shape[1] for r in rolls)
    pad = lambda x: F.pad(x, (0, T - x.shape[1]))  # noqa: E731
    return Rollout(torch.cat([pad(r.tokens) for r in rolls]), torch.cat([r.lengths for r in rolls]),
                   torch.cat([pad(r.logprobs) for r in rolls]), torch.cat([r.finished for r in rolls]))


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, stop_ids=(),
             allowed_ids=None, generator: torch.Generator | None = None,
             cache_dtype: torch.dtype | None = None, compile: bool = False,
             decoder: "Decoder | None" = None) -> Rollout:
    """Sample up to `max_new_tokens` tokens after each prompt (lists of ids, lengths may differ).

    `allowed_ids` (e.g. speech tokens + stop; None: all) restricts the policy to those ids: only
    their rows of lm_head are computed and every knob acts on them (greedy picks exactly the argmax
    of the masked full logits). Knobs follow Hugging Face semantics and order: repetition_penalty
    (prompt and generated tokens; HF's left-pad tokens are not penalized here), temperature,
    top_k, top_p; `temperature=0` is greedy. A row stops after one of `stop_ids` and then no longer
    changes. `generator` (on the model's device) makes sampling reproducible. `cache_dtype`
    (default: the weights') sets the KV cache's dtype, e.g. bfloat16 for fp32 weights under autocast.

    `logprobs` (nats) are `token_logprobs` of the *unprocessed* policy at the sampled token:
    log_softmax over the allowed ids of logits / temperature (1 when greedy), with no top-k/top-p
    or penalty: what the trainer recomputes with `head_logprobs`, so importance ratios start at
    exactly 1. With no filters on, it is the distribution the token was sampled from.

    `decoder` (a `Decoder` of this model, kept by the caller across calls) runs the static-shape
    step, compiled or not as the decoder was built; `compile=True` without one builds a compiled
    `Decoder` for this call only. Neither (the default): the dynamic loop, the reference. All three
    give the same tokens and log-probs, seeded sampling included (same generator draws, same order)."""
    device = next(model.parameters()).device
    vocab = model.lm_head.out_features
    _check_args(model, prompts, vocab, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                stop_ids, allowed_ids, generator, device)
    # inference_mode skips autograd's per-op bookkeeping (~5% per step on CPU); the outputs are
    # cloned outside it so the trainer may use them in autograd (e.g. as old log-probs).
    if decoder is None and compile:
        decoder = Decoder(model, compile=True)
    if decoder is not None and decoder.model is not model:
        raise ValueError("decoder was built for another model: build one Decoder per model")
    with torch.inference_mode():
        run = _generate if decoder is None else functools.partial(_generate_static, decoder)
        out = run(model, prompts, device, max_new_tokens, temperature, top_p, top_k,
                  repetition_penalty, stop_ids, allowed_ids, generator, cache_dtype)
    return Rollout(*(x.clone() for x in out))


def left_padded(prompts: list[list[int]], device):
    """Prompts as ids [B, P] left-padded with 0 (P = the longest), and their lengths lens [B]."""
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [B] real prompt lengths
    P = int(max(len(p) for p in prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids.to(device), lens


def _generate(model, prompts, device, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
              stop_ids, allowed_ids, generator, cache_dtype):
    """The decode loop of `generate`, arguments checked; returns (tokens, lengths, logprobs, finished)."""
    B, N = len(prompts), max_new_tokens
    ids, lens = left_padded(prompts, device)  # [B, P], [B]
    P = ids.shape[1]

    cache = KVCache.for_model(model, B, P + N, cache_dtype)
    # key_ok [B, P+N]: which cache slots hold a real token (prompt pads never do; generated slots
    # always do, and slots not yet written are cut off by slicing the cache to the current step).
    key_ok = torch.ones(B, P + N, dtype=torch.bool, device=device)
    key_ok[:, :P] = torch.arange(P, device=device) >= (P - lens)[:, None]
    weight, index = head_rows(model, allowed_ids)  # [A, H] rows of lm_head, index [A]: row -> vocab id
    A = index.numel()
    seen = None  # [B, A] bool: allowed tokens in the prompt or generated so far (repetition penalty)
    if repetition_penalty != 1.0:
        rows, allowed = _find_rows(ids, index)  # [B, P] each
        seen = torch.zeros(B, A + 1, dtype=torch.bool, device=device)  # column A: a bin for the rest
        seen.scatter_(1, torch.where(allowed & key_ok[:, :P], rows, A), True)
        seen = seen[:, :A]
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=device)

    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, N, dtype=torch.float32, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B] emitted a stop id (the only early end)
    # Checking "all rows stopped" is a host sync; on a GPU do it every few steps so the CPU can
    # queue kernels ahead (a few wasted steps at the very end cost less than a sync per step).
    sync_every = 1 if device.type == "cpu" else 8

    logits = prefill(model, cache, ids, key_ok[:, :P], weight)  # [B, A] float32
    for t in range(N):
        processed = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, seen=seen)
        row = sample_token(processed, greedy=temperature == 0, generator=generator)  # [B] in [0, A)
        next_tok = index[row].masked_fill(done, 0)  # [B] vocab ids
        tokens[:, t] = next_tok
        logprobs[:, t] = token_logprobs(logits, row, temperature).masked_fill(done, 0.0)
        lengths += ~done
        if stop.numel():
            done |= torch.isin(next_tok, stop) & ~done
        if seen is not None:
            seen.scatter_(1, row[:, None], True)
        if t == N - 1 or ((t + 1) % sync_every == 0 and bool(done.all())):
            break
        # The token at cache slot P+t has position len_i + t: positions start at 0 after the pads.
        logits = decode_one_token(model, cache, next_tok, lens + t, P + t, key_ok, weight)

    T = int(lengths.max())
    return tokens[:, :T], lengths, logprobs[:, :T], done


# ----------------------------------------------------------------------------- the (speech-only) head

def head_rows(model, allowed_ids=None):
    """The policy's output rows: (weight [A, H], index [A] long), index = the allowed vocab ids,
    sorted and unique (row r of weight is lm_head row index[r]).

    With `allowed_ids` (ids or a tensor), weight is an index_select of model.lm_head.weight: a
    copy that carries gradient back to those rows only (A * H elements, e.g. 537 MB in fp32 at
    Llasa-1B's 65,537 x 2048). None: lm_head.weight itself and index = arange(vocab)."""
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise TypeError("head_rows expects a bias-free lm_head (as in Llama)")
    w = head.weight  # [V, H]
    if allowed_ids is None:
        return w, torch.arange(w.shape[0], device=w.device)
    ids = allowed_ids if torch.is_tensor(allowed_ids) else torch.tensor(list(allowed_ids), dtype=torch.long)
    index = torch.unique(ids.to(device=w.device, dtype=torch.long))  # sorted: ties break as a masked argmax
    bad = index[(index < 0) | (index >= w.shape[0])]
    if index.numel() == 0 or bad.numel():
        raise ValueError(f"allowed_ids must be a non-empty set of ids in [0, {w.shape[0]}), got "
                         f"{index.numel()} ids, these out of range: {bad[:5].tolist()}")
    return w.index_select(0, index), index


def to_rows(tokens, index, valid=None):
    """Vocab ids tokens [...] -> their rows in `head_rows`' weight [...] long (index [A] sorted).

    valid [...] bool marks the real tokens; the others (e.g. right padding) map to row 0. A real
    token outside the allowed ids raises ValueError (one host sync)."""
    rows, allowed = _find_rows(tokens, index)
    if valid is not None:
        allowed = allowed | ~valid
        rows = rows.masked_fill(~valid, 0)
    if not bool(allowed.all()):
        raise ValueError(f"token ids {tokens[~allowed].unique()[:5].tolist()} are not among the "
                         f"{index.numel()} allowed ids: the policy cannot have emitted them")
    return rows


def _find_rows(tokens, index):
    """Where tokens [...] sit in sorted index [A]: (rows [...] clamped to A - 1, allowed [...] bool)."""
    rows = torch.searchsorted(index, tokens.contiguous()).clamp_(max=index.numel() - 1)
    return rows, index[rows] == tokens


def token_logprobs(logits, targets, temperature: float):
    """log_softmax(logits / temperature)[targets] in nats: logits [..., A] float32 (over the
    policy's rows), targets [...] long row indices -> [...] float32. temperature 0 (greedy)
    scores at temperature 1. The one formula of rollouts and training."""
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return scaled.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(scaled, dim=-1)


def head_logprobs(hidden, weight, targets, temperature: float, *, chunk: int = 256,
                  with_entropy: bool = False):
    """`token_logprobs` of hidden states through the head: hidden [B, T, H] (final-norm),
    weight [A, H] (`head_rows`), targets [B, T] row indices (`to_rows`) -> logp [B, T] float32,
    nats (+ entropy [B, T] of the tempered restricted distribution, nats, no grad, if asked).

    Positions go `chunk` at a time, so at most [B, chunk, A] logits exist at once. When autograd
    is on, each chunk runs under activation checkpointing: only its inputs are kept, and its
    logits are recomputed in backward, so the peak stays one chunk's logits there too. Gradients
    equal the unchunked computation's (up to float summation order). Under autocast the weight
    is cast once per call, not once per chunk."""
    if torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        run = functools.partial(checkpoint, _chunk_logprobs, use_reentrant=False)
    else:
        run = _chunk_logprobs
    logp, entropy = [], []
    for s in range(0, hidden.shape[1], chunk):
        lp, ent = run(hidden[:, s:s + chunk], weight, targets[:, s:s + chunk], temperature, with_entropy)
        logp.append(lp)
        entropy.append(ent)
    logp = torch.cat(logp, dim=1)  # [B, T]
    return (logp, torch.cat(entropy, dim=1)) if with_entropy else logp


def _chunk_logprobs(h, weight, targets, temperature, with_entropy):
    """One chunk of `head_logprobs`: h [B, c, H], weight [A, H], targets [B, c] -> (logp, entropy|None)."""
    logits = F.linear(h, weight)  # [B, c, A], as lm_head(h) computes each row
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
    logp = token_logprobs(logits, targets, temperature)
    if not with_entropy:  # (either way, checkpoint's recompute in backward stops once logp is rebuilt)
        return logp, None
    with torch.no_grad():
        p = F.softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
        return logp, torch.special.entr(p).sum(-1)  # [B, c]


# ----------------------------------------------------------------------------- logits processing

def apply_repetition_penalty(logits, seen, penalty: float):
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits divided by `penalty` if positive,
    multiplied if negative (once per token, however often it occurred). logits [B, V], seen [B, V] bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits, k: int):
    """HF TopKLogitsWarper: keep the k largest logits per row (ties with the k-th kept). logits [B, V]."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits, p: float):
    """HF TopPLogitsWarper: keep the smallest set of most likely tokens whose probability reaches p
    (always at least the top token). logits [B, V]."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= 1 - p  # the unlikely tail, holding at most 1 - p of the mass
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits, *, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                   seen=None):
    """Raw float32 logits [B, A] (the policy's rows) -> the logits tokens are drawn from (greedy:
    argmax of them). seen [B, A] bool: tokens the repetition penalty applies to."""
    if seen is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits  # top-k / top-p never change the argmax
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        logits = apply_top_k(logits, top_k)
    if top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    return logits


def sample_token(logits, *, greedy: bool, generator=None, noise=None):
    """One token per row from logits [B, V] -> [B] long, with no host sync.

    argmax(probs / E), E ~ Exponential(1) iid, picks token i with probability probs[i] (the
    exponential race), and unlike torch.multinomial never waits for the GPU. noise [B, V] float32:
    the uniform draws U to use (`torch.rand` of the same shape), else drawn here from `generator`."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    # E = -log(U), U ~ uniform [0, 1), lies in (0, inf]: never 0, so probs / E is never 0/0 = NaN
    # (and it is ~4x cheaper on CPU than Tensor.exponential_).
    if noise is None:
        race = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    else:
        race = noise.log().neg()
    return (probs / race).argmax(dim=-1)


# ----------------------------------------------------------------------------- the model, step by step

@dataclass
class KVCache:
    k: torch.Tensor  # [layers, B, kv_heads, T_max, head_dim]
    v: torch.Tensor  # [layers, B, kv_heads, T_max, head_dim]

    @staticmethod
    def for_model(model, batch: int, max_len: int, dtype: torch.dtype | None = None) -> "KVCache":
        cfg = model.config
        head_dim = model.model.layers[0].self_attn.k_proj.out_features // cfg.num_key_value_heads
        p = next(model.parameters())
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, head_dim)
        # Uninitialized is fine: prefill writes every prompt slot (pads too) and decoding reads
        # only the slots written so far.
        dtype = dtype or p.dtype  # bf16 under autocast: half the memory, no per-step casts of the cache
        return KVCache(torch.empty(shape, dtype=dtype, device=p.device),
                       torch.empty(shape, dtype=dtype, device=p.device))


def rotate(x, cos, sin):
    """Rotary embedding, HF Llama order (halves, not interleaved). x [B, H, S, D], cos/sin [B, 1, S, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention(attn, x, cos, sin, k_cache, v_cache, start: int, mask):
    """One attention block on new tokens x [B, S, hidden] at cache slots [start, start+S).

    k_cache/v_cache [B, kv_heads, T_max, head_dim] are written in place; mask [B, S, start+S] bool
    (True = may attend) covers pads and causality. Returns [B, S, hidden]."""
    B, S, _ = x.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    q = attn.q_proj(x).view(B, S, -1, D).transpose(1, 2)  # [B, H, S, D]
    k = attn.k_proj(x).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
    v = attn.v_proj(x).view(B, S, Hkv, D).transpose(1, 2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    end = start + S
    k_cache[:, :, start:end] = k
    v_cache[:, :, start:end] = v
    H = q.shape[1]
    n_rep = H // Hkv
    # GQA without copying K/V: the n_rep query heads sharing KV head g (heads g*n_rep + r, as in
    # HF's repeat_kv) become n_rep*S query rows of that head; the mask is tiled to match
    # (one decode step's single mask row simply broadcasts).
    q = q.reshape(B, Hkv, n_rep * S, D)
    m = mask.unsqueeze(1) if S == 1 else mask.unsqueeze(1).repeat(1, 1, n_rep, 1)  # [B, 1, n_rep*S|1, end]
    out = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache[:, :, :end], v_cache[:, :, :end],
                                         attn_mask=m)
    out = out.to(x.dtype)  # a cache dtype other than the activations' (cache_dtype=) is allowed
    out = out.reshape(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)
    return attn.o_proj(out)


def forward(model, cache: KVCache, ids, pos, start: int, mask):
    """Run the decoder on ids [B, S] (rotary positions pos [B, S]) at cache slots [start, start+S);
    mask [B, S, start+S] bool. Returns the final-norm hidden states [B, S, hidden]."""
    m = model.model
    x = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(x, pos)  # [B, S, D] each; llama3 / other rope scaling handled by HF
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for i, layer in enumerate(m.layers):
        h = layer.input_layernorm(x)
        x = x + attention(layer.self_attn, h, cos, sin, cache.k[i], cache.v[i], start, mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.norm(x)


def prefill(model, cache: KVCache, ids, key_ok, weight):
    """Left-padded prompts ids [B, P], key_ok [B, P] bool (False on pads), head weight [A, H]
    (`head_rows`) -> next-token logits [B, A] float32."""
    B, P = ids.shape
    pads = P - key_ok.sum(dim=1, keepdim=True)  # [B, 1]
    pos = (torch.arange(P, device=ids.device) - pads).clamp(min=0)  # [B, P], 0 at each first real token
    causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
    # Pad rows may attend to themselves only: a row with no allowed key would give NaN in SDPA,
    # and that NaN would reach the real rows through the pads' cached values.
    mask = (causal & key_ok[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)  # [B, P, P]
    hidden = forward(model, cache, ids, pos, 0, mask)
    return F.linear(hidden[:, -1], weight).float()  # only the last position is needed


def decode_one_token(model, cache: KVCache, token, pos, slot: int, key_ok, weight):
    """token [B] at rotary position pos [B], written to cache slot `slot`; key_ok [B, T_max] bool;
    head weight [A, H]. Returns next-token logits [B, A] float32."""
    mask = key_ok[:, None, :slot + 1]  # [B, 1, slot+1]
    hidden = forward(model, cache, token[:, None], pos[:, None], slot, mask)
    return F.linear(hidden[:, 0], weight).float()


# ----------------------------------------------------------------------------- the static-shape step (--compile)

def attention_static(x, cos, sin, k_cache, v_cache, slot, mask, w: "LayerWeights"):
    """`attention` for one new token per row, with shapes that never change: x [B, 1, hidden] is
    written in place at cache slot `slot` ([1] long tensor, not a Python int) of k_cache/v_cache
    [B, kv_heads, T_max, head_dim], and attends over the whole cache under mask [B, 1, 1, T_max]
    bool (True = a filled, real slot). w: the layer's projections. Returns [B, 1, hidden]."""
    B = x.shape[0]
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    q = F.linear(x, *w.q).view(B, 1, -1, D).transpose(1, 2)  # [B, H, 1, D]
    k = F.linear(x, *w.k).view(B, 1, Hkv, D).transpose(1, 2)  # [B, Hkv, 1, D]
    v = F.linear(x, *w.v).view(B, 1, Hkv, D).transpose(1, 2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
    H = q.shape[1]
    q = q.reshape(B, Hkv, H // Hkv, D)  # GQA as in `attention`: KV head g's query heads as rows
    out = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache, v_cache, attn_mask=mask)
    return F.linear(out.to(x.dtype).reshape(B, 1, H * D), *w.o)  # [B, Hkv, n_rep, D]: heads in HF order


def forward_static(model, cache: KVCache, ids, pos, slot, mask, weights: list):
    """`forward` for one token per row at cache slot `slot` ([1] long), attending over the whole
    cache under mask [B, 1, 1, T_max] bool; weights: `LayerWeights` per layer (the projections
    and MLP, `Decoder.layer_weights`). Returns the final-norm hidden states [B, 1, hidden]."""
    m = model.model
    x = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(x, pos)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for i, (layer, w) in enumerate(zip(m.layers, weights)):
        x = x + attention_static(layer.input_layernorm(x), cos, sin, cache.k[i], cache.v[i], slot, mask, w)
        h = layer.post_attention_layernorm(x)
        x = x + F.linear(layer.mlp.act_fn(F.linear(h, *w.gate)) * F.linear(h, *w.up), *w.down)  # LlamaMLP
    return m.norm(x)


class LayerWeights(NamedTuple):
    """One decoder layer's linear maps as (weight, bias or None) pairs, as F.linear takes them."""
    q: tuple
    k: tuple
    v: tuple
    o: tuple
    gate: tuple
    up: tuple
    down: tuple


@dataclass
class Sampling:
    """The sampling knobs of one `generate` call: constants of the compiled step (a change recompiles)."""
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float


@dataclass
class DecodeState:
    """Every tensor the static step reads or writes, preallocated by `Decoder` for one shape and
    reused across calls; the step mutates them in place, so their addresses never change (what
    CUDA graphs need). B rows, L cache slots, A policy rows (`head_rows`)."""
    cache: KVCache  # [layers, B, kv_heads, L, head_dim] each, zero-initialized: masked slots stay finite
    key_ok: torch.Tensor  # [B, L] bool: False on prompt pads, True elsewhere (later slots: cut by the step)
    lens: torch.Tensor  # [B] long, real prompt lengths: rotary position of generated token t is lens + t
    start: torch.Tensor  # [1] long, P: the cache slot of generated token 0
    t: torch.Tensor  # [1] long, tokens generated so far; the step feeds token t - 1 and emits token t
    token: torch.Tensor  # [B] long, the last emitted token (the next step's input)
    weight: torch.Tensor  # [A, H] head rows (a copy refreshed per call, or lm_head.weight itself)
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
    processed = process_logits(logits, temperature=k.temperature, top_k=k.top_k, top_p=k.top_p,
                               repetition_penalty=k.repetition_penalty, seen=s.seen)
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


def decode_step(model, weights: list, s: DecodeState, k: Sampling):
    """One static-shape decode step, the function `Decoder` compiles: feed `s.token` (generated
    token t - 1) at cache slot start + t - 1 and rotary position lens + t - 1, attend over the
    whole cache (slots up to that one, pads masked), then `emit_token` token t. weights:
    `LayerWeights` per layer. Returns nothing: every result is written into `s`."""
    slot = s.start + s.t - 1  # [1] long
    L = s.cache.k.shape[3]
    mask = s.key_ok & (torch.arange(L, device=slot.device) <= slot)  # [B, L]
    hidden = forward_static(model, s.cache, s.token[:, None], (s.lens + s.t - 1)[:, None], slot,
                            mask[:, None, None, :], weights)
    logits = F.linear(hidden[:, 0], s.weight).float()  # [B, A]
    emit_token(logits, s, k)


class Decoder:
    """The static-shape decode step of `generate` for one model, built once and kept by the caller
    (the trainer: one per run), so the step compiles once per shape, not once per call.

    `compile=True`: `decode_step` under torch.compile(dynamic=False, fullgraph=True), mode
    "reduce-overhead" (CUDA graphs) on CUDA and inductor's default elsewhere; `compile_options`
    replaces those options (e.g. {"backend": "eager"} for a quick check of the trace). False: the
    same step run eagerly (the reference for the compiled one).

    Buffers (`DecodeState`) are kept between calls, one set per batch size (and policy rows, cache
    dtype, knobs on or off): calls with the same batch reuse them, and reuse the compiled graph.
    Their cache length L is `max_len` when given (e.g. the longest prompt + max_new_tokens), else
    the first call's P + N rounded up to 128; a call that needs more reallocates them (L only
    grows), which compiles once more, as does a new batch size. The sampling knobs are constants
    of the graph: other values compile another graph. Under autocast to a dtype other than the
    weights' (the trainer's fp32 master weights under bf16), it also keeps copies of the decoder
    layers' linear weights in that dtype (`layer_weights`; ~2 GB at Llasa-1B). `release()` frees
    every buffer (the KV cache is 2 * layers * B * kv_heads * L * head_dim values per batch size).

    dynamo keeps at most torch._dynamo.config.recompile_limit (8) graphs of `decode_step` per
    process, shared by every Decoder; past that it runs the step eagerly (correct, not fast)."""

    def __init__(self, model, *, compile: bool = False, max_len: int | None = None,
                 compile_options: dict | None = None):
        self.model = model
        self.compiled = compile
        self.max_len = max_len
        self.states: dict[tuple, DecodeState] = {}
        self.weight_copies: list | None = None  # `layer_weights` in the autocast dtype, when one differs
        device = next(model.parameters()).device
        if compile_options is None:
            compile_options = {"mode": "reduce-overhead"} if device.type == "cuda" else {}
        self.cuda_graphs = compile and device.type == "cuda" and compile_options.get("mode") in (
            "reduce-overhead", "max-autotune")
        self.step_fn = (torch.compile(decode_step, dynamic=False, fullgraph=True, **compile_options)
                        if compile else decode_step)

    def release(self):
        """Drop every buffer (KV caches, weight copies); the next call allocates them again."""
        self.states.clear()
        self.weight_copies = None

    def step(self, weights: list, s: DecodeState, k: Sampling):
        if self.cuda_graphs:
            # A new iteration for CUDA-graph trees: the step returns nothing, all its outputs live in `s`.
            torch.compiler.cudagraph_mark_step_begin()
        self.step_fn(self.model, weights, s, k)

    def layer_weights(self, dtype: torch.dtype | None) -> list:
        """`LayerWeights` of every decoder layer: the parameters themselves, or with `dtype` (the
        autocast dtype, when the weights are another: fp32 master weights under bf16 autocast) copies
        in that dtype, kept and refreshed in place on each call. Under autocast F.linear casts its
        weight at every call, and a compiled step, unlike eager autocast, keeps no cast cache: it
        would read the fp32 weights and write their casts at every step. The copies hold the same
        values the casts would, so the results are the same."""
        model = self.model
        params = [LayerWeights(*((lin.weight, lin.bias) for lin in (
            l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.o_proj,
            l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj))) for l in model.model.layers]
        if dtype is None or dtype == params[0].q[0].dtype:
            return params
        if self.weight_copies is None or self.weight_copies[0].q[0].dtype != dtype:
            self.weight_copies = None
            self.weight_copies = [LayerWeights(*(tuple(None if t is None else torch.empty_like(t, dtype=dtype)
                                                       for t in pair) for pair in layer)) for layer in params]
            for layer in self.weight_copies:
                for t in (t for pair in layer for t in pair if t is not None):
                    torch._dynamo.mark_static_address(t)
        for copies, originals in zip(self.weight_copies, params):
            for (cw, cb), (w, b) in zip(copies, originals):
                cw.copy_(w)
                if cb is not None:
                    cb.copy_(b)
        return self.weight_copies

    def state_for(self, batch: int, length: int, rows: int, head_dtype: torch.dtype | None, cache_dtype,
                  with_seen: bool, with_noise: bool, n_stop: int) -> DecodeState:
        """The buffers for this shape, at least `length` cache slots (head_dtype None: the head is
        lm_head.weight itself, else a [rows, H] copy in that dtype): the kept ones if they are long
        enough, else new ones (zeros)."""
        model = self.model
        p = next(model.parameters())
        dtype = cache_dtype or p.dtype
        key = (batch, rows, dtype, head_dtype, with_seen, with_noise, n_stop)
        s = self.states.pop(key, None)  # a too-short one is freed before its successor is allocated
        if s is not None and s.cache.k.shape[3] >= length:
            self.states[key] = s
            return s
        L = max(length, self.max_len or 0, s.cache.k.shape[3] if s is not None else 0)
        L = -(-L // 128) * 128
        del s
        cache = KVCache.for_model(model, batch, L, dtype)
        cache.k.zero_()  # slots past the filled ones are read (masked) by SDPA: they must be finite
        cache.v.zero_()
        zeros = functools.partial(torch.zeros, device=p.device)
        s = DecodeState(
            cache=cache, key_ok=zeros(batch, L, dtype=torch.bool), lens=zeros(batch, dtype=torch.long),
            start=zeros(1, dtype=torch.long), t=zeros(1, dtype=torch.long), token=zeros(batch, dtype=torch.long),
            weight=(model.lm_head.weight if head_dtype is None
                    else zeros(rows, model.lm_head.in_features, dtype=head_dtype)),
            index=zeros(rows, dtype=torch.long), stop=zeros(n_stop, dtype=torch.long),
            seen=zeros(batch, rows, dtype=torch.bool) if with_seen else None,
            noise=zeros(batch, rows, dtype=torch.float32) if with_noise else None,
            done=zeros(batch, dtype=torch.bool), lengths=zeros(batch, dtype=torch.long),
            tokens=zeros(batch, L, dtype=torch.long), logprobs=zeros(batch, L, dtype=torch.float32))
        for f in dataclasses.fields(s):  # fixed addresses: CUDA graphs read them in place, no copies
            x = getattr(s, f.name)
            for t in ((x.k, x.v) if isinstance(x, KVCache) else (x,)):
                if torch.is_tensor(t) and not isinstance(t, torch.nn.Parameter):
                    torch._dynamo.mark_static_address(t)
        self.states[key] = s
        return s


def _generate_static(decoder: Decoder, model, prompts, device, max_new_tokens, temperature, top_p, top_k,
                     repetition_penalty, stop_ids, allowed_ids, generator, cache_dtype):
    """`_generate` with the decoder's static step: the same prefill, the same token choices and the
    same random draws in the same order, so the same results; returns (tokens, lengths, logprobs,
    finished), views of the decoder's buffers (generate clones them)."""
    B, N = len(prompts), max_new_tokens
    ids, lens = left_padded(prompts, device)  # [B, P], [B]
    P = ids.shape[1]

    w = model.lm_head.weight  # [V, H]
    if getattr(model.lm_head, "bias", None) is not None:
        raise TypeError("generate expects a bias-free lm_head (as in Llama)")
    index = (torch.arange(w.shape[0], device=device) if allowed_ids is None else
             torch.unique(torch.as_tensor(allowed_ids, dtype=torch.long).to(device)))  # as `head_rows`
    cast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    weights = decoder.layer_weights(cast)  # under autocast: copies cast once per call (same values)
    head_dtype = None  # None: the step reads lm_head.weight itself (no allowed_ids, nothing to copy)
    if allowed_ids is not None:  # a copy of the allowed rows, in the autocast dtype if any (as above)
        head_dtype = cast or w.dtype
    s = decoder.state_for(B, P + N, index.numel(), head_dtype, cache_dtype, repetition_penalty != 1.0,
                          temperature != 0, len(stop_ids))
    if head_dtype is not None:
        s.weight.copy_(w.index_select(0, index))  # this call's policy rows (`head_rows`)
    s.index.copy_(index)
    if len(stop_ids):
        s.stop.copy_(torch.as_tensor(list(stop_ids), dtype=torch.long))
    s.key_ok.fill_(True)
    s.key_ok[:, :P] = torch.arange(P, device=device) >= (P - lens)[:, None]
    s.lens.copy_(lens)
    s.start.fill_(P)
    s.t.zero_()
    for x in (s.done, s.lengths, s.tokens, s.logprobs, s.token):
        x.zero_()
    if s.seen is not None:  # the prompt's allowed tokens, as in `_generate`
        rows, allowed = _find_rows(ids, s.index)
        seen = torch.zeros(B, s.index.numel() + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(allowed & s.key_ok[:, :P], rows, s.index.numel()), True)
        s.seen.copy_(seen[:, :-1])
    knobs = Sampling(float(temperature), int(top_k), float(top_p), float(repetition_penalty))
    sync_every = 1 if device.type == "cpu" else 8  # as in `_generate`: the same schedule, the same draws

    def draw():
        if s.noise is not None:  # the draws `sample_token` would make, from the caller's generator
            torch.rand(s.noise.shape, generator=generator, device=device, out=s.noise)

    logits = prefill(model, s.cache, ids, s.key_ok[:, :P], s.weight)  # eager; writes slots [0, P)
    draw()
    emit_token(logits, s, knobs)
    for n in range(1, N):  # n tokens emitted so far
        if n % sync_every == 0 and bool(s.done.all()):
            break
        draw()
        decoder.step(weights, s, knobs)
    T = int(s.lengths.max())
    return s.tokens[:, :T], s.lengths, s.logprobs[:, :T], s.done


def _check_args(model, prompts, vocab, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                stop_ids, allowed_ids, generator, device):
    if not hasattr(getattr(model, "model", None), "rotary_emb") or not hasattr(model, "lm_head"):
        raise TypeError(f"generate needs a Llama-family *ForCausalLM (model.model.rotary_emb, lm_head), "
                        f"got {type(model).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    max_pos = model.config.max_position_embeddings
    if longest + max_new_tokens > max_pos:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {max_pos} (max_position_embeddings); shorten the prompt or "
                         "max_new_tokens")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    for name, ids in (("stop_ids", stop_ids), ("allowed_ids", allowed_ids)):
        bad = [t for t in (ids if ids is not None else ()) if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if allowed_ids is not None:
        allowed = set(int(t) for t in allowed_ids)
        if not allowed:
            raise ValueError("allowed_ids is empty: no token could be generated")
        missing = [int(t) for t in stop_ids if int(t) not in allowed]
        if missing:
            raise ValueError(f"stop ids {missing} are not in allowed_ids, so no row could ever stop")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}")


# ----------------------------------------------------------------------------- models

def tiny_llama(vocab_size: int, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, max_positions: int = 2048, **overrides):
    """A seeded random LlamaForCausalLM (fp32, eval mode) for tests, benchmarks and tiny runs.

    `overrides` go to LlamaConfig (e.g. tie_word_embeddings=True, rope_scaling={...}, intermediate_size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
               num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
               max_position_embeddings=max_positions, rope_theta=500000.0, tie_word_embeddings=False)
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.float().eval()


TINY_SPEECH_TOKENS = 64  # a random tiny policy then emits the stop token within 64 steps most of the time


def load_model(name: str, device="cpu", dtype=torch.bfloat16, *, seed: int = 0):
    """(model, tokenizer), the model in eval mode on `device` in `dtype`.

    `name`: a Hugging Face directory or hub id, or "tiny": a random `tiny_llama` (init `seed`) over
    data.tiny_tokenizer's vocabulary with 64 speech tokens, for offline runs and tests."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        tokenizer = data.tiny_tokenizer(n_speech=TINY_SPEECH_TOKENS)
        model = tiny_llama(len(tokenizer), seed=seed, max_positions=4096)
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if (os.path.isabs(name) or name.startswith(".")) and not os.path.isdir(name):
        raise FileNotFoundError(f"model directory not found: {name}")
    # transformers renamed `torch_dtype` to `dtype` in 4.56; 4.46 knows only the old name.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **dtype_kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load a causal LM and tokenizer from {name!r} (a directory with "
                                f"config.json and tokenizer files, or a hub id when online): {e}") from e
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    import soundfile

    import codec

    p = argparse.ArgumentParser(description="LLASA text-to-speech: text -> speech tokens -> 16 kHz wav.")
    p.add_argument("--model", required=True,
                   help="Hugging Face directory or hub id of a LLASA model, or 'tiny' (random, offline)")
    p.add_argument("--text", required=True, help="text to speak")
    p.add_argument("--out", required=True, help="output .wav path (16 kHz mono)")
    # Official LLASA sampling settings (DESIGN.md §4) as defaults.
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature, 0 = greedy (default: 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the k most likely tokens, 0 = off (default: 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.2,
                   help="HF repetition penalty, 1 = off (default: 1.2)")
    p.add_argument("--max-new-tokens", type=int, default=2048,
                   help="most speech tokens to generate, 50 per second of audio (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--codec", default="xcodec2",
                   help="'xcodec2[:PATH]' or 'tone' (test codec) (default: xcodec2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="model weights (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with the compiled static-shape step (CUDA graphs on a GPU; the first call "
                        "compiles, which takes a while) (default: on for cuda, off for cpu)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer = load_model(args.model, device, dtype)
    vocab = data.speech_vocab(tokenizer)
    ids = data.prompt_ids(tokenizer, args.text)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                   stop_ids=(vocab.end_id,), allowed_ids=vocab.allowed_ids(), generator=generator,
                   compile=device.type == "cuda" if args.compile is None else args.compile)
    n = int(out.lengths[0]) - int(out.finished[0])  # speech tokens, without the stop token
    codes = vocab.to_codes(out.tokens[0, :n].tolist())
    wav = codec.load_codec(args.codec, device).decode([codes])[0]
    soundfile.write(args.out, wav, codec.SAMPLE_RATE)
    status = "finished" if out.finished[0] else f"not finished (hit --max-new-tokens {args.max_new_tokens})"
    print(f"wrote {args.out}: {len(wav) / codec.SAMPLE_RATE:.2f} s, {n} speech tokens, {status}")
    return out


if __name__ == "__main__":
    main()
