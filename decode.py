"""The static-shape decode step behind `--compile` (gpt-fast's design), for `sample.generate`.

A fixed batch and cache length per run, the KV cache (one tensor per layer) written in place at a
position tensor, sampling as tensor ops with no host sync: a step `torch.compile` captures once per
shape (CUDA graphs on a GPU). Attention reads only a prefix of the cache, the smallest of a few
`spans` (256, 512, 1024, ... slots, then the whole cache) that holds every filled slot, under a
boolean mask: a short response reads a short cache, at the price of one graph per span used.
`Decoder` owns the buffers and the compiled step; the caller keeps one per run and passes it to
`sample.generate(..., decoder=...)`. The dynamic loop in sample.py stays the reference that this
step is tested against token for token.
"""
import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import lora
from llama import (KVCache, find_rows, head_logits, left_padded, prefill, process_logits, rotate, sample_token,
                   token_logprobs)


def attention_static(x, cos, sin, k_cache, v_cache, slot, mask, w: "LayerWeights"):
    """`attention` for one new token per row, with shapes that never change: x [B, 1, hidden] is
    written in place at cache slot `slot` ([1] long tensor, not a Python int) of one layer's
    k_cache/v_cache [B, kv_heads, T_max, head_dim], and attends over their first `span` slots under
    mask [B, 1, 1, span] bool (True = a filled, real slot; span = the mask's length, a constant of
    the graph). w: the layer's projections. Returns [B, 1, hidden]."""
    B = x.shape[0]
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    q = F.linear(x, *w.q).view(B, 1, -1, D).transpose(1, 2)  # [B, H, 1, D]
    k = F.linear(x, *w.k).view(B, 1, Hkv, D).transpose(1, 2)  # [B, Hkv, 1, D]
    v = F.linear(x, *w.v).view(B, 1, Hkv, D).transpose(1, 2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
    H, span = q.shape[1], mask.shape[-1]
    q = q.reshape(B, Hkv, H // Hkv, D)  # GQA as in `attention`: KV head g's query heads as rows
    out = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache[:, :, :span], v_cache[:, :, :span],
                                         attn_mask=mask)
    return F.linear(out.to(x.dtype).reshape(B, 1, H * D), *w.o)  # [B, Hkv, n_rep, D]: heads in HF order


def forward_static(model, cache: KVCache, ids, pos, slot, mask, weights: list):
    """`forward` for one token per row at cache slot `slot` ([1] long), attending over the cache's
    first span slots under mask [B, 1, 1, span] bool; weights: `LayerWeights` per layer (the
    projections and MLP, `Decoder.layer_weights`). Returns the final-norm hidden states [B, 1, hidden]."""
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
    cache: KVCache  # layers x [B, kv_heads, L, head_dim] for K and V, zeros: masked slots stay finite
    key_ok: torch.Tensor  # [B, L] bool: False on prompt pads, True elsewhere (later slots: cut by the step)
    lens: torch.Tensor  # [B] long, real prompt lengths: rotary position of generated token t is lens + t
    start: torch.Tensor  # [1] long, P: the cache slot of generated token 0
    t: torch.Tensor  # [1] long, tokens generated so far; the step feeds token t - 1 and emits token t
    token: torch.Tensor  # [B] long, the last emitted token (the next step's input)
    weight: torch.Tensor  # [A, H] head rows, fp32 (a copy refreshed per call, or an fp32 lm_head.weight itself)
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


def decode_step(model, weights: list, s: DecodeState, k: Sampling, span: int):
    """One static-shape decode step, the function `Decoder` compiles: feed `s.token` (generated
    token t - 1) at cache slot start + t - 1 and rotary position lens + t - 1, attend over the
    cache's first `span` slots (a Python int: one graph per span; they must hold that slot), pads
    and later slots masked, then `emit_token` token t. weights: `LayerWeights` per layer. Returns
    nothing: every result is written into `s`."""
    slot = s.start + s.t - 1  # [1] long
    mask = s.key_ok[:, :span] & (torch.arange(span, device=slot.device) <= slot)  # [B, span]
    hidden = forward_static(model, s.cache, s.token[:, None], (s.lens + s.t - 1)[:, None], slot,
                            mask[:, None, None, :], weights)
    emit_token(head_logits(hidden[:, 0], s.weight), s, k)  # logits [B, A] fp32


def spans(length: int, first: int = 256) -> list[int]:
    """The attention spans of a cache of `length` slots: first, 2 * first, 4 * first, ... below
    length, then length itself. A step reads the smallest span holding its slot, so a response of
    n tokens reads at most twice the slots it needs (or `first`), with one graph per span used
    (4 at the trainer's 1,792-slot cache: 256, 512, 1024, 1792)."""
    out = []
    while first < length:
        out.append(first)
        first *= 2
    return out + [length]


def compile_failed(error: BaseException) -> bool:
    """Whether `error` is torch.compile's own failure (dynamo, inductor, their C++/Triton
    compilers): what a fallback to the eager loop may catch. An out-of-memory error is not one, even
    raised inside the compiler (a transient OOM is no reason to stop compiling), nor is any other
    error of the run (data, CUDA)."""
    # dynamo's errors include its wrappers of a backend's: BackendCompilerFailed, InductorError
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc as inductor
    kinds = (TorchDynamoException,) + tuple(getattr(inductor, name) for name in (
        "CppCompileError", "InvalidCxxCompiler", "OperatorIssue", "CppWrapperCodegenError",
        "SubgraphLoweringException") if hasattr(inductor, name))
    chain = []  # the error and what it wraps (dynamo keeps the backend's error as inner_exception)
    e = error
    while e is not None and e not in chain:
        chain.append(e)
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    if any(isinstance(x, torch.OutOfMemoryError) for x in chain):
        return False
    return isinstance(error, kinds)


class Decoder:
    """The static-shape decode step of `generate` for one model, built once and kept by the caller
    (the trainer: one per run), so the step compiles once per shape, not once per call.

    `compile=True`: `decode_step` under torch.compile(dynamic=False, fullgraph=True), mode
    "reduce-overhead" (CUDA graphs) on CUDA and inductor's default elsewhere; `compile_options`
    replaces those options (e.g. {"backend": "eager"} for a quick check of the trace). False: the
    same step run eagerly (the reference for the compiled one).

    Buffers (`DecodeState`) are kept between calls, one set per batch size (and policy rows, cache
    dtype, knobs on or off): calls with the same batch reuse them, and reuse the compiled graphs
    (one per attention span used, `spans`). The trainer pads every rollout to one batch, so a run
    has one set. Their cache length L is `max_len` when given (e.g. the longest prompt +
    max_new_tokens), else the first call's P + N rounded up to 128; a call that needs more
    reallocates them (L only grows; said on stderr, once per Decoder), which compiles once more,
    as does a new batch size. The sampling knobs are constants of the graph. Under autocast
    to a dtype other than the weights' (the trainer's fp32 master weights under bf16), it also
    keeps copies of the decoder layers' linear weights in that dtype (`layer_weights`; ~2 GB at
    Llasa-1B). The head rows are an fp32 copy (`head_logits`). `release()` frees every buffer (the
    KV cache is 2 * layers * B * kv_heads * L * head_dim values per batch size).

    dynamo keeps at most torch._dynamo.config.recompile_limit (8) graphs of `decode_step` per
    process, shared by every Decoder; past that it runs the step eagerly (correct, not fast)."""

    def __init__(self, model, *, compile: bool = False, max_len: int | None = None,
                 compile_options: dict | None = None):
        self.model = model
        self.compiled = compile
        self.max_len = max_len
        self.states: dict[tuple, DecodeState] = {}
        self.weight_copies: list | None = None  # `layer_weights` in the autocast dtype, when one differs
        self.grew = False  # a call has needed more cache slots than planned (said once on stderr)
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

    def step(self, weights: list, s: DecodeState, k: Sampling, span: int):
        if self.cuda_graphs:
            # A new iteration for CUDA-graph trees: the step returns nothing, all its outputs live in `s`.
            torch.compiler.cudagraph_mark_step_begin()
        self.step_fn(self.model, weights, s, k, span)

    def layer_weights(self, dtype: torch.dtype | None) -> list:
        """`LayerWeights` of every decoder layer: the parameters themselves, or with `dtype` (the
        autocast dtype, when the weights are another: fp32 master weights under bf16 autocast) copies
        in that dtype, kept and refreshed in place on each call. Under autocast F.linear casts its
        weight at every call, and a compiled step, unlike eager autocast, keeps no cast cache: it
        would read the fp32 weights and write their casts at every step. The copies hold the same
        values the casts would, so the results are the same. With LoRA adapters (lora.py) the copies
        are always made, of the merged weights, so the step runs one matmul per map."""
        model = self.model
        linears = [(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.o_proj,
                    l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj) for l in model.model.layers]
        # (lora.weight_of: a plain map's weight; an adapted map's merged one, computed as it is copied)
        params = [LayerWeights(*((lin.weight, lin.bias) for lin in layer)) for layer in linears]
        adapted = any(isinstance(lin, lora.LoRALinear) for layer in linears for lin in layer)
        if not adapted and (dtype is None or dtype == params[0].q[0].dtype):
            return params
        dtype = dtype or params[0].q[0].dtype
        if self.weight_copies is None or self.weight_copies[0].q[0].dtype != dtype:
            self.weight_copies = None
            self.weight_copies = [LayerWeights(*(tuple(None if t is None else torch.empty_like(t, dtype=dtype)
                                                       for t in pair) for pair in layer)) for layer in params]
            for layer in self.weight_copies:
                for t in (t for pair in layer for t in pair if t is not None):
                    torch._dynamo.mark_static_address(t)
        for copies, layer in zip(self.weight_copies, linears):
            for (cw, cb), lin in zip(copies, layer):
                cw.copy_(lora.weight_of(lin))
                if cb is not None:
                    cb.copy_(lin.bias)
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
        if s is not None and s.cache.length >= length:
            self.states[key] = s
            return s
        L = max(length, self.max_len or 0, s.cache.length if s is not None else 0)
        L = -(-L // 128) * 128
        planned = s.cache.length if s is not None else self.max_len
        if planned and length > planned and not self.grew:  # once per Decoder: each growth recompiles
            self.grew = True
            print(f"decode.Decoder: a call needs {length} cache slots (prompt + new tokens), more than the "
                  f"{planned} {'allocated' if s is not None else 'planned (max_len)'}: a new {L}-slot cache and "
                  f"its graphs (dynamo keeps {getattr(torch._dynamo.config, 'recompile_limit', getattr(torch._dynamo.config, 'cache_size_limit', 8))} graphs of the step per process, "
                  "then runs it eagerly). Size max_len for the longest prompt (rollout.Sampler's examples=). "
                  "Said once.", file=sys.stderr)
        del s
        # zeros: slots past the filled ones are read (masked) by SDPA, so they must be finite
        cache = KVCache.for_model(model, batch, L, dtype, zeros=True)
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
            for t in ((*x.k, *x.v) if isinstance(x, KVCache) else (x,)):
                if torch.is_tensor(t) and not isinstance(t, torch.nn.Parameter):
                    torch._dynamo.mark_static_address(t)
        self.states[key] = s
        return s


def generate_static(decoder: Decoder, model, prompts, device, max_new_tokens, temperature, top_p, top_k,
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
    # The head in fp32 (`head_logits`): a copy of the allowed rows (or of all rows when lm_head is
    # in a lower precision); None: the step reads an fp32 lm_head.weight itself.
    head_dtype = torch.promote_types(w.dtype, torch.float32)
    if allowed_ids is None and head_dtype == w.dtype:
        head_dtype = None
    s = decoder.state_for(B, P + N, index.numel(), head_dtype, cache_dtype, repetition_penalty != 1.0,
                          temperature != 0, len(stop_ids))
    if head_dtype is not None:
        s.weight.copy_(w if allowed_ids is None else w.index_select(0, index))  # this call's policy rows
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
        rows, allowed = find_rows(ids, s.index)
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
    widths = spans(s.cache.length)
    for n in range(1, N):  # n tokens emitted so far; this step fills slot P + n - 1
        if n % sync_every == 0 and bool(s.done.all()):
            break
        draw()
        decoder.step(weights, s, knobs, next(w for w in widths if w >= P + n))
    T = int(s.lengths.max())
    return s.tokens[:, :T], s.lengths, s.logprobs[:, :T], s.done
