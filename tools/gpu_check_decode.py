"""tools.gpu_check's part (a): the compiled decode step as the trainer builds it (decode.Decoder on
fp32 master weights under bf16 autocast, a bf16 cache of the trainer's 1,792 slots, batch 64, the
llasa-1b preset's sampling, a seeded CUDA generator) against sample.py's eager loop, in two cases:
short prompts (the first spans, 256 and 512 slots) and clone-length prompts (text + speech codes,
~1,000 tokens) whose tokens reach the last spans (1,024 and 1,792). Checks: the same tokens up to
bf16 near-ties, one graph per span used, no recompile or CUDA-graph skip, the cache one tensor per
layer; figures: ms per step against the HBM-bandwidth bound.
"""

import math
import time

import torch

import decode
import llama
import sample
from tools.bench_common import LLAMA_1B, timed
from tools.gpu_builders import (
    LLASA_SPEECH_IDS,
    TINY,
    autocast,
    hbm_tb_s,
    random_llama,
    record_spans,
)

TIE_TOL = 0.15  # a token whose log(p / race) is within this of the race's best: a bf16 near-tie


def first_divergences(a, b) -> list[tuple[int, int]]:
    """(row, position) where two Rollouts' tokens first differ (a row that ended earlier counts)."""
    out = []
    for i in range(a.tokens.shape[0]):
        x = a.tokens[i, : int(a.lengths[i])].tolist()
        y = b.tokens[i, : int(b.lengths[i])].tolist()
        n = next((t for t, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if n is not None:
            out.append((i, n))
        elif len(x) != len(y):
            out.append((i, min(len(x), len(y))))
    return out


def tie_gaps(model, prompts, a, b, divs, allowed, knobs, seed, dev) -> list[float]:
    """Per divergence: how far each path's token falls behind the race's best under a reference
    forward (the HF layers on prompt + common prefix, the fp32 head) with the uniform draws both
    paths used there (replayed from `seed`): ~0 for both at a bf16 near-tie, large for a wrong
    token, inf where one path stopped and the other went on."""
    weight, index = llama.head_rows(model, allowed)
    gen = torch.Generator(dev).manual_seed(seed)
    noise = {}  # (row, position) -> that token's uniform draws [A]
    last = max((n for _, n in divs), default=-1)
    for t in range(last + 1):  # token t's draws: the (t+1)-th [B, A]
        u = torch.rand((len(prompts), index.numel()), generator=gen, device=dev)
        for i, n in divs:
            if n == t:
                noise[i, t] = u[i].clone()
    gaps = []
    for i, n in divs:
        if n >= min(int(a.lengths[i]), int(b.lengths[i])):
            gaps.append(math.inf)  # one stopped where the other went on
            continue
        ids = torch.tensor([prompts[i] + a.tokens[i, :n].tolist()], device=dev)  # [1, P + n]
        with torch.no_grad(), autocast(dev):
            h = model.model(input_ids=ids)[0][:, -1]  # [1, d]
        logits = llama.process_logits(llama.head_logits(h, weight.float()), **knobs)
        p = logits.softmax(-1)[0]  # [A]
        score = p.log() - noise[i, n].log().neg().log()  # log(p / race): the race picks its max
        rows = llama.find_rows(torch.stack([a.tokens[i, n], b.tokens[i, n]]), index)[0]
        gaps.append(float((score.max() - score[rows]).max()))
    return gaps


def part_a(dev, smoke):
    """Both cases through `_case`, and a check of the checker: another seed's tokens are flagged
    as no near-ties. Returns the part's row (the late case's under `late`)."""
    # the trainer's cache for 256-token prompts
    if smoke:
        B, N, max_len = 4, 260, 516
        model = random_llama(TINY, dev, torch.float32)
        allowed = list(range(256, 512))
        stop = allowed[-1]
        text = 256  # text ids drawn below this
    else:
        B, N, max_len = 64, 256, 1500 + 256
        model = random_llama(dict(LLAMA_1B), dev, torch.float32)  # fp32 master weights
        allowed = LLASA_SPEECH_IDS
        stop = 128261
        text = 128000
    g = torch.Generator().manual_seed(0)
    knobs = dict(temperature=0.8, top_k=0, top_p=0.9, repetition_penalty=1.0)  # the preset's
    kw = dict(
        stop_ids=(stop,),
        allowed_ids=torch.tensor(allowed),
        **knobs,
        cache_dtype=torch.bfloat16 if dev.type == "cuda" else None,  # the trainer's bf16 cache
    )
    dec = decode.Decoder(  # as rollout.Sampler builds it
        model,
        compile=True,
        max_len=max_len,
        compile_options={"backend": "eager"} if smoke else None,
    )
    steps = record_spans(dec)

    def prompts(lo, hi, codes=False):
        """B prompts of lo..hi ids: text, or 16 text ids and then a voice prompt's speech codes."""
        out = []
        for n in torch.randint(lo, hi + 1, (B,), generator=g).tolist():
            out.append(torch.randint(0, text, (16 if codes else n,), generator=g).tolist())
            if codes:  # any speech token but the stop token
                picks = torch.randint(0, len(allowed) - 1, (n - 16,), generator=g).tolist()
                out[-1] += [allowed[j] for j in picks]
        return out

    if smoke:
        short = prompts(6, 12)
    else:
        short = prompts(48, 96)
    row, comp = _case(
        model, dec, steps, short, N, kw, knobs, allowed, dev, set(), eager_timing=True
    )
    # the checker itself: another seed's tokens are no near-ties
    other = _run(model, short, kw, dev, None, 4, 2)
    divs = first_divergences(comp, other)
    flagged = [
        x > TIE_TOL for x in tie_gaps(model, short, comp, other, divs, allowed, knobs, 1, dev)
    ]
    widths = decode.spans(row["cache_slots"])  # ..., 1024, 1792 at the trainer's cache
    clone = prompts(widths[-2] - 64, widths[-2] - 24, codes=True)
    late_n = 64 if smoke else 128  # ends in the last span
    seen = set(row["spans_used"])
    late, _ = _case(
        model, dec, steps, clone, late_n, kw, knobs, allowed, dev, seen, eager_timing=False
    )
    checks = {
        **row.pop("checks"),
        **{f"late_{k}": v for k, v in late.pop("checks").items()},
        "late_reaches_last_span": max(late["spans_used"]) == widths[-1] > max(row["spans_used"]),
        "checker_flags_other_seed": len(flagged) > 0 and sum(flagged) >= 0.9 * len(flagged),
    }
    late.pop("card")
    return dict(card=row.pop("card"), batch=B, max_len=max_len, **row, late=late, checks=checks)


def _run(model, prompts, kw, dev, decoder, n, seed=1):
    """sample.generate of n new tokens under the trainer's autocast, seeded: a Rollout."""
    with torch.no_grad(), autocast(dev):
        return sample.generate(
            model,
            prompts,
            max_new_tokens=n,
            decoder=decoder,
            generator=torch.Generator(dev).manual_seed(seed),
            **kw,
        )


def _case(model, dec, steps, prompts, N, kw, knobs, allowed, dev, seen: set, eager_timing: bool):
    """One case of part (a): `dec`'s first call on `prompts` (compiling the spans it reaches beyond
    `seen`), the eager loop's tokens, timed calls (the prefill taken out), the checks.
    Returns (row, compiled Rollout)."""
    from torch._dynamo.utils import counters

    cuda = dev.type == "cuda"
    B = len(prompts)
    first = len(steps)
    graphs_before = counters["stats"]["unique_graphs"]
    skips_before = counters["inductor"]["cudagraph_skips"]
    t0 = time.time()
    comp = _run(model, prompts, kw, dev, dec, N)  # the first call compiles, records CUDA graphs
    compile_s = time.time() - t0
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    used = steps[first:]
    eager = _run(model, prompts, kw, dev, None, N)  # the reference: sample.py's dynamic loop
    calls = [
        lambda: _run(model, prompts, kw, dev, dec, N),
        lambda: _run(model, prompts, kw, dev, dec, 1),
    ]
    if eager_timing:
        calls.append(lambda: _run(model, prompts, kw, dev, None, N))
    t_n, t_1, *t_eager = timed(calls, dev, 1)
    recompiled = counters["stats"]["unique_graphs"] - graphs_before - graphs
    ms = (t_n - t_1) / (N - 1) * 1e3  # the prefill taken out
    divs = first_divergences(comp, eager)
    gaps = tie_gaps(model, prompts, comp, eager, divs, allowed, knobs, 1, dev)
    upto = [dict(divs).get(i, int(comp.lengths[i])) for i in range(B)]  # each row's common prefix
    lp_diffs = [
        float((comp.logprobs[i, :n] - eager.logprobs[i, :n]).abs().max())
        for i, n in enumerate(upto)
        if n
    ]
    s = next(iter(dec.states.values()))
    k0 = s.cache.k[0]  # [B, kv_heads, slots, head_dim]
    layers = len(s.cache.k)
    kv_slot = 2 * layers * B * k0.shape[1] * k0.shape[3] * k0.element_size()  # K, V of one slot
    weights = dec.layer_weights(k0.dtype if cuda else None)
    tensors = [t for x in weights for pair in x for t in pair if t is not None]
    read = sum(t.numel() * t.element_size() for t in tensors)
    read += s.weight.numel() * s.weight.element_size()
    read_gb = (read + kv_slot * sum(used) / len(used)) / 1e9  # a step: weights, head rows, span
    exact = torch.equal(comp.tokens, eager.tokens) and torch.equal(comp.lengths, eager.lengths)
    if cuda:
        card, tb_s = hbm_tb_s(dev)
    else:
        card = "cpu"
        tb_s = None
    storages = {t.untyped_storage().data_ptr() for t in s.cache.k + s.cache.v}
    row = dict(
        card=card,
        prompt_len=[min(map(len, prompts)), max(map(len, prompts))],
        new_tokens=N,
        cache_slots=s.cache.length,
        spans_used=sorted(set(used)),
        graphs=graphs,
        recompiled_in_timed_runs=recompiled,
        cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips_before,
        compile_s=round(compile_s, 1),
        ms_per_step=round(ms, 3),
        gb_read_per_step=round(read_gb, 3),
        tokens_equal=exact,
        rows_identical=B - len(divs),
        first_divergences=[n for _, n in divs][:16],
        max_tie_gap=round(max(gaps, default=0.0), 4),
        logprob_max_diff_common=max(lp_diffs, default=0.0),
        cache_tensors=len(storages),
    )
    if t_eager:
        eager_ms = (t_eager[0] - t_1) / (N - 1) * 1e3
        row.update(eager_ms_per_step=round(eager_ms, 3), speedup=round(eager_ms / ms, 2))
    if tb_s:  # GB / (TB/s) = ms
        row.update(
            hbm_tb_s=tb_s,
            bound_ms_per_step=round(read_gb / tb_s, 3),
            fraction_of_bound=round(read_gb / tb_s / ms, 3),
        )
    row["checks"] = dict(
        graph_per_span=graphs == len(set(used) - seen),
        no_recompile=recompiled == 0,
        no_cudagraph_skips=row["cudagraph_skips"] == 0,
        cache_one_tensor_per_layer=row["cache_tensors"] == 2 * layers,
        tokens=all(x <= TIE_TOL for x in gaps) if cuda else exact,
    )
    return row, comp
