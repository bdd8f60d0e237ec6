"""What the GPU benchmark (tools.bench_gpu) and the GPU acceptance run (tools.gpu_check) build:
random-weight models at Llasa-1B and Whisper large-v3 shapes (tiny ones in smoke runs), a
grpo.Trainer on such a policy and the figures of one of its steps, test clips, the trainer's
autocast, and the card's HBM bandwidth for the decode bound."""

import os
import random
import time

import torch

from tools.bench_common import LLAMA_1B, sync

# Llasa-1B's speech head: the 65,536 speech tokens <|s_k|> (ids 128264..193799 in LLASA's
# vocabulary) + <|SPEECH_GENERATION_END|> (id 128261): the rows the policy computes.
LLASA_SPEECH_IDS = list(range(128264, 193800)) + [128261]
WHISPER_LARGE_V3 = dict(
    n_mels=128,
    n_audio_ctx=1500,
    n_audio_state=1280,
    n_audio_head=20,
    n_audio_layer=32,
    n_vocab=51866,
    n_text_ctx=448,
    n_text_state=1280,
    n_text_head=20,
    n_text_layer=32,
)
HBM_TB_S = {"H100": 3.35, "H200": 4.8}  # SXM parts; others report achieved GB/s only
# The smoke runs' model (its vocab: the tokenizer's in a trainer).
TINY = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=256,
    vocab=512,
    tie_word_embeddings=True,
    max_positions=4096,
)


def hbm_tb_s(device: torch.device) -> tuple[str, float | None]:
    """(card name, HBM bandwidth in TB/s, or None when unknown) of a CUDA device."""
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return name, HBM_TB_S["H200"]
    if "H100" in name and "PCIe" not in name and "NVL" not in name:
        return name, HBM_TB_S["H100"]
    return name, None


def random_llama(shape: dict, device, dtype, seed: int = 0):
    """A random-weight LlamaForCausalLM in eval mode, built directly on `device` in `dtype` (no CPU
    init of 1B weights). `shape`: LLAMA_1B's or TINY's keys."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=shape.get("max_positions", 4096),
        rope_theta=500000.0,
        tie_word_embeddings=shape.get("tie_word_embeddings", False),
        rope_scaling=shape.get("rope_scaling"),
    )
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


def autocast(device):
    """The trainer's autocast (grpo.Trainer.autocast): bf16 on CUDA, none elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class FakeScorer:
    """Random rewards without Whisper (the reward part is measured on its own), so that
    advantages are not 0."""

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def score(self, audios, texts, languages=None):
        from reward import Score

        return [Score(reward=self.rng.random()) for _ in audios]


def grpo_trainer(
    device,
    smoke: bool,
    prompts: int,
    group: int,
    new_tokens: int,
    compile: bool = True,
    cache_tokens: int | None = None,
):
    """A grpo.Trainer as `--preset llasa-1b` builds it, on a random 1B-shaped policy (tiny in smoke
    runs) of fp32 master weights, XCodec2's decoder at its real shapes (random weights) and a
    FakeScorer; its decode step built for `cache_tokens` new tokens (default new_tokens) +
    rollout.Sampler's prompt slots, its rollouts of `new_tokens`; smoke runs compile with the
    'eager' backend. Returns (trainer, policy)."""
    import codec
    import config
    import data
    import decode
    import grpo

    n_speech = 64 if smoke else 65536
    tok = data.tiny_tokenizer(n_speech=n_speech)  # LLASA-style ids: <|s_k|> and the markers
    if smoke:
        shape = dict(TINY, vocab=len(tok))
    else:
        shape = dict(LLAMA_1B)
    policy = random_llama(shape, device, torch.float32)  # fp32 master weights, as the trainer's
    overrides = dict(
        model="random",
        codec="tone",
        device=str(device),
        prompts_per_step=prompts,
        group_size=group,
        max_new_tokens=cache_tokens or new_tokens,
        kl_coef=0.0,
        steps=2,
        compile=compile,
        micro_batch=4 if smoke else 2,
        out=os.path.join("runs", "bench-gpu-unused"),
    )
    cfg = config.Config(**{**config.PRESETS["llasa-1b"], **overrides})
    config.check_config(cfg)

    class BenchTrainer(grpo.Trainer):
        def load_model(self, name):
            return policy, tok

    datasets = (data.load_dataset(data.SAMPLE_DATA), [])
    tr = BenchTrainer(cfg, grpo.Dist(), device, FakeScorer(), datasets=datasets)
    # XCodec2's decoder at its real shapes (small in smoke runs), random weights.
    if smoke:
        xconfig = codec.XCodec2Config(hidden_dim=64, depth=2, n_heads=4)
    else:
        xconfig = codec.XCodec2Config()
    tr.sampler.codec = codec.XCodec2Codec(codec.XCodec2Decoder(xconfig), device)
    if smoke and tr.sampler.decoder is not None:  # trace only: no kernels to build on a CPU
        tr.sampler.decoder = decode.Decoder(
            policy,
            compile=True,
            max_len=tr.sampler.decoder.max_len,
            compile_options={"backend": "eager"},
        )
    cfg.max_new_tokens = new_tokens  # the rollouts' length (the sampler reads cfg at each call)
    return tr, policy


def record_spans(decoder) -> list[int]:
    """The attention span of every step `decoder` (a decode.Decoder) runs from now on (one graph
    per span), appended to the returned list as the steps run."""
    spans = []
    step = decoder.step

    def recorded(w, s, k, span):
        spans.append(span)
        return step(w, s, k, span)

    decoder.step = recorded
    return spans


def grpo_step(
    device,
    smoke: bool,
    prompts: int,
    group: int,
    new_tokens: int,
    compile: bool = True,
    cache_tokens: int | None = None,
):
    """Two steps of a `grpo_trainer` (the first a warm-up: compiles, CUDA graphs, allocator, AdamW
    state) and the second's figures: seconds per phase, tokens/s, peak memory (CUDA), and with the
    compiled step its spans, graphs and CUDA-graph skips over both steps and decoder_works.
    Returns (figures, trainer, metrics)."""
    from torch._dynamo.utils import counters

    tr, policy = grpo_trainer(device, smoke, prompts, group, new_tokens, compile, cache_tokens)
    cfg = tr.cfg
    spans = record_spans(tr.sampler.decoder) if tr.sampler.decoder else []
    graphs_before = counters["stats"]["unique_graphs"]
    skips_before = counters["inductor"]["cudagraph_skips"]
    t0 = time.time()
    tr.train_step(0)
    warm = time.time() - t0
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metrics, _ = tr.train_step(1)
    sync(device)
    phases = ("rollout", "codec", "reward", "train")
    row = dict(
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        params_b=round(sum(p.numel() for p in policy.parameters()) / 1e9, 3),
        rollouts=cfg.prompts_per_step * cfg.group_size,
        max_new_tokens=cfg.max_new_tokens,
        compile=compile,
        micro_batch=cfg.micro_batch,
        response_len=metrics["response_len"],
        **{phase: round(metrics[f"time_{phase}"], 3) for phase in phases},
        rollout_tok_s=round(metrics["tokens_per_s"], 1),
        warmup_step_s=round(warm, 2),
        decoder_works=tr.sampler.decoder_works,
        spans_used=sorted(set(spans)),
        graphs=counters["stats"]["unique_graphs"] - graphs_before,
        cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips_before,
    )
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row, tr, metrics


def whisper_model(device, smoke: bool):
    """(Whisper with large-v3's shapes and random weights, its name); smoke: the seeded tiny one."""
    from whisper.model import ModelDimensions, Whisper

    import scorer as scoring

    if smoke:
        return scoring.random_tiny_whisper().to(device), "random-tiny"
    torch.manual_seed(0)
    with torch.device(device):
        model = Whisper(ModelDimensions(**WHISPER_LARGE_V3))
        # Whisper leaves the decoder's positional embedding torch.empty: fill it.
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
    return model, "large-v3 shapes, random weights"


def sample_clips(n: int, smoke: bool, seed: int = 0):
    """(n clips of 3-8 s, 16 kHz float32 (a quarter of that in smoke runs): a voiced-like harmonic
    tone under noise, content moot with random weights; n English texts of the sample data)."""
    import numpy as np

    import data

    examples = data.load_dataset(data.SAMPLE_DATA)
    texts = [ex.text for ex in examples if (ex.language or "en") == "en"]
    rng = np.random.default_rng(seed)
    scale = 0.25 if smoke else 1
    audios = []
    for i in range(n):
        t = np.arange(int(16000 * rng.uniform(3, 8) * scale)) / 16000  # [samples] seconds
        tone = 0.1 * np.sin(2 * np.pi * (120 + 10 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t))
        noise = 0.02 * rng.standard_normal(len(t))
        audios.append((tone + noise).astype(np.float32))
    return audios, [texts[i % len(texts)] for i in range(n)]
