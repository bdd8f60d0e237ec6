"""`python -m tools.bench gpu`: the GPU figures in one command, JSON lines, each part on its own:
gpu/decode (ours eager and compiled, HF generate and HF's compiled static cache at Llasa-1B shapes,
against the HBM-bandwidth bound), gpu/grpo_step (one grpo.Trainer step on a random 1B-shaped
policy, seconds per phase and peak memory), gpu/reward (Whisper large-v3 shapes, WhisperScorer vs
the seed's way). `--smoke` runs it all at tiny shapes on a CPU. The models, trainer and clips come
from tools.gpu_builders.
"""

import argparse
import json
import sys
import time

import torch

from tools.bench_common import LLAMA_1B, print_row, timed
from tools.gpu_builders import (
    LLASA_SPEECH_IDS,
    TINY,
    grpo_step,
    hbm_tb_s,
    random_llama,
    sample_clips,
    whisper_model,
)

# The decode engines timed, and the tokens/s ratios reported between them: (faster?, than).
ENGINES = ("ours_eager", "ours_compiled", "hf_generate", "hf_static_compiled")
RATIOS = (
    ("ours_compiled", "ours_eager"),
    ("ours_compiled", "hf_static_compiled"),
    ("ours_compiled", "hf_generate"),
    ("ours_eager", "hf_generate"),
)


def _gpu_decode(args, device, smoke: bool) -> None:
    """Decode tokens/s of ours (eager dynamic loop, compiled static step) and Hugging Face generate
    (dynamic cache, static cache compiled), same model, prompts, knobs and new-token count: one
    gpu/decode line per engine, then gpu/decode_ratios."""
    import decode
    import sample
    from llama import left_padded

    t_start = time.time()
    if smoke:
        shape = TINY
        allowed = list(range(256, 512))
    else:
        shape = dict(LLAMA_1B)
        allowed = LLASA_SPEECH_IDS
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_llama(shape, device, dtype)
    B = args.batch
    N = args.new_tokens
    g = torch.Generator().manual_seed(0)
    shortest = max(1, args.prompt_len // 2)
    lengths = torch.randint(shortest, args.prompt_len + 1, (B,), generator=g).tolist()
    text_ids = 256 if smoke else 128000
    prompts = [torch.randint(0, text_ids, (n,), generator=g).tolist() for n in lengths]
    # HF's batched input: left-padded ids [B, P] and their attention mask [B, P]
    ids, lens = left_padded(prompts, device)
    P = ids.shape[1]
    mask = (torch.arange(P, device=device) >= P - lens[:, None]).long()
    knobs = dict(temperature=0.8, top_p=0.9)  # the trainer's sampling (the seed's recipe)
    # The trainer's cache (1,792 slots at the llasa-1b preset's 1500 new tokens), of which each
    # step reads the smallest span (decode.spans) that holds its slot; smoke: trace only, no
    # kernels to build.
    decoder = decode.Decoder(
        model,
        compile=True,
        max_len=args.max_len,
        compile_options={"backend": "eager"} if smoke else None,
    )

    def ours(decoder=None):
        r = sample.generate(
            model,
            prompts,
            max_new_tokens=N,
            allowed_ids=allowed,
            decoder=decoder,
            generator=torch.Generator(device).manual_seed(1),
            **knobs,
        )
        assert r.tokens.shape == (B, N), r.tokens.shape
        return r

    def hf(static: bool):
        extra = dict(cache_implementation="static") if static else {}
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=True,
            top_k=0,
            pad_token_id=0,
            **knobs,
            **extra,
        )
        assert out.shape == (B, P + N), out.shape
        return out

    engines = {
        "ours_eager": (ours, len(allowed)),
        "ours_compiled": (lambda: ours(decoder), len(allowed)),
        "hf_generate": (lambda: hf(False), model.config.vocab_size),
        "hf_static_compiled": (lambda: hf(True), model.config.vocab_size),
    }
    shapes = dict(batch=B, prompt_len=P, new_tokens=N)
    wanted = args.engines.split(",")
    tok_s = {}
    for name, (fn, head_rows) in engines.items():
        if name not in wanted:
            continue
        t0 = time.time()
        try:
            row = _time_engine(name, fn, model, head_rows, shapes, dtype, device, args.repeats)
            print_row("gpu/decode", t0, **row)
            tok_s[name] = row["tok_s"]
        except Exception as e:  # one engine failing must not lose the others' figures
            print_row("gpu/decode", t0, engine=name, error=f"{type(e).__name__}: {e}"[:2000])
    measured = {name: v for name, v in tok_s.items() if v}
    ratios = {
        f"{a}_over_{b}": round(measured[a] / measured[b], 3)
        for a, b in RATIOS
        if a in measured and b in measured
    }
    print_row(
        "gpu/decode_ratios",
        t_start,
        **ratios,
        note="tokens/s ratios, > 1: the first is faster; ours computes "
        "only the speech head's rows, HF the whole vocabulary's",
    )


def _time_engine(name, fn, model, head_rows, shapes, dtype, device, repeats) -> dict:
    """One decode engine's gpu/decode figures: a warm-up call, then `repeats` timed calls (median);
    tokens/s, ms per step and the bytes a step reads over its time, against the HBM bound on a
    known card; graphs and CUDA-graph skips for the compiled engines."""
    from torch._dynamo.utils import counters

    cfg = model.config
    B = shapes["batch"]
    P = shapes["prompt_len"]
    N = shapes["new_tokens"]
    # Per decode step the GPU must at least read the weights it uses once (all decoder layers,
    # the head rows it multiplies, one embedding row per sequence) and the KV cache so far
    # (average context P + N/2): over HBM bandwidth, that is the floor on a step's time.
    layer_bytes = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if ".layers." in n or n.endswith("model.norm.weight")
    )
    elt = torch.finfo(dtype).bits // 8
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads
    kv_bytes = 2 * cfg.num_hidden_layers * B * kv_heads * head_dim * (P + N / 2) * elt
    if device.type == "cuda":
        card, tb_s = hbm_tb_s(device)
    else:
        card = "cpu"
        tb_s = None
    graphs_before = counters["stats"]["unique_graphs"]
    skips_before = counters["inductor"]["cudagraph_skips"]
    with torch.inference_mode():
        fn()  # warm-up: compiles (the compiled engines), records CUDA graphs, allocator
        compiled = counters["stats"]["unique_graphs"] - graphs_before
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_run = timed([fn], device, repeats)[0]
    # the whole call over N steps: the prefill included (slightly pessimistic)
    step_ms = t_run / N * 1e3
    bytes_step = layer_bytes + head_rows * cfg.hidden_size * elt + kv_bytes
    row = dict(
        engine=name,
        card=card,
        dtype=str(dtype).removeprefix("torch."),
        **shapes,
        head_rows=head_rows,
        tok_s=round(B * N / t_run, 1),
        ms_per_step=round(step_ms, 3),
        achieved_gb_s=round(bytes_step / (step_ms / 1e3) / 1e9, 1),
    )
    if tb_s:
        bound_ms = bytes_step / (tb_s * 1e12) * 1e3
        row.update(
            hbm_tb_s=tb_s,
            bound_ms_per_step=round(bound_ms, 3),
            fraction_of_bound=round(bound_ms / step_ms, 3),
        )
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    if name == "hf_static_compiled":  # transformers compiles the forward itself for a static cache
        row["hf_compile"] = "generate's automatic torch.compile (generation_config.compile_config)"
    if name.endswith("compiled"):
        # Graphs built in the warm-up and after it (0: no recompile per call), and the times
        # inductor declined CUDA graphs (0: the step ran as one graph replay).
        graphs_after = counters["stats"]["unique_graphs"]
        row.update(
            graphs_compiled=compiled,
            recompiled_in_timed_runs=graphs_after - graphs_before - compiled,
            cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips_before,
        )
    return row


def _free(device):
    """Release a finished part's compiled graphs, their CUDA-graph pools and cached memory."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


def _gpu_grpo_step(args, device, smoke: bool) -> None:
    """One GRPO step of grpo.Trainer on a random 1B-shaped policy: seconds per phase and peak
    memory (gpu/grpo_step)."""
    t0 = time.time()
    row, _, _ = grpo_step(
        device, smoke, args.grpo_prompts, args.grpo_group, args.new_tokens, args.compile
    )
    print_row(
        "gpu/grpo_step",
        t0,
        **row,
        reward_note="fake scorer (no Whisper): see gpu/reward",
        codec_note="XCodec2 decoder, random weights",
    )


def _gpu_reward(args, device, smoke: bool) -> None:
    """Whisper large-v3 shapes (random weights, 128 mels): WhisperScorer vs the seed's per-clip
    way, clips per second (gpu/reward)."""
    import numpy as np
    import torch.nn.functional as F
    import whisper
    from whisper.tokenizer import get_tokenizer

    import scorer as scoring
    from reward import char_error_rate, tts_reward

    t0 = time.time()
    model, name = whisper_model(device, smoke)
    audios, texts = sample_clips(args.clips, smoke)
    scorer = scoring.WhisperScorer(model, device, "en", batch_size=args.whisper_batch)
    model = scorer.model
    dtype = torch.float16 if scorer.fp16 else torch.float32
    tokenizer = get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language="en"
    )

    n_clips = len(audios)

    def ours(n=n_clips):
        return scorer.score(audios[:n], texts[:n])

    # a CPU smoke run need not decode 224 tokens per clip
    smoke_cap = dict(sample_len=8) if smoke else {}

    def seed_way(n=n_clips):
        """Per clip: an NLL forward with its own encoder pass, then transcribe."""
        rewards = []
        for audio, text in zip(audios[:n], texts[:n]):
            mel = whisper.log_mel_spectrogram(
                whisper.pad_or_trim(audio), model.dims.n_mels, device=device
            )
            ids = [tokenizer.sot] + tokenizer.encode(" " + text) + [tokenizer.eot]
            tokens = torch.tensor(ids, device=device)
            logits = model.decoder(tokens[None, :-1], model.encoder(mel[None].to(dtype)))[0]
            nll = F.cross_entropy(logits.float(), tokens[1:]).item()
            # without_timestamps: random weights emit stray timestamps that can make transcribe
            # re-seek without end; the transcript is still capped at 224 tokens per window.
            transcript = model.transcribe(
                audio,
                language="en",
                temperature=0.0,
                fp16=scorer.fp16,
                without_timestamps=True,
                condition_on_previous_text=False,
                **smoke_cap,
            )["text"]
            rewards.append(tts_reward(char_error_rate(text, transcript), nll))
        return rewards

    with torch.inference_mode():
        if not smoke:  # warm-up
            ours(1)
            seed_way(1)
        t_ours, t_seed = timed([ours, seed_way], device, 1)
    out = ours()
    print_row(
        "gpu/reward",
        t0,
        model=name,
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        clips=len(audios),
        batch_size=args.whisper_batch,
        ours_clips_per_s=round(len(audios) / t_ours, 3),
        seed_clips_per_s=round(len(audios) / t_seed, 3),
        ratio=round(t_seed / t_ours, 3),
        mean_transcript_chars=round(float(np.mean([len(s.transcript) for s in out])), 1),
        note="random weights: transcripts run to their caps (ours: each target's bound; the "
        "seed's: 224 tokens), so the ratio overstates what real speech gives",
    )


PARTS = {"decode": _gpu_decode, "grpo": _gpu_grpo_step, "reward": _gpu_reward}
# flag -> (default on a GPU, default in a smoke run)
SIZES = {
    "batch": (64, 4),
    "new_tokens": (512, 6),
    "prompt_len": (96, 12),
    "grpo_prompts": (4, 2),
    "grpo_group": (16, 2),
    "clips": (16, 2),
}


def parse_args(argv) -> argparse.Namespace:
    """`python -m tools.bench gpu`'s flags, every size filled in (GPU or smoke defaults); a bad
    flag exits with argparse's usage error."""
    p = argparse.ArgumentParser(prog="python -m tools.bench gpu", description=bench_gpu.__doc__)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU (or --device), a few steps, compiling with the 'eager' "
        "backend: checks that every part runs; its figures mean nothing",
    )
    p.add_argument(
        "--parts",
        default="decode,grpo,reward",
        help="comma-separated parts to run (default: all three)",
    )
    p.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="decode engines to time (default: all four)",
    )
    p.add_argument("--batch", type=int, default=None, help="decode batch (default: 64; smoke: 4)")
    p.add_argument(
        "--new-tokens", type=int, default=None, help="tokens per sequence (default: 512; smoke: 6)"
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        help="longest prompt; prompts vary from half this to this (default: 96; smoke: 12)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="the compiled step's KV-cache slots, as the trainer builds it: --max-new-tokens + 256 "
        "(default: 1500 + 256; smoke: new tokens + 256)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed decode runs after the warm-up, median (default: 1)",
    )
    p.add_argument(
        "--grpo-prompts",
        type=int,
        default=None,
        help="prompts in the GRPO step (default: 4; smoke: 2)",
    )
    p.add_argument(
        "--grpo-group", type=int, default=None, help="samples per prompt (default: 16; smoke: 2)"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the GRPO step's rollouts with the compiled decode step (default: on)",
    )
    p.add_argument("--clips", type=int, default=None, help="clips scored (default: 16; smoke: 2)")
    p.add_argument(
        "--whisper-batch", type=int, default=16, help="WhisperScorer's batch size (default: 16)"
    )
    p.add_argument("--device", default=None, help="default: cuda (smoke: cpu)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        p.error(f"unknown --parts {unknown}: expected some of {sorted(PARTS)}")
    for name, (full, tiny) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.smoke else full)
    if not args.max_len and args.smoke:
        args.max_len = args.new_tokens + 256
    elif not args.max_len:
        args.max_len = 1500 + 256
    return args


def bench_gpu(argv):
    """One command for the GPU figures, each part on its own (one failing prints an error line and
    the rest still run): decode tokens/s at Llasa-1B shapes (ours eager and compiled, HF generate,
    HF with its compiled static cache) against the HBM bound; one GRPO step's phase split and peak
    memory on a 1B-shaped policy; Whisper large-v3-shaped scoring, WhisperScorer vs the seed's way.
    Needs openai-whisper, jiwer and soundfile (../shared/gpu-wheels.sh). Exits with a message when
    no CUDA device is visible (without --smoke) or when a part failed."""
    args = parse_args(argv)
    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "tools.bench gpu: no CUDA device is visible (torch.cuda.is_available() is False), so "
            "there is nothing to measure. Run it on a machine with a GPU, or "
            "`python -m tools.bench gpu --smoke` to check the script on a CPU."
        )
    if smoke:  # tiny shapes: more threads only contend
        torch.set_num_threads(1)
    flags = {k: v for k, v in vars(args).items() if k not in ("smoke", "device")}
    setup = dict(
        name="gpu/setup",
        device=str(device),
        smoke=smoke,
        torch=torch.__version__,
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **flags,
    )
    print(json.dumps(setup), flush=True)
    failed = 0
    for part in args.parts.split(","):
        t0 = time.time()
        try:
            PARTS[part](args, device, smoke)
        except Exception as e:  # print and go on: one part's failure must not lose the others
            import traceback

            traceback.print_exc(file=sys.stderr)
            print_row(f"gpu/{part}", t0, error=f"{type(e).__name__}: {e}"[:2000])
            failed += 1
        finally:  # the part's models are gone with its frame: release their memory for the next
            _free(device)
    if failed:
        raise SystemExit(f"tools.bench gpu: {failed} part(s) failed; see the error lines above")
