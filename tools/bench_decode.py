"""The decode benchmarks of `python -m tools.bench`: its `sample` and `step` sections.

sample: tokens/s of sample.generate against Hugging Face `generate` on the same model, batch and
number of new tokens (on CUDA also ms per step against the memory-bandwidth bound). step: ms per
step of the compiled static decode step at a short cache and at the trainer's, and of the eager
loop. Each prints JSON lines (tools/bench.py says what their fields mean).
"""

import argparse
import itertools
import json
import time

import torch

from tools.bench_common import LLAMA_1B, timed

# ----------------------------------------------------------------------------- sample


def bench_sample(argv):
    """sample.generate vs HF model.generate: tokens/s, same model, prompts and new-token count."""
    import models
    import sample

    p = argparse.ArgumentParser(
        prog="python -m tools.bench sample", description=bench_sample.__doc__
    )
    p.add_argument(
        "--preset",
        choices=["small", "llama-1b"],
        default="small",
        help="model shapes: 'small' uses the --layers/--hidden/... flags; 'llama-1b' is "
        "Llama-3.2-1B with LLASA's vocab (hidden 2048, 16 layers, 32/8 heads, vocab 193800, tied) "
        "(default: small)",
    )
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default: 256)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default: 4)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default: 1024)")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch (default: 16)")
    p.add_argument(
        "--prompt-len",
        type=int,
        default=64,
        help="longest prompt in tokens; prompts vary from half this to this (default: 64)",
    )
    p.add_argument(
        "--new-tokens", type=int, default=256, help="tokens generated per sequence (default: 256)"
    )
    p.add_argument(
        "--modes",
        default="greedy,sample",
        help="comma-separated: greedy (temperature 0) and/or sample (temperature 0.8, top-p 0.9) "
        "(default: greedy,sample)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per measurement, median reported (default: 3)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="weights and activations (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads, as on CI (default: 2)"
    )
    p.add_argument(
        "--hbm-gbps",
        type=float,
        default=3350.0,
        help="GPU memory bandwidth in GB/s for the bound (default: 3350, H100 SXM)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.preset == "llama-1b":
        shape = dict(LLAMA_1B)
    else:
        shape = dict(
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=4 * args.hidden,
            vocab=args.vocab,
        )
    vocab = shape.pop("vocab")
    model = models.tiny_llama(vocab, seed=0, **shape).to(device=device, dtype=dtype)

    g = torch.Generator().manual_seed(0)
    lo = max(1, args.prompt_len // 2)
    prompts = []
    for _ in range(args.batch):
        length = int(torch.randint(lo, args.prompt_len + 1, (1,), generator=g))
        prompts.append(torch.randint(0, vocab, (length,), generator=g).tolist())
    P = max(len(x) for x in prompts)
    # HF's input: left-padded ids and attention mask, the layout its own batched generate expects.
    ids = torch.zeros(args.batch, P, dtype=torch.long)
    mask = torch.zeros(args.batch, P, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, P - len(x) :] = torch.tensor(x)
        mask[i, P - len(x) :] = 1
    ids = ids.to(device)
    mask = mask.to(device)

    modes = args.modes.split(",")
    bad = [m for m in modes if m not in ("greedy", "sample")]
    if bad:
        raise SystemExit(
            f"unknown mode(s) {bad} in --modes {args.modes!r}: expected greedy and/or sample"
        )
    for mode in modes:
        knobs = dict(temperature=0.0) if mode == "greedy" else dict(temperature=0.8, top_p=0.9)
        # top_k=0: HF's generation config otherwise applies top-k 50, which ours would not.
        hf_knobs = (
            dict(do_sample=False)
            if mode == "greedy"
            else dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0)
        )

        def ours(n=args.new_tokens, knobs=knobs):
            r = sample.generate(model, prompts, max_new_tokens=n, **knobs)
            assert r.tokens.shape[1] == n
            return r

        def hf(n=args.new_tokens, hf_knobs=hf_knobs):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
                **hf_knobs,
            )
            assert out.shape[1] == P + n
            return out

        with torch.no_grad():
            # Warm-up: allocator, kernels, HF's generation-config set-up.
            ours(8)
            hf(8)
            t_ours, t_hf = timed([ours, hf], device, args.repeats)
        n_tok = args.batch * args.new_tokens
        row = dict(
            name=f"sample/{mode}",
            preset=args.preset,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            batch=args.batch,
            prompt_len=P,
            new_tokens=args.new_tokens,
            ours_tok_s=round(n_tok / t_ours, 1),
            hf_tok_s=round(n_tok / t_hf, 1),
            ratio=round(t_hf / t_ours, 3),
        )
        if device.type == "cuda":
            # Per decode step the GPU must at least read every weight once and the KV cache so far
            # (average context P + N/2); that over HBM bandwidth is the floor on step time.
            # Measured ms/step is the whole call over N steps, so it includes the prefill
            # (slightly pessimistic).
            cfg = model.config
            weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            head_dim = cfg.hidden_size // cfg.num_attention_heads
            kv_bytes = (
                2
                * cfg.num_hidden_layers
                * args.batch
                * cfg.num_key_value_heads
                * head_dim
                * (P + args.new_tokens / 2)
                * torch.finfo(dtype).bits
                // 8
            )
            bound_ms = (weight_bytes + kv_bytes) / (args.hbm_gbps * 1e9) * 1e3
            step_ms = t_ours / args.new_tokens * 1e3
            row.update(
                ours_ms_per_step=round(step_ms, 3),
                hf_ms_per_step=round(t_hf / args.new_tokens * 1e3, 3),
                bound_ms_per_step=round(bound_ms, 3),
                fraction_of_bound=round(bound_ms / step_ms, 3),
                peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
            )
        print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- step


def bench_step(argv):
    """ms per decode step of the compiled static step (decode.Decoder) at a short cache and at the
    trainer's (max_new_tokens + 256 = 1,756, rounded up to 1,792 slots), and of the eager loop:
    the compiled step should cost the same at both, since it writes one slot per layer in place and
    reads only the filled part of the cache (decode.spans)."""
    import decode
    import models
    import sample

    p = argparse.ArgumentParser(prog="python -m tools.bench step", description=bench_step.__doc__)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default: 256)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default: 1024)")
    p.add_argument("--batch", type=int, default=16, help="sequences (default: 16)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument(
        "--new-tokens", type=int, default=96, help="tokens generated per sequence (default: 96)"
    )
    p.add_argument(
        "--caches", default="256,1792", help="cache lengths in slots (default: 256,1792)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs, median (default: 3)")
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads, as on CI (default: 2)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = models.tiny_llama(
        args.vocab,
        seed=0,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
    ).to(device)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g).tolist()
    N = args.new_tokens
    kw = dict(max_new_tokens=N, temperature=0)
    engines = {"eager": None}
    for L in map(int, args.caches.split(",")):
        engines[f"compiled_{L}"] = decode.Decoder(model, compile=True, max_len=L)
    ms = {}
    for name, decoder in engines.items():

        def run(decoder=decoder):
            return sample.generate(model, prompts, decoder=decoder, **kw)

        t0 = time.time()
        first = run()  # compiles (and allocates the decoder's state)
        compile_s = time.time() - t0
        (t,) = timed([run], device, args.repeats)
        ms[name] = 1000 * t / N
        slots = None
        tokens_equal_eager = None
        if decoder is not None:
            slots = max(s.cache.length for s in decoder.states.values())
            eager = sample.generate(model, prompts, **kw)
            tokens_equal_eager = bool(torch.equal(first.tokens, eager.tokens))
        row = dict(
            name=f"step/{name}",
            cache_slots=slots,
            batch=args.batch,
            prompt_len=args.prompt_len,
            new_tokens=N,
            ms_per_step=round(ms[name], 2),
            first_call_s=round(compile_s, 1),
            tokens_equal_eager=tokens_equal_eager,
        )
        print(json.dumps(row), flush=True)
    names = [n for n in ms if n != "eager"]
    print(
        json.dumps(
            dict(
                name="step/ratios",
                **{f"{b}_over_{a}": round(ms[b] / ms[a], 2) for a, b in itertools.pairwise(names)},
                **{f"eager_over_{n}": round(ms["eager"] / ms[n], 2) for n in names},
                note="ms-per-step ratios: 1 means a longer cache costs nothing; "
                "eager_over_x > 1 means the compiled step is faster",
            )
        ),
        flush=True,
    )
