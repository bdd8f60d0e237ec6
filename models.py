"""Model loading: a Hugging Face LLASA directory or hub id, or a seeded random tiny Llama for
offline runs, tests and benchmarks. (The CPU demo's policy is a directory that demo.ensure_policy
builds; callers resolve the name "demo" through it.)
"""

import os

import torch

import data


def tiny_llama(
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 2048,
    **overrides,
):
    """A seeded random LlamaForCausalLM (fp32, eval mode) for tests, benchmarks and tiny runs.

    `overrides` go to LlamaConfig (e.g. tie_word_embeddings=True, rope_scaling={...},
    intermediate_size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.float().eval()


def cast_parameters(model, dtype: torch.dtype):
    """Parameters to `dtype` in place, buffers as they are: Llama's rotary inv_freq must stay fp32
    (in bf16, cos/sin at long positions are far off: docs/speed.md), which model.to(dtype) would
    cast too. Returns the model."""
    for p in model.parameters():  # tied weights: one Parameter, cast once
        p.data = p.data.to(dtype)
    return model


# With this few, a random tiny policy emits the stop token within 64 steps most of the time.
TINY_SPEECH_TOKENS = 64


def load_model(name: str, device="cpu", dtype=torch.bfloat16, *, seed: int = 0):
    """(model, tokenizer), the model in eval mode on `device` in `dtype`.

    `name`: a Hugging Face directory or hub id, "tiny": a random `tiny_llama` (init `seed`) over
    data.tiny_tokenizer's vocabulary with 64 speech tokens, for offline runs and tests. The CPU
    demo's policy ("demo" in the presets) is the directory `demo.ensure_policy()` returns. A name
    that loads no model and tokenizer raises FileNotFoundError."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        tokenizer = data.tiny_tokenizer(n_speech=TINY_SPEECH_TOKENS)
        model = tiny_llama(len(tokenizer), seed=seed, max_positions=4096)
        return cast_parameters(model.to(device), dtype).eval(), tokenizer
    if (os.path.isabs(name) or name.startswith(".")) and not os.path.isdir(name):
        raise FileNotFoundError(f"model directory not found: {name}")
    # transformers renamed `torch_dtype` to `dtype` in 4.56; 4.46 knows only the old name.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (4, 56):
        dtype_kw = {"dtype": dtype}
    else:
        dtype_kw = {"torch_dtype": dtype}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **dtype_kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load a causal LM and tokenizer from {name!r} (a directory with "
            f"config.json and tokenizer files, or a hub id when online): {e}"
        ) from e
    return model.to(device).eval(), tokenizer
