"""Rollouts and TTS inference: a hand-written batched decode loop over a Hugging Face Llama.

`generate` prefills a left-padded batch of prompts, then adds one token per step to a KV cache it
preallocates and owns, running the model's own modules (embeddings, layers, norm, rotary embedding,
lm_head) with F.scaled_dot_product_attention. No `model.generate`, no HF Cache objects: the loop
is a few small functions (logits processing, sampling, prefill, decode_one_token) one can read,
test against transformers and time (bench.py sample).

With `compile=True` or a `decode.Decoder`, the same loop runs a static-shape step instead
(decode.py, gpt-fast's design), which `torch.compile` captures once per shape (CUDA graphs on a
GPU); this dynamic loop stays the reference it is tested against.

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
import functools
import os
from dataclasses import dataclass

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
             decoder=None) -> Rollout:
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
        from decode import Decoder
        decoder = Decoder(model, compile=True)
    if decoder is not None and decoder.model is not model:
        raise ValueError("decoder was built for another model: build one Decoder per model")
    with torch.inference_mode():
        if decoder is None:
            run = _generate
        else:  # the static, compilable step (decode.py)
            from decode import generate_static
            run = functools.partial(generate_static, decoder)
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
    # allowed_ids may hold 65,537 ids on the GPU: checked as one CPU tensor, never id by id.
    allowed = None if allowed_ids is None else torch.as_tensor(
        allowed_ids.cpu() if torch.is_tensor(allowed_ids) else list(allowed_ids), dtype=torch.long)
    for name, ids in (("stop_ids", torch.as_tensor(list(stop_ids), dtype=torch.long)), ("allowed_ids", allowed)):
        bad = [] if ids is None else ids[(ids < 0) | (ids >= vocab)].tolist()
        if bad:
            raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if allowed is not None:
        if allowed.numel() == 0:
            raise ValueError("allowed_ids is empty: no token could be generated")
        missing = [int(t) for t in stop_ids if not bool((allowed == int(t)).any())]
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

    `name`: a Hugging Face directory or hub id, "tiny": a random `tiny_llama` (init `seed`) over
    data.tiny_tokenizer's vocabulary with 64 speech tokens, for offline runs and tests, or "demo": the
    CPU demo's warm-started policy (demo.ensure_policy, built into runs/demo-policy when missing)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        tokenizer = data.tiny_tokenizer(n_speech=TINY_SPEECH_TOKENS)
        model = tiny_llama(len(tokenizer), seed=seed, max_positions=4096)
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if name == "demo":  # the CPU demo's warm-started policy, built on first use
        import demo
        name = demo.ensure_policy()
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
