"""gpu_check.py's part (a): the compiled decode step as the trainer builds it (decode.Decoder on fp32 master
weights under bf16 autocast, a bf16 cache of the trainer's 1,792 slots, batch 64, the llasa-1b preset's
sampling, a seeded CUDA generator) against sample.py's eager loop, in two cases: short prompts (the first
spans, 256 and 512 slots) and clone-length prompts (text + speech codes, ~1,000 tokens) whose tokens reach
the last spans (1,024 and 1,792): the same tokens up to bf16 near-ties, one graph per span used, no recompile
or CUDA-graph skip, the cache one tensor per layer, ms per step against the HBM-bandwidth bound.
"""
import math
import time

import torch

import decode
import llama
import sample
from bench_common import LLAMA_1B, timed
from bench_gpu import LLASA_SPEECH_IDS, TINY, _hbm_tb_s, _random_llama, autocast as _autocast, record_spans

TIE_TOL = 0.15  # a token whose log(p / race) is within this of the race's best: a bf16 near-tie


def first_divergences(a, b) -> list[tuple[int, int]]:
    """(row, position) where two Rollouts' tokens first differ (a row that ended earlier counts)."""
    out = []
    for i in range(a.tokens.shape[0]):
        x, y = a.tokens[i, :int(a.lengths[i])].tolist(), b.tokens[i, :int(b.lengths[i])].tolist()
        n = next((t for t, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if n is not None or len(x) != len(y):
            out.append((i, min(len(x), len(y)) if n is None else n))
    return out


def tie_gaps(model, prompts, a, b, divs, allowed, knobs, seed, dev) -> list[float]:
    """Per divergence: how far each path's token falls behind the race's best under a reference forward
    (the HF layers on prompt + common prefix, the fp32 head) with the uniform draws both paths used
    there (replayed from `seed`): ~0 for both at a bf16 near-tie, large for a wrong token."""
    weight, index = llama.head_rows(model, allowed)
    gen, noise, gaps = torch.Generator(dev).manual_seed(seed), {}, []
    for t in range(max((n for _, n in divs), default=-1) + 1):  # token t's draws: the (t+1)-th [B, A]
        u = torch.rand((len(prompts), index.numel()), generator=gen, device=dev)
        noise.update({(i, t): u[i].clone() for i, n in divs if n == t})
    for i, n in divs:
        if n >= min(int(a.lengths[i]), int(b.lengths[i])):
            gaps.append(math.inf)  # one stopped where the other went on
            continue
        with torch.no_grad(), _autocast(dev):
            h = model.model(input_ids=torch.tensor([prompts[i] + a.tokens[i, :n].tolist()], device=dev))[0][:, -1]
        p = llama.process_logits(llama.head_logits(h, weight.float()), **knobs).softmax(-1)[0]
        score = p.log() - noise[i, n].log().neg().log()  # log(p / race): the race picks its max
        rows = llama.find_rows(torch.stack([a.tokens[i, n], b.tokens[i, n]]), index)[0]
        gaps.append(float((score.max() - score[rows]).max()))
    return gaps


def part_a(dev, smoke):
    B, N, max_len = (4, 260, 516) if smoke else (64, 256, 1500 + 256)  # the trainer's cache for 256-token prompts
    model = _random_llama(TINY if smoke else dict(LLAMA_1B), dev, torch.float32)  # fp32 master weights
    allowed, g = list(range(256, 512)) if smoke else LLASA_SPEECH_IDS, torch.Generator().manual_seed(0)
    knobs = dict(temperature=0.8, top_k=0, top_p=0.9, repetition_penalty=1.0)  # the llasa-1b preset's
    kw = dict(stop_ids=(allowed[-1] if smoke else 128261,), allowed_ids=torch.tensor(allowed), **knobs,
              cache_dtype=torch.bfloat16 if dev.type == "cuda" else None)  # the trainer's bf16 cache
    dec = decode.Decoder(model, compile=True, max_len=max_len,  # as rollout.Sampler builds it
                         compile_options={"backend": "eager"} if smoke else None)
    steps, text = record_spans(dec), 256 if smoke else 128000

    def prompts(lo, hi, codes=False):  # B prompts of lo..hi ids: text, or 16 text ids and then speech codes
        out = []
        for n in torch.randint(lo, hi + 1, (B,), generator=g).tolist():
            out.append(torch.randint(0, text, (16 if codes else n,), generator=g).tolist())
            if codes:  # a voice prompt's codes (any speech token but the stop token)
                out[-1] += [allowed[j] for j in torch.randint(0, len(allowed) - 1, (n - 16,), generator=g).tolist()]
        return out

    short = prompts(6 if smoke else 48, 12 if smoke else 96)
    row, comp = _case(model, dec, steps, short, N, kw, knobs, allowed, dev, set(), eager_timing=True)
    other = _run(model, short, kw, dev, None, 4, 2)  # the checker itself: another seed's tokens are no near-ties
    flagged = [x > TIE_TOL for x in tie_gaps(model, short, comp, other, first_divergences(comp, other), allowed,
                                             knobs, 1, dev)]
    widths = decode.spans(row["cache_slots"])  # ..., 1024, 1792 at the trainer's cache
    late, _ = _case(model, dec, steps, prompts(widths[-2] - 64, widths[-2] - 24, codes=True), 64 if smoke else 128,
                    kw, knobs, allowed, dev, set(row["spans_used"]), eager_timing=False)  # ends in the last span
    checks = {**row.pop("checks"), **{f"late_{k}": v for k, v in late.pop("checks").items()},
              "late_reaches_last_span": max(late["spans_used"]) == widths[-1] > max(row["spans_used"]),
              "checker_flags_other_seed": len(flagged) > 0 and sum(flagged) >= 0.9 * len(flagged)}
    late.pop("card")
    return dict(card=row.pop("card"), batch=B, max_len=max_len, **row, late=late, checks=checks)


def _run(model, prompts, kw, dev, decoder, n, seed=1):
    with torch.no_grad(), _autocast(dev):
        return sample.generate(model, prompts, max_new_tokens=n, decoder=decoder,
                               generator=torch.Generator(dev).manual_seed(seed), **kw)


def _case(model, dec, steps, prompts, N, kw, knobs, allowed, dev, seen: set, eager_timing: bool):
    """One case of part (a): `dec`'s first call on `prompts` (compiling the spans it reaches beyond `seen`),
    the eager loop's tokens, timed calls (the prefill taken out), the checks. Returns (row, compiled Rollout)."""
    from torch._dynamo.utils import counters
    cuda, B, first = dev.type == "cuda", len(prompts), len(steps)
    g0, s0 = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    t0 = time.time()
    comp = _run(model, prompts, kw, dev, dec, N)  # the first call compiles and records the CUDA graphs
    compile_s, graphs, used = time.time() - t0, counters["stats"]["unique_graphs"] - g0, steps[first:]
    eager = _run(model, prompts, kw, dev, None, N)  # the reference: sample.py's dynamic loop
    t_n, t_1, *t_eager = timed([lambda: _run(model, prompts, kw, dev, dec, N), lambda: _run(model, prompts, kw, dev,
                                dec, 1)] + [lambda: _run(model, prompts, kw, dev, None, N)] * eager_timing, dev, 1)
    recompiled = counters["stats"]["unique_graphs"] - g0 - graphs
    ms = (t_n - t_1) / (N - 1) * 1e3  # the prefill taken out
    divs = first_divergences(comp, eager)
    gaps = tie_gaps(model, prompts, comp, eager, divs, allowed, knobs, 1, dev)
    upto = [dict(divs).get(i, int(comp.lengths[i])) for i in range(B)]  # each row's common prefix
    lp = max((float((comp.logprobs[i, :n] - eager.logprobs[i, :n]).abs().max()) for i, n in enumerate(upto) if n),
             default=0.0)
    s = next(iter(dec.states.values()))
    k0, layers = s.cache.k[0], len(s.cache.k)
    kv_slot = 2 * layers * B * k0.shape[1] * k0.shape[3] * k0.element_size()  # K and V of one slot, all layers
    read = sum(t.numel() * t.element_size() for x in dec.layer_weights(k0.dtype if cuda else None)
               for pair in x for t in pair if t is not None) + s.weight.numel() * s.weight.element_size()
    read_gb = (read + kv_slot * sum(used) / len(used)) / 1e9  # a step: weights, fp32 head rows, its span
    exact = torch.equal(comp.tokens, eager.tokens) and torch.equal(comp.lengths, eager.lengths)
    card, tb_s = _hbm_tb_s(dev) if cuda else ("cpu", None)
    row = dict(card=card, prompt_len=[min(map(len, prompts)), max(map(len, prompts))], new_tokens=N,
               cache_slots=s.cache.length, spans_used=sorted(set(used)), graphs=graphs,
               recompiled_in_timed_runs=recompiled, cudagraph_skips=counters["inductor"]["cudagraph_skips"] - s0,
               compile_s=round(compile_s, 1), ms_per_step=round(ms, 3), gb_read_per_step=round(read_gb, 3),
               tokens_equal=exact, rows_identical=B - len(divs), first_divergences=[n for _, n in divs][:16],
               max_tie_gap=round(max(gaps, default=0.0), 4), logprob_max_diff_common=lp,
               cache_tensors=len({t.untyped_storage().data_ptr() for t in s.cache.k + s.cache.v}))
    if t_eager:
        eager_ms = (t_eager[0] - t_1) / (N - 1) * 1e3
        row.update(eager_ms_per_step=round(eager_ms, 3), speedup=round(eager_ms / ms, 2))
    if tb_s:  # GB / (TB/s) = ms
        row.update(hbm_tb_s=tb_s, bound_ms_per_step=round(read_gb / tb_s, 3),
                   fraction_of_bound=round(read_gb / tb_s / ms, 3))
    row["checks"] = dict(graph_per_span=graphs == len(set(used) - seen), no_recompile=recompiled == 0,
                         no_cudagraph_skips=row["cudagraph_skips"] == 0,
                         cache_one_tensor_per_layer=row["cache_tensors"] == 2 * layers,
                         tokens=all(x <= TIE_TOL for x in gaps) if cuda else exact)
    return row, comp
