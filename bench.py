"""Speed figures, each measured in one run against a reference: `python bench.py SECTION [flags]`.

Every comparison prints one JSON line with `name`, the measured numbers and `ratio`
(ours / reference speed, > 1 means ours is faster). Sections:
  sample   tokens/s of sample.generate vs Hugging Face `generate` on the same model, batch and
           number of new tokens; on CUDA also ms per step against the memory-bandwidth bound.
  codec    seconds per second of audio of codec.XCodec2Decoder vs the xcodec2 package's decode_code
           (same random weights, full model shapes), if that package is importable; else ours only.
  reward   clips/s of whisper_worker.WhisperScorer vs the seed's way (per clip: an NLL forward with its
           own encoder pass, then model.transcribe), same Whisper checkpoint and clips; and against the
           encoder alone (one pass per clip), the floor of any Whisper scorer.
  gpu      one command for the GPU figures (one H100, under 8 minutes), JSON lines, each part on its own:
           gpu/decode: tokens/s and ms/step at Llasa-1B shapes (bf16, batch 64, 512 new tokens) of ours
           eager, ours compiled (decode.Decoder, CUDA graphs), HF generate and HF generate with its
           compiled static cache, against the HBM-bandwidth bound; gpu/grpo_step: one grpo.Trainer step
           on a random 1B-shaped policy, seconds per phase and peak memory; gpu/reward: Whisper
           large-v3 shapes, WhisperScorer vs the seed's way. `--smoke` runs it all at tiny shapes on a CPU.
           On the GPU machine it needs openai-whisper, jiwer and soundfile (../shared/gpu-wheels.sh).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fns, device: torch.device, repeats: int) -> list[float]:
    """Median wall seconds of each function in `fns`, called in turn `repeats` times (after the
    caller's warm-up). Interleaving shares any background load fairly between them."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


# ----------------------------------------------------------------------------- sample

LLAMA_1B = dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                vocab=193800, tie_word_embeddings=True, max_positions=131072,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))


def bench_sample(argv):
    """sample.generate vs HF model.generate: tokens/s, same model, prompts and new-token count."""
    import sample

    p = argparse.ArgumentParser(prog="bench.py sample", description=bench_sample.__doc__)
    p.add_argument("--preset", choices=["small", "llama-1b"], default="small",
                   help="model shapes: 'small' uses the --layers/--hidden/... flags; 'llama-1b' is Llama-3.2-1B "
                        "with LLASA's vocab (hidden 2048, 16 layers, 32/8 heads, vocab 193800, tied) (default: small)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default: 256)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default: 4)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default: 1024)")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch (default: 16)")
    p.add_argument("--prompt-len", type=int, default=64,
                   help="longest prompt in tokens; prompts vary from half this to this (default: 64)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence (default: 256)")
    p.add_argument("--modes", default="greedy,sample",
                   help="comma-separated: greedy (temperature 0) and/or sample (temperature 0.8, top-p 0.9) "
                        "(default: greedy,sample)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, median reported (default: 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, as on CI (default: 2)")
    p.add_argument("--hbm-gbps", type=float, default=3350.0,
                   help="GPU memory bandwidth in GB/s for the bound (default: 3350, H100 SXM)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.preset == "llama-1b":
        shape = dict(LLAMA_1B)
    else:
        shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, intermediate_size=4 * args.hidden, vocab=args.vocab)
    vocab = shape.pop("vocab")
    model = sample.tiny_llama(vocab, seed=0, **shape).to(device=device, dtype=dtype)

    g = torch.Generator().manual_seed(0)
    lo = max(1, args.prompt_len // 2)
    prompts = [torch.randint(0, vocab, (int(torch.randint(lo, args.prompt_len + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(args.batch)]
    P = max(len(x) for x in prompts)
    # HF's input: left-padded ids and attention mask, the layout its own batched generate expects.
    ids = torch.zeros(args.batch, P, dtype=torch.long)
    mask = torch.zeros(args.batch, P, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, P - len(x):] = torch.tensor(x)
        mask[i, P - len(x):] = 1
    ids, mask = ids.to(device), mask.to(device)

    modes = args.modes.split(",")
    bad = [m for m in modes if m not in ("greedy", "sample")]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad} in --modes {args.modes!r}: expected greedy and/or sample")
    for mode in modes:
        knobs = dict(temperature=0.0) if mode == "greedy" else dict(temperature=0.8, top_p=0.9)
        # top_k=0: HF's generation config otherwise applies top-k 50, which ours would not.
        hf_knobs = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0)

        def ours(n=args.new_tokens):
            r = sample.generate(model, prompts, max_new_tokens=n, **knobs)
            assert r.tokens.shape[1] == n
            return r

        def hf(n=args.new_tokens):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=0, **hf_knobs)
            assert out.shape[1] == P + n
            return out

        with torch.no_grad():
            ours(8), hf(8)  # warm-up: allocator, kernels, HF's generation-config set-up
            t_ours, t_hf = _timed([ours, hf], device, args.repeats)
        n_tok = args.batch * args.new_tokens
        row = dict(name=f"sample/{mode}", preset=args.preset, device=str(device), dtype=str(dtype).removeprefix("torch."),
                   batch=args.batch, prompt_len=P, new_tokens=args.new_tokens,
                   ours_tok_s=round(n_tok / t_ours, 1), hf_tok_s=round(n_tok / t_hf, 1),
                   ratio=round(t_hf / t_ours, 3))
        if device.type == "cuda":
            # Per decode step the GPU must at least read every weight once and the KV cache so far
            # (average context P + N/2); that over HBM bandwidth is the floor on step time.
            # Measured ms/step is the whole call over N steps, so it includes the prefill (slightly pessimistic).
            cfg = model.config
            weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            head_dim = cfg.hidden_size // cfg.num_attention_heads
            kv_bytes = (2 * cfg.num_hidden_layers * args.batch * cfg.num_key_value_heads * head_dim
                        * (P + args.new_tokens / 2) * torch.finfo(dtype).bits // 8)
            bound_ms = (weight_bytes + kv_bytes) / (args.hbm_gbps * 1e9) * 1e3
            step_ms = t_ours / args.new_tokens * 1e3
            row.update(ours_ms_per_step=round(step_ms, 3), hf_ms_per_step=round(t_hf / args.new_tokens * 1e3, 3),
                       bound_ms_per_step=round(bound_ms, 3), fraction_of_bound=round(bound_ms / step_ms, 3),
                       peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 2))
        print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- codec

def _package_decoder(config, seed: int = 0):
    """The xcodec2 package's `XCodec2Model.decode_code`, run on its own generator + fc_post_a with random
    weights (decode_code uses nothing else; building XCodec2Model itself would download w2v-bert-2.0).
    Returns (decode_code, modules), the modules' state-dict keys being the checkpoint's,
    or (None, reason) when the package cannot be imported."""
    try:
        from xcodec2.modeling_xcodec2 import XCodec2Model
        from xcodec2.vq.codec_decoder_vocos import CodecDecoderVocos
    except Exception as e:  # ImportError, or a pinned dependency failing on this torch
        return None, f"none: xcodec2 package not importable ({type(e).__name__}: {e})"
    torch.manual_seed(seed)
    c = config
    modules = torch.nn.ModuleDict(dict(
        generator=CodecDecoderVocos(hidden_dim=c.hidden_dim, depth=c.depth, heads=c.n_heads,
                                    pos_meb_dim=c.hidden_dim // c.n_heads, hop_length=c.hop_length, vq_dim=c.vq_dim),
        fc_post_a=torch.nn.Linear(c.vq_dim, c.hidden_dim))).eval()
    return (lambda codes: XCodec2Model.decode_code(modules, codes)), modules


def bench_codec(argv):
    """XCodec2Decoder vs the xcodec2 package's decode_code: seconds per second of audio, same random weights."""
    import codec

    p = argparse.ArgumentParser(prog="bench.py codec", description=bench_codec.__doc__)
    p.add_argument("--preset", choices=["full", "small"], default="full",
                   help="'full': the published model's shapes (187M decoder parameters); 'small': hidden 64, "
                        "2 blocks, for a quick look (default: full)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio per clip, 50 codes per second (default: 10)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, median reported (default: 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, as on CI (default: 2)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = codec.XCodec2Config() if args.preset == "full" else codec.XCodec2Config(hidden_dim=64, depth=2, n_heads=4)
    ref_decode, ref = _package_decoder(config)
    ours = codec.XCodec2Decoder(config)
    if ref_decode is not None:  # the package's weights, read through the checkpoint's key names
        state = ref.state_dict()
        ours.load_state_dict({name: state[codec.checkpoint_key(name)] for name in ours.state_dict()})
        ref.to(device)
    ours.eval().to(device)
    n_params = sum(t.numel() for t in ours.parameters())

    T = round(args.seconds * 50)
    for B in [int(b) for b in args.batches.split(",")]:
        codes = torch.randint(0, codec.CODEBOOK_SIZE, (B, 1, T), generator=torch.Generator().manual_seed(B)).to(device)
        lengths = torch.full((B,), T, device=device)
        # ours as the codec runs equal-length clips (no mask), ours with the padding mask on, the package
        fns = [lambda: ours(codes), lambda: ours(codes, lengths)] + ([lambda: ref_decode(codes)] if ref_decode else [])
        with torch.no_grad():
            outs = [fn() for fn in fns]  # warm-up, and the outputs to compare
            times = _timed(fns, device, args.repeats)
        audio_s = B * T / 50
        # Matmul work: 2 flops per weight per frame (the convs and linears), plus attention's
        # 4 T^2 C per transformer block and clip.
        flops = 2 * n_params * B * T + 4 * B * T * T * config.hidden_dim * config.depth
        row = dict(name="codec", preset=args.preset, device=str(device), threads=args.threads, batch=B,
                   seconds_per_clip=args.seconds, decoder_params=n_params,
                   ours_s_per_audio_s=round(times[0] / audio_s, 4),
                   ours_masked_s_per_audio_s=round(times[1] / audio_s, 4),
                   ours_gflop_s=round(flops / times[0] / 1e9, 1))
        if ref_decode:
            row.update(reference="xcodec2 XCodec2Model.decode_code", ref_s_per_audio_s=round(times[2] / audio_s, 4),
                       ratio=round(times[2] / times[0], 3), max_abs_diff=float((outs[0] - outs[2]).abs().max()))
        else:
            row.update(reference=ref, ratio=None)
        print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- reward

def bench_reward(argv):
    """WhisperScorer vs the seed's way of scoring: clips per second, same Whisper model and clips."""
    import os

    import torch.nn.functional as F
    import whisper
    from whisper.tokenizer import get_tokenizer

    import whisper_worker
    from reward import char_error_rate, tts_reward

    assets = os.environ.get("TEST_ASSETS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "assets"))
    p = argparse.ArgumentParser(prog="bench.py reward", description=bench_reward.__doc__)
    p.add_argument("--whisper", default=os.path.join(assets, "whisper-tiny.en.pt"),
                   help="Whisper name or checkpoint (default: whisper-tiny.en.pt in TEST_ASSETS)")
    p.add_argument("--clips", type=int, default=8, help="clips per run, cycling through the clean and noisy clips "
                                                        "of TEST_ASSETS/speech (default: 8)")
    p.add_argument("--language", default="en", help="language of the clips (default: en)")
    p.add_argument("--batch-size", type=int, default=16, help="WhisperScorer's batch size (default: 16)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement, median reported (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, as on CI (default: 2)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with open(os.path.join(assets, "speech", "clips.jsonl")) as f:
        # All-zero silence is refused by WhisperScorer without any model work: leaving it in would flatter ours.
        rows = [r for r in map(json.loads, f) if r["kind"] != "silence"]
    rows = [rows[i % len(rows)] for i in range(args.clips)]
    audios = [whisper_worker.read_wav(os.path.join(assets, "speech", r["wav"])) for r in rows]
    texts = [r["text"] for r in rows]
    scorer = whisper_worker.WhisperScorer(args.whisper, device, args.language, batch_size=args.batch_size)
    model, dtype = scorer.model, torch.float16 if scorer.fp16 else torch.float32
    tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language=args.language)

    def ours(n=len(audios)):
        return scorer.score(audios[:n], texts[:n])

    def seed_way(n=len(audios)):
        rewards = []
        for audio, text in zip(audios[:n], texts[:n]):
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), model.dims.n_mels, device=device)
            tokens = torch.tensor([tokenizer.sot] + tokenizer.encode(" " + text) + [tokenizer.eot], device=device)
            logits = model.decoder(tokens[None, :-1], model.encoder(mel[None].to(dtype)))[0]  # after a bare <|sot|>
            nll = F.cross_entropy(logits, tokens[1:]).item()
            transcript = model.transcribe(audio, language=args.language, temperature=0.0, fp16=scorer.fp16)["text"]
            rewards.append(tts_reward(char_error_rate(text, transcript), nll))
        return rewards

    def encoder_only():  # the floor of any scorer: Whisper's encoder on one 30 s window per clip
        for start in range(0, len(audios), args.batch_size):
            model.encoder(torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(a), model.dims.n_mels, device=device)
                                       for a in audios[start:start + args.batch_size]]).to(dtype))

    with torch.inference_mode():
        ours(1), seed_way(1)  # warm-up: tokenizer, mel filters, allocator
        t_ours, t_seed, t_encoder = _timed([ours, seed_way, encoder_only], device, args.repeats)
    print(json.dumps(dict(name="reward", model=os.path.basename(args.whisper), device=str(device), threads=args.threads,
                          clips=len(audios), batch_size=args.batch_size,
                          ours_clips_per_s=round(len(audios) / t_ours, 3), seed_clips_per_s=round(len(audios) / t_seed, 3),
                          ratio=round(t_seed / t_ours, 3), encoder_only_clips_per_s=round(len(audios) / t_encoder, 3),
                          fraction_of_encoder_bound=round(t_encoder / t_ours, 3))), flush=True)


# ----------------------------------------------------------------------------- gpu

# Llasa-1B's speech head: the 65,536 speech tokens <|s_k|> (ids 128264..193799 in LLASA's
# vocabulary) + <|SPEECH_GENERATION_END|> (id 128261): the rows the policy computes.
LLASA_SPEECH_IDS = list(range(128264, 193800)) + [128261]
WHISPER_LARGE_V3 = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                        n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=32)
HBM_TB_S = {"H100": 3.35, "H200": 4.8}  # SXM parts; others report achieved GB/s only


def _hbm_tb_s(device: torch.device):
    """(card name, HBM bandwidth in TB/s or None when unknown) of a CUDA device."""
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return name, HBM_TB_S["H200"]
    if "H100" in name and "PCIe" not in name and "NVL" not in name:
        return name, HBM_TB_S["H100"]
    return name, None


def _random_llama(shape: dict, device, dtype, seed: int = 0):
    """A random-weight LlamaForCausalLM built directly on `device` in `dtype` (no CPU init of 1B weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(shape)
    vocab = shape.pop("vocab")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                      num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                      num_key_value_heads=shape["num_kv_heads"],
                      max_position_embeddings=shape.get("max_positions", 4096),
                      rope_theta=500000.0, tie_word_embeddings=shape.get("tie_word_embeddings", False),
                      rope_scaling=shape.get("rope_scaling"))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model.eval()


def _row(name: str, t0: float, **fields) -> None:
    print(json.dumps({"name": name, **fields, "seconds": round(time.time() - t0, 1)}), flush=True)


def _gpu_decode(args, device, smoke: bool) -> None:
    """Decode tokens/s of ours (eager dynamic loop, compiled static step) and Hugging Face generate
    (dynamic cache, static cache compiled), same model, prompts, knobs and new-token count."""
    import decode
    import sample
    from torch._dynamo.utils import counters

    t_start = time.time()
    if smoke:
        shape = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, vocab=512,
                     tie_word_embeddings=True, max_positions=4096)
        allowed = list(range(256, 512))
    else:
        shape, allowed = dict(LLAMA_1B), LLASA_SPEECH_IDS
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _random_llama(shape, device, dtype)
    cfg = model.config
    B, N = args.batch, args.new_tokens
    g = torch.Generator().manual_seed(0)
    lo = max(1, args.prompt_len // 2)
    text_ids = 256 if smoke else 128000  # prompts of text-token ids
    lengths = torch.randint(lo, args.prompt_len + 1, (B,), generator=g).tolist()
    prompts = [torch.randint(0, text_ids, (n,), generator=g).tolist() for n in lengths]
    P = max(len(x) for x in prompts)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, P - len(x):] = torch.tensor(x)
        mask[i, P - len(x):] = 1
    ids, mask = ids.to(device), mask.to(device)
    knobs = dict(temperature=0.8, top_p=0.9)  # the trainer's sampling (the seed's recipe)
    compile_options = {"backend": "eager"} if smoke else None  # smoke: trace only, no kernels to build
    decoder = decode.Decoder(model, compile=True, compile_options=compile_options)

    def ours_eager():
        r = sample.generate(model, prompts, max_new_tokens=N, allowed_ids=allowed,
                            generator=torch.Generator(device).manual_seed(1), **knobs)
        assert r.tokens.shape == (B, N), r.tokens.shape
        return r

    def ours_compiled():
        r = sample.generate(model, prompts, max_new_tokens=N, allowed_ids=allowed, decoder=decoder,
                            generator=torch.Generator(device).manual_seed(1), **knobs)
        assert r.tokens.shape == (B, N), r.tokens.shape
        return r

    def hf(static: bool):
        extra = dict(cache_implementation="static") if static else {}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=True,
                             top_k=0, pad_token_id=0, **knobs, **extra)
        assert out.shape == (B, P + N), out.shape
        return out

    # Per decode step the GPU must at least read the weights it uses once (all decoder layers, the
    # head rows it multiplies, one embedding row per sequence) and the KV cache so far (average
    # context P + N/2): over HBM bandwidth, that is the floor on a step's time.
    layer_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if ".layers." in n or n.endswith("model.norm.weight"))
    elt = torch.finfo(dtype).bits // 8
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * head_dim * (P + N / 2) * elt
    card, tb_s = _hbm_tb_s(device) if device.type == "cuda" else ("cpu", None)
    engines = [("ours_eager", ours_eager, len(allowed)), ("ours_compiled", ours_compiled, len(allowed)),
               ("hf_generate", lambda: hf(False), cfg.vocab_size),
               ("hf_static_compiled", lambda: hf(True), cfg.vocab_size)]
    wanted, tok_s = args.engines.split(","), {}
    for name, fn, head_rows in engines:
        if name not in wanted:
            continue
        t0 = time.time()
        try:
            before = dict(graphs=counters["stats"]["unique_graphs"], skips=counters["inductor"]["cudagraph_skips"])
            with torch.inference_mode():
                fn()  # warm-up: compiles (the compiled engines), records CUDA graphs, allocator
                compiled = counters["stats"]["unique_graphs"] - before["graphs"]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t_run = _timed([fn], device, args.repeats)[0]
            step_ms = t_run / N * 1e3  # the whole call over N steps: the prefill included (slightly pessimistic)
            bytes_step = layer_bytes + head_rows * cfg.hidden_size * elt + kv_bytes
            row = dict(engine=name, card=card, dtype=str(dtype).removeprefix("torch."), batch=B, prompt_len=P,
                       new_tokens=N, head_rows=head_rows, tok_s=round(B * N / t_run, 1), ms_per_step=round(step_ms, 3),
                       achieved_gb_s=round(bytes_step / (step_ms / 1e3) / 1e9, 1))
            if tb_s:
                bound_ms = bytes_step / (tb_s * 1e12) * 1e3
                row.update(hbm_tb_s=tb_s, bound_ms_per_step=round(bound_ms, 3),
                           fraction_of_bound=round(bound_ms / step_ms, 3))
            if device.type == "cuda":
                row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            if name == "hf_static_compiled":  # transformers compiles the forward itself for a static cache
                row["hf_compile"] = "generate's automatic torch.compile (generation_config.compile_config)"
            if name.endswith("compiled"):
                # Graphs built in the warm-up and after it (0: no recompile per call), and the times
                # inductor declined CUDA graphs (0: the step ran as one graph replay).
                row.update(graphs_compiled=compiled,
                           recompiled_in_timed_runs=counters["stats"]["unique_graphs"] - before["graphs"] - compiled,
                           cudagraph_skips=counters["inductor"]["cudagraph_skips"] - before["skips"])
            _row("gpu/decode", t0, **row)
            tok_s[name] = row["tok_s"]
        except Exception as e:  # one engine failing must not lose the others' figures
            _row("gpu/decode", t0, engine=name, error=f"{type(e).__name__}: {e}"[:2000])
    ts = {k: v for k, v in tok_s.items() if v}
    ratios = {f"{a}_over_{b}": round(ts[a] / ts[b], 3) for a, b in [
        ("ours_compiled", "ours_eager"), ("ours_compiled", "hf_static_compiled"), ("ours_compiled", "hf_generate"),
        ("ours_eager", "hf_generate")] if a in ts and b in ts}
    _row("gpu/decode_ratios", t_start, **ratios, note="tokens/s ratios, > 1: the first is faster; ours computes "
         "only the speech head's rows, HF the whole vocabulary's")


def _free(device):
    import gc
    torch._dynamo.reset()  # compiled graphs and their CUDA-graph memory pools
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _FakeScorer:
    """Rewards without Whisper (the reward part is measured on its own): random, so advantages are not 0."""

    def __init__(self, seed=0):
        self.rng = __import__("random").Random(seed)

    def score(self, audios, texts, languages=None):
        from reward import Score
        return [Score(reward=self.rng.random()) for _ in audios]


def _gpu_grpo_step(args, device, smoke: bool) -> None:
    """One GRPO step of grpo.Trainer on a random 1B-shaped policy: seconds per phase and peak memory."""
    import codec
    import config
    import data
    import decode
    import grpo

    t0 = time.time()
    tok = data.tiny_tokenizer(n_speech=64 if smoke else 65536)  # LLASA-style ids: <|s_k|> and the markers
    shape = (dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                  vocab=len(tok), tie_word_embeddings=True) if smoke else dict(LLAMA_1B))
    policy = _random_llama(shape, device, torch.float32)  # fp32 master weights, as the trainer loads them
    overrides = dict(model="random", codec="tone", device=str(device), prompts_per_step=args.grpo_prompts,
                     group_size=args.grpo_group, max_new_tokens=args.new_tokens, kl_coef=0.0, steps=2,
                     micro_batch=2 if not smoke else 4, out=os.path.join("runs", "bench-gpu-unused"))
    cfg = config.Config(**{**config.PRESETS["llasa-1b"], **overrides, "compile": args.compile})
    config.check_config(cfg)

    class BenchTrainer(grpo.Trainer):
        def load_model(self, name):
            return policy, tok

    examples = data.load_dataset(data.SAMPLE_DATA)
    tr = BenchTrainer(cfg, grpo.Dist(), device, _FakeScorer(), datasets=(examples, []))
    # XCodec2's decoder at its real shapes (small in smoke runs), random weights.
    xconfig = codec.XCodec2Config(hidden_dim=64, depth=2, n_heads=4) if smoke else codec.XCodec2Config()
    tr.codec = codec.XCodec2Codec(codec.XCodec2Decoder(xconfig), device)
    if smoke and tr.decoder is not None:  # trace only: no kernels to build on a CPU
        tr.decoder = decode.Decoder(policy, compile=True, compile_options={"backend": "eager"})
    if not smoke:
        tr.train_step(0)  # warm-up: compiles, CUDA graphs, allocator, AdamW state
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metrics, _ = tr.train_step(1)
    _sync(device)
    row = dict(card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               params_b=round(sum(p.numel() for p in policy.parameters()) / 1e9, 3),
               rollouts=cfg.prompts_per_step * cfg.group_size, max_new_tokens=cfg.max_new_tokens,
               compile=args.compile,
               micro_batch=cfg.micro_batch, response_len=metrics["response_len"],
               **{k: round(metrics[f"time_{k}"], 3) for k in ("rollout", "codec", "reward", "train")},
               rollout_tok_s=round(metrics["tokens_per_s"], 1),
               reward_note="fake scorer (no Whisper): see gpu/reward", codec_note="XCodec2 decoder, random weights")
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    _row("gpu/grpo_step", t0, **row)


def _gpu_reward(args, device, smoke: bool) -> None:
    """Whisper large-v3 shapes (random weights, 128 mels): WhisperScorer vs the seed's per-clip way."""
    import numpy as np
    import torch.nn.functional as F
    import whisper
    from whisper.model import ModelDimensions, Whisper
    from whisper.tokenizer import get_tokenizer

    import data
    import whisper_worker
    from reward import char_error_rate, tts_reward

    t0 = time.time()
    if smoke:
        model = whisper_worker.random_tiny_whisper().to(device)
        name = "random-tiny"
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = Whisper(ModelDimensions(**WHISPER_LARGE_V3))
            torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)  # Whisper leaves it torch.empty
        name = "large-v3 shapes, random weights"
    texts = [ex.text for ex in data.load_dataset(data.SAMPLE_DATA) if (ex.language or "en") == "en"]
    texts = [texts[i % len(texts)] for i in range(args.clips)]
    rng = np.random.default_rng(0)
    # 3-8 s clips: a voiced-like harmonic tone under noise (content is moot with random weights).
    audios = []
    for i in range(args.clips):
        n = int(16000 * rng.uniform(3, 8) * (0.25 if smoke else 1))
        t = np.arange(n) / 16000
        audios.append((0.1 * np.sin(2 * np.pi * (120 + 10 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t))
                       + 0.02 * rng.standard_normal(n)).astype(np.float32))
    scorer = whisper_worker.WhisperScorer(model, device, "en", batch_size=args.whisper_batch)
    model, dtype = scorer.model, torch.float16 if scorer.fp16 else torch.float32
    tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language="en")

    def ours(n=len(audios)):
        return scorer.score(audios[:n], texts[:n])

    smoke_cap = dict(sample_len=8) if smoke else {}  # a CPU smoke run need not decode 224 tokens per clip

    def seed_way(n=len(audios)):  # per clip: an NLL forward with its own encoder pass, then transcribe
        rewards = []
        for audio, text in zip(audios[:n], texts[:n]):
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), model.dims.n_mels, device=device)
            tokens = torch.tensor([tokenizer.sot] + tokenizer.encode(" " + text) + [tokenizer.eot], device=device)
            logits = model.decoder(tokens[None, :-1], model.encoder(mel[None].to(dtype)))[0]
            nll = F.cross_entropy(logits.float(), tokens[1:]).item()
            # without_timestamps: random weights emit stray timestamps that can make transcribe re-seek
            # without end; the transcript is still capped at Whisper's 224 tokens per window.
            transcript = model.transcribe(audio, language="en", temperature=0.0, fp16=scorer.fp16,
                                          without_timestamps=True, condition_on_previous_text=False,
                                          **smoke_cap)["text"]
            rewards.append(tts_reward(char_error_rate(text, transcript), nll))
        return rewards

    with torch.inference_mode():
        if not smoke:
            ours(1), seed_way(1)  # warm-up
        t_ours, t_seed = _timed([ours, seed_way], device, 1)
    out = ours()
    _row("gpu/reward", t0, model=name, card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         clips=len(audios), batch_size=args.whisper_batch, ours_clips_per_s=round(len(audios) / t_ours, 3),
         seed_clips_per_s=round(len(audios) / t_seed, 3), ratio=round(t_seed / t_ours, 3),
         mean_transcript_chars=round(float(np.mean([len(s.transcript) for s in out])), 1),
         note="random weights: transcripts run to their caps (ours: each target's bound; the seed's: 224 "
              "tokens), so the ratio overstates what real speech gives")


def bench_gpu(argv):
    """One command for the GPU figures, each part on its own (one failing prints an error line and
    the rest still run): decode tokens/s at Llasa-1B shapes (ours eager and compiled, HF generate,
    HF with its compiled static cache) against the HBM bound; one GRPO step's phase split and peak
    memory on a 1B-shaped policy; Whisper large-v3-shaped scoring, WhisperScorer vs the seed's way.
    About 6-8 minutes on one H100. Needs openai-whisper, jiwer and soundfile (../shared/gpu-wheels.sh)."""
    p = argparse.ArgumentParser(prog="bench.py gpu", description=bench_gpu.__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (or --device), a few steps, compiling with the 'eager' backend: checks "
                        "that every part runs; its figures mean nothing")
    p.add_argument("--parts", default="decode,grpo,reward", help="comma-separated parts to run (default: all three)")
    p.add_argument("--engines", default="ours_eager,ours_compiled,hf_generate,hf_static_compiled",
                   help="decode engines to time (default: all four)")
    p.add_argument("--batch", type=int, default=None, help="decode batch (default: 64; smoke: 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per sequence (default: 512; smoke: 6)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="longest prompt; prompts vary from half this to this (default: 96; smoke: 12)")
    p.add_argument("--repeats", type=int, default=1, help="timed decode runs after the warm-up, median (default: 1)")
    p.add_argument("--grpo-prompts", type=int, default=None, help="prompts in the GRPO step (default: 4; smoke: 2)")
    p.add_argument("--grpo-group", type=int, default=None, help="samples per prompt (default: 16; smoke: 2)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="the GRPO step's rollouts with the compiled decode step (default: on)")
    p.add_argument("--clips", type=int, default=None, help="clips scored (default: 16; smoke: 2)")
    p.add_argument("--whisper-batch", type=int, default=16, help="WhisperScorer's batch size (default: 16)")
    p.add_argument("--device", default=None, help="default: cuda (smoke: cpu)")
    args = p.parse_args(argv)
    parts = {"decode": _gpu_decode, "grpo": _gpu_grpo_step, "reward": _gpu_reward}
    unknown = sorted(set(args.parts.split(",")) - set(parts))
    if unknown:
        p.error(f"unknown --parts {unknown}: expected some of {sorted(parts)}")
    smoke = args.smoke
    for name, full, tiny in [("batch", 64, 4), ("new_tokens", 512, 6), ("prompt_len", 96, 12), ("grpo_prompts", 4, 2),
                             ("grpo_group", 16, 2), ("clips", 16, 2)]:
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py gpu: no CUDA device is visible (torch.cuda.is_available() is False), so there "
                         "is nothing to measure. Run it on a machine with a GPU, or `python bench.py gpu --smoke` "
                         "to check the script on a CPU.")
    if smoke:
        torch.set_num_threads(1)  # tiny shapes: more threads only contend
    print(json.dumps(dict(name="gpu/setup", device=str(device), smoke=smoke, torch=torch.__version__,
                          card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          **{k: v for k, v in vars(args).items() if k not in ("smoke", "device")})), flush=True)
    failed = 0
    for part in args.parts.split(","):
        t0 = time.time()
        try:
            parts[part](args, device, smoke)
        except Exception as e:  # print and go on: one part's failure must not lose the others
            import traceback
            traceback.print_exc(file=sys.stderr)
            _row(f"gpu/{part}", t0, error=f"{type(e).__name__}: {e}"[:2000])
            failed += 1
        finally:  # the part's models are gone with its frame: release their memory for the next part
            _free(device)
    if failed:
        raise SystemExit(f"bench.py gpu: {failed} part(s) failed; see the error lines above")


SECTIONS = {"sample": bench_sample, "codec": bench_codec, "reward": bench_reward, "gpu": bench_gpu}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SECTIONS:
        raise SystemExit(f"usage: python bench.py SECTION [flags], SECTION one of {sorted(SECTIONS)} "
                         f"(got {argv[0] if argv else 'nothing'!r}); `python bench.py SECTION -h` lists its flags")
    SECTIONS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
