"""The named presets: each one a dict of Config fields whose defaults it changes (--preset NAME;
any flag given overrides them). From the offline smoke runs to the real LLASA recipes.
"""

import os

import data

_SAMPLE_VAL = os.path.join(os.path.dirname(data.SAMPLE_DATA), "val.jsonl")
PRESETS = {
    "tiny": dict(
        model="tiny",
        codec="tone",
        whisper="random-tiny",
        whisper_device="cpu",
        device="cpu",
        val_data=_SAMPLE_VAL,
        out="runs/tiny",
        steps=6,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=64,
        top_p=1.0,
        lr=1e-3,
        kl_coef=0.04,
        micro_batch=8,
        sample_every=3,
        save_every=3,
        val_every=3,
        n_samples=2,
        whisper_max_tokens=16,
        whisper_threads=1,
    ),
    # The tiny run with voice prompts (data/clone: two tone-codec "voices"), speaker similarity by a
    # seeded random tiny speaker model: the cloning path end to end, offline.
    "tiny-clone": dict(
        model="tiny",
        codec="tone",
        whisper="random-tiny",
        whisper_device="cpu",
        device="cpu",
        data=os.path.join(os.path.dirname(data.SAMPLE_DATA), "clone", "train.jsonl"),
        val_data=os.path.join(os.path.dirname(data.SAMPLE_DATA), "clone", "val.jsonl"),
        out="runs/tiny-clone",
        steps=4,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=64,
        top_p=1.0,
        lr=1e-3,
        kl_coef=0.04,
        micro_batch=8,
        sample_every=2,
        save_every=2,
        val_every=2,
        n_samples=2,
        whisper_max_tokens=16,
        whisper_threads=1,
        speaker_model="random-tiny",
    ),
    # The seed's recipe (README: Changes from the seed), responses capped at Whisper's 30 s window.
    "llasa-1b": dict(
        model="HKUSTAudio/Llasa-1B",
        codec="xcodec2",
        whisper="large-v3",
        whisper_device="cuda:2",
        steps=200,
        prompts_per_step=8,
        group_size=16,
        max_new_tokens=1500,
        temperature=0.8,
        top_p=0.9,
        lr=1e-6,
        kl_coef=0.0,
        updates_per_rollout=1,
        micro_batch=2,
        weight_decay=0.01,  # the seed's AdamW
        # One GPU worker serves both ranks' 64 clips a step: one batch per rank.
        whisper_batch=64,
    ),
}
# The CPU demo (demo.py, docs/demo.md): a small warm-started Llama that speaks through spoken-word
# clips, rewarded by the real Whisper tiny.en hearing 8 s windows.
_DEMO = os.path.join(os.path.dirname(data.SAMPLE_DATA), "demo")
PRESETS["demo"] = dict(
    model="demo",
    codec="words",
    whisper="tiny.en",
    whisper_device="cpu",
    device="cpu",
    whisper_window=8.0,
    whisper_threads=2,
    data=os.path.join(_DEMO, "train.jsonl"),
    val_data=os.path.join(_DEMO, "val_demo.jsonl"),
    out="runs/demo",
    steps=20,
    prompts_per_step=8,
    group_size=8,
    max_new_tokens=16,
    temperature=1.0,
    top_p=1.0,
    lr=1e-3,
    kl_coef=0.0,
    micro_batch=64,
    sample_every=10,
    save_every=20,
    val_every=5,
    n_samples=4,
)
# The larger LLASAs on 80 GB GPUs (README's memory table): sharded weights, gradients and AdamW
# state (FSDP2), activations recomputed in backward, the seed's recipe otherwise.
PRESETS["llasa-3b"] = {
    **PRESETS["llasa-1b"],
    "model": "HKUSTAudio/Llasa-3B",
    "fsdp": True,
    "micro_batch": 2,
    "grad_checkpointing": True,
}
PRESETS["llasa-8b"] = {
    **PRESETS["llasa-1b"],
    "model": "HKUSTAudio/Llasa-8B",
    "fsdp": True,
    "micro_batch": 1,
    "grad_checkpointing": True,
}
