"""The speech-only policy, piece by piece: what the eager decode loop (sample.py), the static
compiled step (decode.py) and the trainer (grpo.py) share, so each computes it the same way.

- The head: LLASA's distribution restricted to the allowed ids (speech tokens + stop) and
  renormalized (DESIGN.md §2). Only the allowed rows of lm_head are multiplied (`head_rows`);
  `token_logprobs` is the one log-prob formula of rollouts and training, `head_logprobs` applies it
  a chunk of positions at a time, so a long response never holds [B, T, vocab] floats at once, and
  `response_logprobs` / `LogProbs` are the trainer's teacher-forced pass.
- Logits processing and sampling with Hugging Face semantics (repetition penalty, temperature,
  top-k, top-p), sampling without a host sync.
- A Hugging Face Llama run step by step over a KV cache the caller owns: `prefill` and
  `decode_one_token`, using the model's own modules and F.scaled_dot_product_attention.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- the speech-only head


def head_rows(model, allowed_ids=None, *, index=None):
    """The policy's output rows: (weight [A, H], index [A] long), index = the allowed vocab ids,
    sorted and unique (row r of weight is lm_head row index[r]).

    With `allowed_ids` (ids or a tensor), weight is an index_select of model.lm_head.weight: a
    copy of A * H elements that carries gradient back to those rows only. None: lm_head.weight
    itself and index = arange(vocab). `index` instead of allowed_ids: ids already sorted, unique
    and in range, on the weight's device (the index an earlier call returned), used as they are:
    no checks, no sort, no host sync. Bad ids raise ValueError; a biased lm_head, TypeError."""
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise TypeError("head_rows expects a bias-free lm_head (as in Llama)")
    w = head.weight  # [V, H]
    if index is not None:
        return w.index_select(0, index), index
    if allowed_ids is None:
        return w, torch.arange(w.shape[0], device=w.device)
    if torch.is_tensor(allowed_ids):
        ids = allowed_ids
    else:
        ids = torch.tensor(list(allowed_ids), dtype=torch.long)
    # Sorted, so that ties break as in an argmax of the masked full logits.
    index = torch.unique(ids.to(device=w.device, dtype=torch.long))
    bad = index[(index < 0) | (index >= w.shape[0])]
    if index.numel() == 0 or bad.numel():
        raise ValueError(
            f"allowed_ids must be a non-empty set of ids in [0, {w.shape[0]}), got "
            f"{index.numel()} ids, these out of range: {bad[:5].tolist()}"
        )
    return w.index_select(0, index), index


def to_rows(tokens, index, valid=None):
    """Vocab ids tokens [...] -> their rows in `head_rows`' weight [...] long (index [A] sorted).

    valid [...] bool marks the real tokens; the others (e.g. right padding) map to row 0. A real
    token outside the allowed ids raises ValueError (one host sync)."""
    rows, allowed = find_rows(tokens, index)
    if valid is not None:
        allowed = allowed | ~valid
        rows = rows.masked_fill(~valid, 0)
    if not bool(allowed.all()):
        raise ValueError(
            f"token ids {tokens[~allowed].unique()[:5].tolist()} are not among the "
            f"{index.numel()} allowed ids: the policy cannot have emitted them"
        )
    return rows


def find_rows(tokens, index):
    """Where tokens [...] sit in sorted index [A]: (rows [...] long clamped to A - 1,
    allowed [...] bool)."""
    rows = torch.searchsorted(index, tokens.contiguous()).clamp_(max=index.numel() - 1)
    return rows, index[rows] == tokens


def seen_in_prompts(ids, index, real):
    """Which policy rows occur in each prompt: ids [B, P] vocab ids, index [A] sorted (`head_rows`),
    real [B, P] bool (False on pads) -> seen [B, A] bool (the repetition penalty's start)."""
    B = ids.shape[0]
    A = index.numel()
    rows, allowed = find_rows(ids, index)  # [B, P] each
    seen = torch.zeros(
        B, A + 1, dtype=torch.bool, device=ids.device
    )  # column A: a bin for the rest
    seen.scatter_(1, torch.where(allowed & real, rows, A), True)
    return seen[:, :A]


def token_logprobs(logits, targets, temperature: float):
    """log_softmax(logits / temperature)[targets] in nats: logits [..., A] float32 (over the
    policy's rows), targets [...] long row indices -> [...] float32. temperature 0 (greedy)
    scores at temperature 1. The one formula of rollouts and training."""
    scaled = logits / _tempered(temperature)
    return scaled.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(scaled, dim=-1)


def _tempered(temperature: float) -> float:
    """The temperature log-probs are scored at: 1 for greedy (0), else itself."""
    if temperature > 0:
        return temperature
    return 1.0


def head_logits(hidden, weight):
    """Logits [..., A] float32 (float64 stays) of final-norm hidden states [..., H] through head
    rows weight [A, H], computed in fp32 even under autocast: a bf16 matmul would round large
    logits to steps of 0.125 (docs/speed.md). The one head of rollouts (eager and compiled) and
    training, so their log-probs agree."""
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.to(dtype), weight.to(dtype))


def head_logprobs(
    hidden, weight, targets, temperature: float, *, chunk: int = 256, with_entropy: bool = False
):
    """`token_logprobs` of hidden states through the head: hidden [B, T, H] (final-norm),
    weight [A, H] (`head_rows`), targets [B, T] row indices (`to_rows`) -> logp [B, T] float32,
    nats (+ entropy [B, T] of the tempered restricted distribution, nats, no grad, if asked).

    Positions go `chunk` at a time, so at most [B, chunk, A] logits exist at once. When autograd
    is on, each chunk runs under activation checkpointing: only its inputs are kept, and its
    logits are recomputed in backward, so the peak stays one chunk's logits there too. Gradients
    equal the unchunked computation's (up to float summation order). The logits are fp32 even
    under autocast (`head_logits`); a bf16 weight (FSDP's gathered params) is cast once per call,
    not per chunk."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        run = functools.partial(checkpoint, _chunk_logprobs, use_reentrant=False)
    else:
        run = _chunk_logprobs
    logp = []  # chunks of [B, c]
    entropy = []  # chunks of [B, c], or of None
    for s in range(0, hidden.shape[1], chunk):
        positions = slice(s, s + chunk)
        lp, ent = run(
            hidden[:, positions], weight, targets[:, positions], temperature, with_entropy
        )
        logp.append(lp)
        entropy.append(ent)
    logp = torch.cat(logp, dim=1)  # [B, T]
    if not with_entropy:
        return logp
    return logp, torch.cat(entropy, dim=1)


def _chunk_logprobs(h, weight, targets, temperature, with_entropy):
    """One chunk of `head_logprobs`: h [B, c, H], weight [A, H], targets [B, c] ->
    (logp [B, c], entropy [B, c] or None)."""
    logits = head_logits(h, weight)  # [B, c, A], as lm_head(h) computes each row, in fp32
    logp = token_logprobs(logits, targets, temperature)
    # (Either way, checkpoint's recompute in backward stops once logp is rebuilt.)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        p = F.softmax(logits / _tempered(temperature), dim=-1)
        return logp, torch.special.entr(p).sum(-1)  # [B, c]


# ----------------------------------------------------------------------------- training's log-probs


def response_logprobs(
    model,
    prompts: list[list[int]],
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
    allowed_ids=None,
    *,
    index=None,
    rows=None,
):
    """Teacher-forced log-probs (nats) of `tokens` [B, T] after each prompt, at logits /
    temperature, under the policy restricted to `allowed_ids` (None: the whole vocabulary), as
    sampled.

    Rows are [prompt | response] right-padded, so positions match generation (0 at the first
    prompt token) and no attention mask is needed: the pads come after every position that is
    read. Logits exist only at response positions, only for the allowed rows of lm_head, and only a
    chunk of positions at a time (`head_logprobs`). Returns logp [B, T] (and entropy [B, T] of the
    tempered policy when asked, without grad); padding positions hold junk, masked by the caller.
    `index` (`head_rows`' sorted ids) and `rows` ([B, T], `to_rows` of tokens), when the caller
    has them, spare this pass its host syncs (the sort of the ids and the check of the tokens)."""
    device = tokens.device
    B, T = tokens.shape
    lens = [len(p) for p in prompts]
    # ids [B, L], L = longest prompt + T: built on the CPU, one copy to the device
    ids = torch.zeros(B, max(lens) + T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    P = torch.tensor(lens)  # [B]
    if device.type == "cuda":  # pinned: the copies are queued, the CPU does not wait for the GPU
        ids = ids.pin_memory()
        P = P.pin_memory()
    ids = ids.to(device, non_blocking=True)
    P = P.to(device, non_blocking=True)
    pos = (
        P[:, None] + torch.arange(T, device=device)[None, :]
    )  # [B, T]: where response token t sits
    ids.scatter_(1, pos, tokens)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # [B, L, H]
    before = (pos - 1)[:, :, None].expand(-1, -1, hidden.shape[-1])  # [B, T, H]
    h = hidden.gather(1, before)  # [B, T, H]: the states that predict each response token
    weight, index = head_rows(model, allowed_ids, index=index)  # [A, H]: only these rows get grads
    if rows is None:
        valid = torch.isin(tokens, index)  # [B, T]: padding (id 0) may lie outside the allowed ids
        rows = to_rows(tokens, index, valid)
    return head_logprobs(h, weight, rows, temperature, with_entropy=with_entropy)


class LogProbs(torch.nn.Module):
    """A causal LM whose forward is `response_logprobs`. The trainer's passes go through it, so that
    FSDP2 (parallel.shard) sees them as forwards: its hooks gather the embeddings, final norm and
    lm_head around each pass, which calls the model's parts directly."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, prompts, tokens, temperature, with_entropy=False, allowed_ids=None, **kw):
        return response_logprobs(
            self.lm, prompts, tokens, temperature, with_entropy, allowed_ids, **kw
        )


# ----------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits, seen, penalty: float):
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits divided by `penalty` if positive,
    multiplied if negative (once per token, however often it occurred). logits [B, V],
    seen [B, V] bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits, k: int):
    """HF TopKLogitsWarper: keep the k largest logits per row (ties with the k-th kept).
    logits [B, V]."""
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


def process_logits(
    logits, *, temperature: float, top_k: int, top_p: float, repetition_penalty: float, seen=None
):
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
    exponential race), and unlike torch.multinomial never waits for the GPU. noise [B, V]
    float32: the uniform draws U to use (`torch.rand` of the same shape), else drawn here from
    `generator`."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    # E = -log(U), U ~ uniform [0, 1), lies in (0, inf]: never 0, so probs / E is never 0/0 = NaN
    # (and it is cheaper than Tensor.exponential_: docs/speed.md).
    if noise is None:
        race = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    else:
        race = noise.log().neg()
    return (probs / race).argmax(dim=-1)


# ----------------------------------------------------------------------------- the model, stepwise


@dataclass
class KVCache:
    """The keys and values of every layer: one tensor per layer for K and one for V, each
    [B, kv_heads, T_max, head_dim]. Separate tensors, not slices of one stacked tensor, so that a
    compiled step's in-place write of one slot stays a write: inductor turns an in-place write into
    a slice of a larger tensor into a copy of the whole tensor (DESIGN.md §5)."""

    k: list  # layers x [B, kv_heads, T_max, head_dim]
    v: list  # layers x [B, kv_heads, T_max, head_dim]

    @staticmethod
    def for_model(
        model, batch: int, max_len: int, dtype: torch.dtype | None = None, *, zeros: bool = False
    ) -> "KVCache":
        """Uninitialized (fine for the eager loop: prefill writes every prompt slot, pads too, and
        decoding reads only the slots written so far), or zeros (for a step that reads unwritten,
        masked slots: they must be finite)."""
        cfg = model.config
        head_dim = model.model.layers[0].self_attn.k_proj.out_features // cfg.num_key_value_heads
        p = next(model.parameters())
        shape = (batch, cfg.num_key_value_heads, max_len, head_dim)
        dtype = dtype or p.dtype  # bf16 under autocast: half the memory, no per-step casts
        new = torch.zeros if zeros else torch.empty
        layers = range(cfg.num_hidden_layers)
        return KVCache(
            k=[new(shape, dtype=dtype, device=p.device) for _ in layers],
            v=[new(shape, dtype=dtype, device=p.device) for _ in layers],
        )

    @property
    def length(self) -> int:
        return self.k[0].shape[2]


def rotate(x, cos, sin):
    """Rotary embedding, HF Llama order (halves, not interleaved). x [B, H, S, D],
    cos/sin [B, 1, S, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention(attn, x, cos, sin, k_cache, v_cache, start: int, mask):
    """One attention block on new tokens x [B, S, hidden] at cache slots [start, start+S).

    k_cache/v_cache [B, kv_heads, T_max, head_dim] are written in place; mask [B, S, start+S] bool
    (True = may attend) covers pads and causality. Returns [B, S, hidden]."""
    B, S, _ = x.shape
    Hkv = k_cache.shape[1]
    D = k_cache.shape[3]
    q = attn.q_proj(x).view(B, S, -1, D).transpose(1, 2)  # [B, H, S, D]
    k = attn.k_proj(x).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
    v = attn.v_proj(x).view(B, S, Hkv, D).transpose(1, 2)
    q = rotate(q, cos, sin)
    k = rotate(k, cos, sin)
    end = start + S
    k_cache[:, :, start:end] = k
    v_cache[:, :, start:end] = v
    H = q.shape[1]
    n_rep = H // Hkv
    # GQA without copying K/V: the n_rep query heads sharing KV head g (heads g*n_rep + r, as in
    # HF's repeat_kv) become n_rep*S query rows of that head; the mask is tiled to match
    # (one decode step's single mask row simply broadcasts).
    q = q.reshape(B, Hkv, n_rep * S, D)
    m = mask.unsqueeze(1)  # [B, 1, S, end]
    if S > 1:
        m = m.repeat(1, 1, n_rep, 1)  # [B, 1, n_rep*S, end]
    out = F.scaled_dot_product_attention(
        q.to(k_cache.dtype), k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=m
    )
    out = out.to(x.dtype)  # a cache dtype other than the activations' (cache_dtype=) is allowed
    out = out.reshape(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)
    return attn.o_proj(out)


def forward(model, cache: KVCache, ids, pos, start: int, mask):
    """Run the decoder on ids [B, S] (rotary positions pos [B, S]) at cache slots [start, start+S);
    mask [B, S, start+S] bool. Returns the final-norm hidden states [B, S, hidden]."""
    m = model.model
    x = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(x, pos)  # [B, S, D] each; llama3 / other rope scaling handled by HF
    cos = cos.unsqueeze(1)  # [B, 1, S, D]
    sin = sin.unsqueeze(1)
    for i, layer in enumerate(m.layers):
        h = layer.input_layernorm(x)
        x = x + attention(layer.self_attn, h, cos, sin, cache.k[i], cache.v[i], start, mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.norm(x)


def prefill(model, cache: KVCache, ids, key_ok, weight):
    """Left-padded prompts ids [B, P], key_ok [B, P] bool (False on pads), head weight [A, H]
    (`head_rows`) -> next-token logits [B, A] float32 (`head_logits`)."""
    P = ids.shape[1]
    pads = P - key_ok.sum(dim=1, keepdim=True)  # [B, 1]
    pos = (torch.arange(P, device=ids.device) - pads).clamp(min=0)  # [B, P], 0 at the first token
    causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()  # [P, P]
    # Pad rows may attend to themselves only: a row with no allowed key would give NaN in SDPA,
    # and that NaN would reach the real rows through the pads' cached values.
    itself = torch.eye(P, dtype=torch.bool, device=ids.device)  # [P, P]
    mask = (causal & key_ok[:, None, :]) | itself  # [B, P, P]
    hidden = forward(model, cache, ids, pos, 0, mask)
    return head_logits(hidden[:, -1], weight)  # only the last position is needed


def decode_one_token(model, cache: KVCache, token, pos, slot: int, key_ok, weight):
    """token [B] at rotary position pos [B], written to cache slot `slot`; key_ok [B, T_max] bool;
    head weight [A, H]. Returns next-token logits [B, A] float32 (`head_logits`)."""
    mask = key_ok[:, None, : slot + 1]  # [B, 1, slot+1]
    hidden = forward(model, cache, token[:, None], pos[:, None], slot, mask)
    return head_logits(hidden[:, 0], weight)


def left_padded(prompts: list[list[int]], device):
    """Prompts as ids [B, P] left-padded with 0 (P = the longest), and their lengths lens [B]."""
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [B] real prompt lengths
    P = int(max(len(p) for p in prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
    return ids.to(device), lens


def prompt_mask(lens, P: int):
    """Which slots of left-padded prompts hold a real token: lens [B] -> [B, P] bool."""
    return torch.arange(P, device=lens.device) >= (P - lens)[:, None]
