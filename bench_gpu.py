"""`python bench.py gpu`: the GPU figures in one command (one H100/H200, under 8 minutes), JSON lines,
each part on its own: gpu/decode (ours eager and compiled, HF generate and HF's compiled static cache
at Llasa-1B shapes, against the HBM-bandwidth bound), gpu/grpo_step (one grpo.Trainer step on a random
1B-shaped policy, seconds per phase and peak memory), gpu/reward (Whisper large-v3 shapes,
WhisperScorer vs the seed's way). `--smoke` runs it all at tiny shapes on a CPU. gpu_check.py (the
acceptance run) builds its trainer, Whisper, clips and memory cases with the helpers here.
"""
import argparse
import json
import os
import sys
import time

import torch

from bench_common import LLAMA_1B, print_row, sync, timed


# ----------------------------------------------------------------------------- gpu

# Llasa-1B's speech head: the 65,536 speech tokens <|s_k|> (ids 128264..193799 in LLASA's
# vocabulary) + <|SPEECH_GENERATION_END|> (id 128261): the rows the policy computes.
LLASA_SPEECH_IDS = list(range(128264, 193800)) + [128261]
WHISPER_LARGE_V3 = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                        n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=32)
HBM_TB_S = {"H100": 3.35, "H200": 4.8}  # SXM parts; others report achieved GB/s only
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, vocab=512,
            tie_word_embeddings=True, max_positions=4096)  # the smoke runs' model (vocab: the tokenizer's in grpo)


def _hbm_tb_s(device: torch.device):
    """(card name, HBM bandwidth in TB/s or None when unknown) of a CUDA device."""
    name = torch.cuda.get_device_name(device)
    sxm = "H200" in name or ("H100" in name and "PCIe" not in name and "NVL" not in name)
    return name, (HBM_TB_S["H200" if "H200" in name else "H100"] if sxm else None)


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


def _gpu_decode(args, device, smoke: bool) -> None:
    """Decode tokens/s of ours (eager dynamic loop, compiled static step) and Hugging Face generate
    (dynamic cache, static cache compiled), same model, prompts, knobs and new-token count."""
    import decode
    import sample
    from llama import left_padded
    from torch._dynamo.utils import counters

    t_start = time.time()
    shape, allowed = (TINY, list(range(256, 512))) if smoke else (dict(LLAMA_1B), LLASA_SPEECH_IDS)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _random_llama(shape, device, dtype)
    cfg = model.config
    B, N = args.batch, args.new_tokens
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, args.prompt_len // 2), args.prompt_len + 1, (B,), generator=g).tolist()
    prompts = [torch.randint(0, 256 if smoke else 128000, (n,), generator=g).tolist() for n in lengths]  # text ids
    ids, lens = left_padded(prompts, device)  # HF's batched input: left-padded ids and their attention mask
    P = ids.shape[1]
    mask = (torch.arange(P, device=device) >= P - lens[:, None]).long()
    knobs = dict(temperature=0.8, top_p=0.9)  # the trainer's sampling (the seed's recipe)
    # The trainer's cache (1,792 slots at the llasa-1b preset's 1500 new tokens), of which each step reads
    # the smallest span (decode.spans) that holds its slot; smoke: trace only, no kernels to build.
    decoder = decode.Decoder(model, compile=True, max_len=args.max_len,
                             compile_options={"backend": "eager"} if smoke else None)

    def ours(decoder=None):
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
    engines = [("ours_eager", ours, len(allowed)), ("ours_compiled", lambda: ours(decoder), len(allowed)),
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
                t_run = timed([fn], device, args.repeats)[0]
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
            print_row("gpu/decode", t0, **row)
            tok_s[name] = row["tok_s"]
        except Exception as e:  # one engine failing must not lose the others' figures
            print_row("gpu/decode", t0, engine=name, error=f"{type(e).__name__}: {e}"[:2000])
    ts = {k: v for k, v in tok_s.items() if v}
    ratios = {f"{a}_over_{b}": round(ts[a] / ts[b], 3) for a, b in [
        ("ours_compiled", "ours_eager"), ("ours_compiled", "hf_static_compiled"), ("ours_compiled", "hf_generate"),
        ("ours_eager", "hf_generate")] if a in ts and b in ts}
    print_row("gpu/decode_ratios", t_start, **ratios, note="tokens/s ratios, > 1: the first is faster; ours computes "
         "only the speech head's rows, HF the whole vocabulary's")


def _free(device):
    import gc
    torch._dynamo.reset()  # compiled graphs and their CUDA-graph memory pools
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


class _FakeScorer:
    """Rewards without Whisper (the reward part is measured on its own): random, so advantages are not 0."""

    def __init__(self, seed=0):
        self.rng = __import__("random").Random(seed)

    def score(self, audios, texts, languages=None):
        from reward import Score
        return [Score(reward=self.rng.random()) for _ in audios]


def grpo_trainer(device, smoke: bool, prompts: int, group: int, new_tokens: int, compile: bool = True,
                 cache_tokens: int | None = None):
    """A grpo.Trainer as `--preset llasa-1b` builds it, on a random 1B-shaped policy (tiny in smoke runs) of
    fp32 master weights, XCodec2's decoder at its real shapes (random weights) and a fake scorer, its decode
    step built for `cache_tokens` new tokens (default new_tokens) + rollout.Sampler's prompt slots, its
    rollouts of `new_tokens`; smoke runs compile with the 'eager' backend."""
    import codec
    import config
    import data
    import decode
    import grpo

    tok = data.tiny_tokenizer(n_speech=64 if smoke else 65536)  # LLASA-style ids: <|s_k|> and the markers
    shape = dict(TINY, vocab=len(tok)) if smoke else dict(LLAMA_1B)
    policy = _random_llama(shape, device, torch.float32)  # fp32 master weights, as the trainer loads them
    overrides = dict(model="random", codec="tone", device=str(device), prompts_per_step=prompts, group_size=group,
                     max_new_tokens=cache_tokens or new_tokens, kl_coef=0.0, steps=2, compile=compile,
                     micro_batch=2 if not smoke else 4, out=os.path.join("runs", "bench-gpu-unused"))
    cfg = config.Config(**{**config.PRESETS["llasa-1b"], **overrides})
    config.check_config(cfg)

    class BenchTrainer(grpo.Trainer):
        def load_model(self, name):
            return policy, tok

    tr = BenchTrainer(cfg, grpo.Dist(), device, _FakeScorer(), datasets=(data.load_dataset(data.SAMPLE_DATA), []))
    # XCodec2's decoder at its real shapes (small in smoke runs), random weights.
    xconfig = codec.XCodec2Config(hidden_dim=64, depth=2, n_heads=4) if smoke else codec.XCodec2Config()
    tr.sampler.codec = codec.XCodec2Codec(codec.XCodec2Decoder(xconfig), device)
    if smoke and tr.sampler.decoder is not None:  # trace only: no kernels to build on a CPU
        tr.sampler.decoder = decode.Decoder(policy, compile=True, max_len=tr.sampler.decoder.max_len,
                                            compile_options={"backend": "eager"})
    cfg.max_new_tokens = new_tokens  # the rollouts' length (the sampler reads this cfg at each call)
    return tr, policy


def record_spans(decoder) -> list:
    """The attention span of every step `decoder` (a decode.Decoder) runs from now on: one graph per span."""
    spans, step = [], decoder.step
    decoder.step = lambda w, s, k, span: (spans.append(span), step(w, s, k, span))
    return spans


def grpo_step(device, smoke: bool, prompts: int, group: int, new_tokens: int, compile: bool = True,
              cache_tokens: int | None = None):
    """Two steps of a `grpo_trainer` (the first a warm-up: compiles, CUDA graphs, allocator, AdamW state)
    and the second's figures: seconds per phase, tokens/s, peak memory, and with the compiled step its
    spans, graphs and CUDA-graph skips over both steps and decoder_works. Returns (figures, trainer, metrics)."""
    from torch._dynamo.utils import counters
    tr, policy = grpo_trainer(device, smoke, prompts, group, new_tokens, compile, cache_tokens)
    cfg, spans = tr.cfg, record_spans(tr.sampler.decoder) if tr.sampler.decoder else []
    graphs, skips, t0 = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"], time.time()
    tr.train_step(0)
    warm = time.time() - t0
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metrics, _ = tr.train_step(1)
    sync(device)
    row = dict(card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               params_b=round(sum(p.numel() for p in policy.parameters()) / 1e9, 3),
               rollouts=cfg.prompts_per_step * cfg.group_size, max_new_tokens=cfg.max_new_tokens, compile=compile,
               micro_batch=cfg.micro_batch, response_len=metrics["response_len"],
               **{k: round(metrics[f"time_{k}"], 3) for k in ("rollout", "codec", "reward", "train")},
               rollout_tok_s=round(metrics["tokens_per_s"], 1), warmup_step_s=round(warm, 2),
               decoder_works=tr.sampler.decoder_works, spans_used=sorted(set(spans)),
               graphs=counters["stats"]["unique_graphs"] - graphs,
               cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips)
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row, tr, metrics


def _gpu_grpo_step(args, device, smoke: bool) -> None:
    """One GRPO step of grpo.Trainer on a random 1B-shaped policy: seconds per phase and peak memory."""
    t0 = time.time()
    row, _, _ = grpo_step(device, smoke, args.grpo_prompts, args.grpo_group, args.new_tokens, args.compile)
    print_row("gpu/grpo_step", t0, **row, reward_note="fake scorer (no Whisper): see gpu/reward",
              codec_note="XCodec2 decoder, random weights")


def whisper_model(device, smoke: bool):
    """(Whisper with large-v3's shapes and random weights, its name); smoke: the seeded tiny one."""
    import scorer as scoring
    from whisper.model import ModelDimensions, Whisper

    if smoke:
        return scoring.random_tiny_whisper().to(device), "random-tiny"
    torch.manual_seed(0)
    with torch.device(device):
        model = Whisper(ModelDimensions(**WHISPER_LARGE_V3))
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)  # Whisper leaves it torch.empty
    return model, "large-v3 shapes, random weights"


def sample_clips(n: int, smoke: bool, seed: int = 0):
    """(n clips of 3-8 s, 16 kHz float32 (a quarter of that in smoke runs): a voiced-like harmonic tone
    under noise, content moot with random weights; n English texts of the sample data)."""
    import numpy as np

    import data
    texts = [ex.text for ex in data.load_dataset(data.SAMPLE_DATA) if (ex.language or "en") == "en"]
    rng, audios = np.random.default_rng(seed), []
    for i in range(n):
        t = np.arange(int(16000 * rng.uniform(3, 8) * (0.25 if smoke else 1))) / 16000
        audios.append((0.1 * np.sin(2 * np.pi * (120 + 10 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t))
                       + 0.02 * rng.standard_normal(len(t))).astype(np.float32))
    return audios, [texts[i % len(texts)] for i in range(n)]


# ----------------------------------------------------------------------------- memory (gpu_check.py's part d)

def autocast(device):
    """The trainer's autocast (grpo.Trainer.autocast): bf16 on CUDA, none elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def peak_bytes(fn, dev):
    """Bytes allocated above the level before fn() at its peak (CUDA's allocator statistics; None on a
    CPU, where fn just runs: tests/test_memory.py measures the CPU's peaks)."""
    if dev.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - before


def memory_case(name, shape, world, fsdp, mb, gc, dev, smoke, lora_rank: int = 0) -> dict:
    """An update micro-batch, an AdamW step and a rollout call of R x (P + T) tokens (every row stops at
    once: the eager loop's cache and prefill are a whole rollout's) on a model of zero weights (under FSDP
    over a fake group: its gathers move no data). lora_rank > 0: LoRA as policy.py builds it (the base
    frozen in bf16, on a CPU too as memory.py counts it; fp32 adapters; rollouts on merged weights)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    import llama
    import lora
    import memory
    import models
    import parallel
    import sample
    P, T, R, A = (8, 24, 8, 200) if smoke else (100, 1500, 64, memory.SPEECH_ROWS)
    if fsdp:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        config = LlamaConfig(**shape)
        with torch.device("meta"):
            lm = LlamaForCausalLM(config)
        lm.to_empty(device=dev)  # whole on the device first (sharding frees it): to_empty unties the head
        lm.tie_weights()
        with torch.no_grad():
            for t in lm.parameters():
                t.zero_()
        if lora_rank:
            lora.add_adapters(models.cast_parameters(lm, torch.bfloat16), lora_rank, alpha=32.0)
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config).to(dev)  # real buffers, not meta ones
        if gc:
            getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)()
        model = llama.LogProbs(lm.train())
        if fsdp:
            parallel.shard(model, dev)
        torch.cuda.empty_cache()  # the whole weights that sharding left (a no-op without CUDA)
        V, g = config.vocab_size, torch.Generator().manual_seed(0)
        allowed = torch.arange(V - A, V, device=dev)  # the speech rows: the last A of the vocabulary
        prompts = [torch.randint(0, V - A, (P,), generator=g).tolist() for _ in range(R)]
        tokens = allowed[torch.randint(0, A, (mb, T), generator=g).to(dev)]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)  # LoRA: adapters

        def update():
            with autocast(dev):
                logp = model(prompts[:mb], tokens, 0.8, allowed_ids=allowed)
            (logp.sum() / logp.numel()).backward()

        def rollout():  # the whole (gathered) weights set so that every row emits the stop token first
            with torch.no_grad(), autocast(dev), parallel.gathered(model):
                for t in lm.parameters():  # layers of zeros pass the embedding on; its stop row wins the head
                    t.fill_(1.0 if t is lm.model.norm.weight else 0.0)
                for w in (lm.model.embed_tokens.weight, lm.lm_head.weight):
                    w.fill_(1.0)[V - 1] = 2.0
                with lora.merged(lm):  # a no-op without adapters
                    sample.generate(lm, prompts, max_new_tokens=T, temperature=0.8, top_p=0.9, allowed_ids=allowed,
                                    stop_ids=(V - 1,), cache_dtype=torch.bfloat16 if dev.type == "cuda" else None,
                                    generator=torch.Generator(dev).manual_seed(0))

        update()  # warm-up: AdamW's moments, the kernels, the allocator's pools
        opt.step()
        opt.zero_grad(set_to_none=True)
        local = [t.to_local() if hasattr(t, "to_local") else t for t in [*model.parameters(), *(
            v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]]  # this rank's shards
        measured = dict(held=torch.cuda.memory_allocated(dev) if dev.type == "cuda" else
                        sum(t.numel() * t.element_size() for t in local),
                        update=peak_bytes(update, dev), step=peak_bytes(opt.step, dev))
        opt.zero_grad(set_to_none=True)
        model.eval()  # as rollout.Sampler does
        measured["rollout"] = peak_bytes(rollout, dev)
    finally:
        if fsdp:
            dist.destroy_process_group()
    m = memory.training_memory(config, world=world, fsdp=fsdp, compile=False, micro_batch=mb, seq_len=P + T,
                               response_len=T, rollout_batch=R, rollout_len=P + T, allowed=A, grad_checkpointing=gc,
                               codec=None, lora_rank=lora_rank)
    predicted = dict(held=m["weights"] + m["optimizer"], update=m["update"], step=m["step"] - m["grads"],
                     rollout=m["rollout"])  # the rises beyond what the phase starts with (step: the grads)
    gb = lambda x: None if x is None else round(x / 1e9, 3)  # noqa: E731
    return dict(model=name, lora_rank=lora_rank, world=world, fsdp=fsdp, grad_checkpointing=gc, micro_batch=mb,
                tokens=P + T, rollout_rows=R,
                **{f"{k}_gb": [gb(measured[k]), gb(predicted[k])] for k in measured},
                **{f"{k}_ratio": round(measured[k] / predicted[k], 3) for k in measured if measured[k] and predicted[k]})


def _gpu_reward(args, device, smoke: bool) -> None:
    """Whisper large-v3 shapes (random weights, 128 mels): WhisperScorer vs the seed's per-clip way."""
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
        t_ours, t_seed = timed([ours, seed_way], device, 1)
    out = ours()
    print_row("gpu/reward", t0, model=name, card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
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
    p.add_argument("--max-len", type=int, default=None,
                   help="the compiled step's KV-cache slots, as the trainer builds it: --max-new-tokens + 256 "
                        "(default: 1500 + 256; smoke: new tokens + 256)")
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
    if unknown := sorted(set(args.parts.split(",")) - set(parts)):
        p.error(f"unknown --parts {unknown}: expected some of {sorted(parts)}")
    smoke = args.smoke
    for name, full, tiny in [("batch", 64, 4), ("new_tokens", 512, 6), ("prompt_len", 96, 12), ("grpo_prompts", 4, 2),
                             ("grpo_group", 16, 2), ("clips", 16, 2)]:
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)
    args.max_len = args.max_len or (args.new_tokens + 256 if smoke else 1500 + 256)
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py gpu: no CUDA device is visible (torch.cuda.is_available() is False), so there "
                         "is nothing to measure. Run it on a machine with a GPU, or `python bench.py gpu --smoke` "
                         "to check the script on a CPU.")
    torch.set_num_threads(1 if smoke else torch.get_num_threads())  # tiny shapes: more threads only contend
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
            print_row(f"gpu/{part}", t0, error=f"{type(e).__name__}: {e}"[:2000])
            failed += 1
        finally:  # the part's models are gone with its frame: release their memory for the next part
            _free(device)
    if failed:
        raise SystemExit(f"bench.py gpu: {failed} part(s) failed; see the error lines above")
