"""`Decoder`: the static-shape decode behind `--compile` (gpt-fast's design), for `sample.generate`.

A fixed batch and cache length per run: `Decoder` preallocates the step's buffers
(`static_step.DecodeState`), keeps them across calls, and runs `static_step.decode_step`, which
`torch.compile` captures once per shape (CUDA graphs on a GPU). Attention reads only a prefix of
the cache, the smallest of a few `spans` (256, 512, 1024, ... slots, then the whole cache) that
holds every filled slot: a short response reads a short cache, at the price of one graph per span
used. The caller keeps one `Decoder` per run and passes it to `sample.generate(..., decoder=...)`,
which runs `generate_static`. The dynamic loop in sample.py stays the reference that this step is
tested against token for token.
"""

import dataclasses
import functools
import sys

import torch

import lora
from llama import KVCache, left_padded, prefill, prompt_mask, seen_in_prompts
from static_step import DecodeState, LayerWeights, Sampling, decode_step, emit_token


def spans(length: int, first: int = 256) -> list[int]:
    """The attention spans of a cache of `length` slots: first, 2 * first, 4 * first, ... below
    length, then length itself. A step reads the smallest span holding its slot, so a response of
    n tokens reads at most twice the slots it needs (or `first`), with one graph per span used."""
    out = []
    while first < length:
        out.append(first)
        first *= 2
    return out + [length]


def compile_failed(error: BaseException) -> bool:
    """Whether `error` is torch.compile's own failure (dynamo, inductor, their C++/Triton
    compilers): what a fallback to the eager loop may catch. An out-of-memory error is not one,
    even raised inside the compiler (a transient OOM is no reason to stop compiling), nor is any
    other error of the run (data, CUDA)."""
    # dynamo's errors include its wrappers of a backend's: BackendCompilerFailed, InductorError
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc as inductor

    inductor_errors = (
        "CppCompileError",
        "InvalidCxxCompiler",
        "OperatorIssue",
        "CppWrapperCodegenError",
        "SubgraphLoweringException",
    )
    kinds = [TorchDynamoException]
    for name in inductor_errors:
        if hasattr(inductor, name):  # (not every torch version has each)
            kinds.append(getattr(inductor, name))
    chain = []  # the error and what it wraps (dynamo keeps the backend's error as inner_exception)
    e = error
    while e is not None and e not in chain:
        chain.append(e)
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    if any(isinstance(x, torch.OutOfMemoryError) for x in chain):
        return False
    return isinstance(error, tuple(kinds))


# ----------------------------------------------------------------------------- the Decoder


class Decoder:
    """The static-shape decode step of `generate` for one model, built once and kept by the caller
    (the trainer: one per run), so the step compiles once per shape, not once per call.

    `compile=True`: `decode_step` under torch.compile(dynamic=False, fullgraph=True), mode
    "reduce-overhead" (CUDA graphs) on CUDA and inductor's default elsewhere; `compile_options`
    replaces those options (e.g. {"backend": "eager"} for a quick check of the trace). False: the
    same step run eagerly (the reference for the compiled one).

    Buffers (`DecodeState`) are kept between calls, one set per batch size (and policy rows, cache
    dtype, knobs on or off): calls with the same batch reuse them, and reuse the compiled graphs
    (one per attention span used, `spans`). Their cache length L is `max_len` when given (e.g. the
    longest prompt + max_new_tokens), else the first call's P + N rounded up to 128; a call that
    needs more reallocates them (L only grows; said on stderr, once per Decoder), which compiles
    once more, as does a new batch size. The sampling knobs are constants of the graph. Under
    autocast to a dtype other than the weights' (fp32 master weights under bf16), it also keeps
    copies of the decoder layers' linear weights in that dtype (`layer_weights`). The head rows
    are an fp32 copy (`head_logits`). `release()` frees every buffer.

    dynamo keeps at most torch._dynamo.config.recompile_limit graphs of `decode_step` per
    process, shared by every Decoder; past that it runs the step eagerly (correct, not fast)."""

    def __init__(
        self,
        model,
        *,
        compile: bool = False,
        max_len: int | None = None,
        compile_options: dict | None = None,
    ):
        self.model = model
        self.compiled = compile
        self.max_len = max_len
        self.states: dict[tuple, DecodeState] = {}
        # `layer_weights` in the autocast dtype, when one differs
        self.weight_copies: list | None = None
        self.grew = False  # a call has needed more cache slots than planned (said once on stderr)
        device = next(model.parameters()).device
        if compile_options is None:
            compile_options = {}
            if device.type == "cuda":
                compile_options = {"mode": "reduce-overhead"}
        graph_modes = ("reduce-overhead", "max-autotune")
        on_cuda = device.type == "cuda"
        self.cuda_graphs = compile and on_cuda and compile_options.get("mode") in graph_modes
        self.step_fn = decode_step
        if compile:
            self.step_fn = torch.compile(
                decode_step, dynamic=False, fullgraph=True, **compile_options
            )

    def release(self):
        """Drop every buffer (KV caches, weight copies); the next call allocates them again."""
        self.states.clear()
        self.weight_copies = None

    def step(self, weights: list, s: DecodeState, k: Sampling, span: int):
        if self.cuda_graphs:
            # A new iteration for CUDA-graph trees: the step returns nothing, its outputs live in s.
            torch.compiler.cudagraph_mark_step_begin()
        self.step_fn(self.model, weights, s, k, span)

    def layer_weights(self, dtype: torch.dtype | None) -> list:
        """`LayerWeights` of every decoder layer: the parameters themselves, or with `dtype` (the
        autocast dtype, when the weights are another: fp32 master weights under bf16 autocast)
        copies in that dtype, kept and refreshed in place on each call. Under autocast F.linear
        casts its weight at every call, and a compiled step, unlike eager autocast, keeps no cast
        cache: it would read the fp32 weights and write their casts at every step. The copies hold
        the same values the casts would, so the results are the same. With LoRA adapters (lora.py)
        the copies are always made, of the merged weights, so the step runs one matmul per map."""
        linears = [_linear_maps(layer) for layer in self.model.model.layers]
        params = [LayerWeights(*((lin.weight, lin.bias) for lin in maps)) for maps in linears]
        adapted = any(isinstance(lin, lora.LoRALinear) for maps in linears for lin in maps)
        own_dtype = params[0].q[0].dtype
        if not adapted and (dtype is None or dtype == own_dtype):
            return params
        dtype = dtype or own_dtype
        if self.weight_copies is None or self.weight_copies[0].q[0].dtype != dtype:
            self.weight_copies = None  # the old copies freed before the new ones are allocated
            self.weight_copies = [_empty_copies(layer, dtype) for layer in params]
        for copies, maps in zip(self.weight_copies, linears):
            for (copy_w, copy_b), lin in zip(copies, maps):
                # lora.weight_of: a plain map's weight; an adapted map's merged one, made here
                copy_w.copy_(lora.weight_of(lin))
                if copy_b is not None:
                    copy_b.copy_(lin.bias)
        return self.weight_copies

    def state_for(
        self,
        batch: int,
        length: int,
        rows: int,
        head_dtype: torch.dtype | None,
        cache_dtype,
        with_seen: bool,
        with_noise: bool,
        n_stop: int,
    ) -> DecodeState:
        """The buffers for this shape, at least `length` cache slots (head_dtype None: the head is
        lm_head.weight itself, else a [rows, H] copy in that dtype): the kept ones if they are long
        enough, else new ones (zeros)."""
        model = self.model
        p = next(model.parameters())
        dtype = cache_dtype or p.dtype
        key = (batch, rows, dtype, head_dtype, with_seen, with_noise, n_stop)
        s = self.states.pop(key, None)  # a too-short one is freed before its successor is made
        if s is not None and s.cache.length >= length:
            self.states[key] = s
            return s
        kept = 0
        if s is not None:
            kept = s.cache.length
        L = max(length, self.max_len or 0, kept)
        L = -(-L // 128) * 128  # rounded up to a multiple of 128
        planned = self.max_len
        if s is not None:
            planned = kept
        if planned and length > planned and not self.grew:  # once: each growth recompiles
            self.grew = True
            _say_grown(length, planned, s is not None, L)
        del s
        zeros = functools.partial(torch.zeros, device=p.device)
        weight = model.lm_head.weight
        if head_dtype is not None:
            weight = zeros(rows, model.lm_head.in_features, dtype=head_dtype)
        seen = None
        if with_seen:
            seen = zeros(batch, rows, dtype=torch.bool)
        noise = None
        if with_noise:
            noise = zeros(batch, rows, dtype=torch.float32)
        s = DecodeState(
            # zeros: slots past the filled ones are read (masked) by SDPA, so they must be finite
            cache=KVCache.for_model(model, batch, L, dtype, zeros=True),
            key_ok=zeros(batch, L, dtype=torch.bool),
            lens=zeros(batch, dtype=torch.long),
            start=zeros(1, dtype=torch.long),
            t=zeros(1, dtype=torch.long),
            token=zeros(batch, dtype=torch.long),
            weight=weight,
            index=zeros(rows, dtype=torch.long),
            stop=zeros(n_stop, dtype=torch.long),
            seen=seen,
            noise=noise,
            done=zeros(batch, dtype=torch.bool),
            lengths=zeros(batch, dtype=torch.long),
            tokens=zeros(batch, L, dtype=torch.long),
            logprobs=zeros(batch, L, dtype=torch.float32),
        )
        _mark_static(s)
        self.states[key] = s
        return s


def _linear_maps(layer) -> tuple:
    """A decoder layer's linear maps (nn.Linear or lora.LoRALinear), in `LayerWeights` order."""
    attn = layer.self_attn
    mlp = layer.mlp
    return (
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def _empty_copies(layer: LayerWeights, dtype: torch.dtype) -> LayerWeights:
    """Uninitialized tensors shaped as `layer`'s in `dtype` (a None bias stays None), at static
    addresses."""
    pairs = []
    for weight, bias in layer:
        copy_w = torch.empty_like(weight, dtype=dtype)
        torch._dynamo.mark_static_address(copy_w)
        copy_b = None
        if bias is not None:
            copy_b = torch.empty_like(bias, dtype=dtype)
            torch._dynamo.mark_static_address(copy_b)
        pairs.append((copy_w, copy_b))
    return LayerWeights(*pairs)


def _mark_static(s: DecodeState):
    """Fixed addresses for every buffer of `s`: CUDA graphs read them in place, with no copies."""
    for field in dataclasses.fields(s):
        x = getattr(s, field.name)
        tensors = [x]
        if isinstance(x, KVCache):
            tensors = [*x.k, *x.v]
        for t in tensors:
            if torch.is_tensor(t) and not isinstance(t, torch.nn.Parameter):
                torch._dynamo.mark_static_address(t)


def _say_grown(needed: int, planned: int, allocated: bool, new_length: int):
    """Say on stderr that a call needs more cache slots than planned (each growth recompiles)."""
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8))
    what = "planned (max_len)"
    if allocated:
        what = "allocated"
    print(
        f"decode.Decoder: a call needs {needed} cache slots (prompt + new tokens), more than the "
        f"{planned} {what}: a new {new_length}-slot cache and its graphs (dynamo keeps {limit} "
        "graphs of the step per process, then runs it eagerly). Size max_len for the longest "
        "prompt (rollout.Sampler's examples=). Said once.",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------- a call


def generate_static(
    decoder: Decoder,
    model,
    prompts,
    max_new_tokens,
    knobs: dict,
    stop_ids,
    allowed_ids,
    generator,
    cache_dtype,
):
    """`sample._generate` with the decoder's static step: the same prefill, the same token choices
    and the same random draws in the same order, so the same results; returns (tokens, lengths,
    logprobs, finished), views of the decoder's buffers (generate clones them)."""
    device = next(model.parameters()).device
    ids, lens = left_padded(prompts, device)  # [B, P], [B]
    B, P = ids.shape
    N = max_new_tokens
    w = model.lm_head.weight  # [V, H]
    if getattr(model.lm_head, "bias", None) is not None:
        raise TypeError("generate expects a bias-free lm_head (as in Llama)")
    if allowed_ids is None:
        index = torch.arange(w.shape[0], device=device)
    else:  # as `head_rows`
        index = torch.unique(torch.as_tensor(allowed_ids, dtype=torch.long).to(device))
    cast = None
    if torch.is_autocast_enabled(device.type):
        cast = torch.get_autocast_dtype(device.type)
    weights = decoder.layer_weights(cast)  # under autocast: copies cast once per call (same values)
    # The head in fp32 (`head_logits`): a copy of the allowed rows (or of all rows when lm_head is
    # in a lower precision); None: the step reads an fp32 lm_head.weight itself.
    head_dtype = torch.promote_types(w.dtype, torch.float32)
    if allowed_ids is None and head_dtype == w.dtype:
        head_dtype = None
    s = decoder.state_for(
        B,
        P + N,
        index.numel(),
        head_dtype,
        cache_dtype,
        with_seen=knobs["repetition_penalty"] != 1.0,
        with_noise=knobs["temperature"] != 0,
        n_stop=len(stop_ids),
    )
    if head_dtype is not None:  # this call's policy rows
        if allowed_ids is None:
            s.weight.copy_(w)
        else:
            s.weight.copy_(w.index_select(0, index))
    _start_call(s, ids, lens, index, stop_ids)
    # Python numbers: constants of the compiled graph
    sampling = Sampling(
        temperature=float(knobs["temperature"]),
        top_k=int(knobs["top_k"]),
        top_p=float(knobs["top_p"]),
        repetition_penalty=float(knobs["repetition_penalty"]),
    )
    sync_every = 1 if device.type == "cpu" else 8  # as in `_generate`: the same draws

    def draw():
        if s.noise is not None:  # the draws `sample_token` would make, from the caller's generator
            torch.rand(s.noise.shape, generator=generator, device=device, out=s.noise)

    logits = prefill(model, s.cache, ids, s.key_ok[:, :P], s.weight)  # eager; fills slots [0, P)
    draw()
    emit_token(logits, s, sampling)
    widths = spans(s.cache.length)
    for n in range(1, N):  # n tokens emitted so far; this step fills slot P + n - 1
        if n % sync_every == 0 and bool(s.done.all()):
            break
        draw()
        span = next(width for width in widths if width >= P + n)
        decoder.step(weights, s, sampling, span)
    T = int(s.lengths.max())
    return s.tokens[:, :T], s.lengths, s.logprobs[:, :T], s.done


def _start_call(s: DecodeState, ids, lens, index, stop_ids):
    """Fill `s` for a call on left-padded prompts ids [B, P] (lens [B] long), policy rows index
    [A] and `stop_ids`: the prompts' slots and tokens seen, every count back to 0."""
    P = ids.shape[1]
    s.index.copy_(index)
    if len(stop_ids):
        s.stop.copy_(torch.as_tensor(list(stop_ids), dtype=torch.long))
    s.key_ok.fill_(True)
    s.key_ok[:, :P] = prompt_mask(lens, P)
    s.lens.copy_(lens)
    s.start.fill_(P)
    s.t.zero_()
    for x in (s.done, s.lengths, s.tokens, s.logprobs, s.token):
        x.zero_()
    if s.seen is not None:  # the prompt's allowed tokens, as in `_generate`
        s.seen.copy_(seen_in_prompts(ids, s.index, s.key_ok[:, :P]))
