"""The trainer's configuration: one dataclass whose fields are the flags (each with its help and
default), the named presets that change those defaults (presets.py), and `parse_config`, which
builds the command line from them and checks every value (checks.py) before anything loads. A
user's mistake is one line, `grpo.py: error: --flag VALUE: why`, exit status 2.

    python grpo.py --help       # every flag with its default
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

import data
import lora
from checks import CLIParser
from config_checks import (
    RANGES,  # noqa: F401 (re-exported: tests read config.RANGES)
    ConfigError,
    check_config,
    check_inputs,
    flag,
)
from loss import LOSS_AGGS
from measures import MEASURES
from presets import PRESETS

PROG = "grpo.py"  # how a user's error begins: "grpo.py: error: --flag VALUE: why"


def opt(default, help):
    """A Config field: its default and its --help line."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every option of a run: one field per flag (lora_rank: --lora-rank), its default, its help."""

    preset: str = opt(
        "",
        "named defaults: 'tiny' (offline CPU smoke run), 'tiny-clone' (with voice prompts), "
        "'demo' (real Whisper, learns on a CPU in minutes), 'llasa-1b' (the seed's recipe), "
        "'llasa-3b', 'llasa-8b' (the same with FSDP2 and activation checkpointing)",
    )
    # models
    model: str = opt(
        "HKUSTAudio/Llasa-1B", "policy: Hugging Face id or directory; 'tiny' = tiny random Llama"
    )
    codec: str = opt(
        "xcodec2", "speech codec: 'xcodec2[:PATH]', 'xcodec2-package[:PATH]' or 'tone' (test codec)"
    )
    codec_precision: str = opt(
        "tf32",
        "XCodec2's arithmetic on CUDA: 'tf32' (TF32 matmuls, ~1e-3 relative), 'bf16' "
        "(autocast, 37 dB SNR against fp32) or 'fp32' (strict, ~8x slower)",
    )
    whisper: str = opt("large-v3", "Whisper model name, checkpoint path, or 'random-tiny'")
    whisper_device: str = opt("cuda:2", "device of the Whisper worker process (one per node)")
    whisper_batch: int = opt(16, "clips per Whisper batch")
    whisper_max_tokens: int = opt(
        0, "cap on the greedy transcript, tokens (0 = bounded by each target's length only)"
    )
    whisper_threads: int = opt(0, "CPU threads of the Whisper worker process (0 = torch's default)")
    whisper_window: float = opt(
        30.0,
        "seconds of audio Whisper hears (30 = its own window; less is faster on "
        "a CPU for short clips; longer clips are refused)",
    )
    language: str = opt("", "Whisper language for rows without a 'language' field ('' = detect)")
    reward: str = opt(
        "whisper", "'whisper' or 'module:function' scoring (audio, text) -> float in [0, 1]"
    )
    device: str = opt(
        "auto", "training device: 'auto' (cuda:LOCAL_RANK if available, else cpu) or 'cpu'"
    )
    # data and outputs
    data: str = opt(
        data.SAMPLE_DATA, "training texts: JSONL with a 'text' field, or .txt one per line"
    )
    val_data: str = opt("", "validation texts (same formats); '' = no validation")
    out: str = opt(
        "runs/grpo",
        "output directory: metrics.jsonl, samples/, checkpoints/; must not hold "
        "another run unless --resume",
    )
    resume: str = opt(
        "",
        "'auto' (continue from the newest complete checkpoint in --out, or start) or a "
        "checkpoint directory OUT/checkpoints/step_N",
    )
    # GRPO
    steps: int = opt(200, "optimizer steps (rollout batches) to run in total")
    epochs: float = opt(
        0.0,
        "if > 0, the run's length in passes over --data instead of "
        "--steps: ceil(epochs * rows / --prompts-per-step) steps (seed: 1)",
    )
    prompts_per_step: int = opt(8, "prompts per step over all ranks; must divide by the world size")
    group_size: int = opt(16, "samples per prompt (G)")
    max_new_tokens: int = opt(
        1500, "longest response in speech tokens (50 tokens = 1 s; Whisper hears 30 s)"
    )
    max_context: int = opt(
        2048,
        "prompt + response tokens the model was trained at (LLASA: "
        "2048); prompts --max-new-tokens can take past it are counted, "
        "said once at start; 0 = off",
    )
    temperature: float = opt(0.8, "sampling temperature; training log-probs use the same")
    top_p: float = opt(0.9, "nucleus sampling threshold (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    repetition_penalty: float = opt(1.0, "HF repetition penalty (1 = off)")
    clip_eps: float = opt(
        0.2, "PPO clip range epsilon: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]"
    )
    clip_eps_high: float | None = opt(
        None,
        "upper clip range (DAPO's clip-higher, e.g. 0.28 with --clip-eps 0.2); default: --clip-eps",
    )
    importance_level: str = opt(
        "token",
        "importance ratio per 'token' (PPO/GRPO) or per 'sequence' (GSPO: "
        "exp of the sequence's mean log-ratio, with a small clip range, GSPO's "
        "paper --clip-eps 3e-4 --clip-eps-high 4e-4, and --loss-agg "
        "seq-mean-token-mean as in verl)",
    )
    tis_cap: float = opt(
        0.0,
        "truncated importance sampling: weight each token's policy-gradient term by "
        "min(exp(old - rollout log-prob), cap), correcting the rollout engine's mismatch "
        "(verl, TRL; e.g. 2); 0 = off",
    )
    dynamic_sampling: bool = opt(
        False,
        "drop groups whose samples all scored alike (no advantage) and refill the "
        "step with informative groups of further prompts (DAPO's dynamic sampling)",
    )
    max_refill_rounds: int = opt(
        3,
        "--dynamic-sampling: extra rollout rounds a step may run to refill; then it "
        "trains on the informative groups it has",
    )
    clip_ratio_c: float = opt(
        3.0, "dual-clip bound for negative advantages (verl's clip_ratio_c), > 1"
    )
    kl_coef: float = opt(
        0.0, "k3 KL penalty to the frozen initial model; 0 drops the reference model"
    )
    loss_agg: str = opt("token-mean", f"loss aggregation: {', '.join(LOSS_AGGS)}")
    scale_rewards: bool = opt(True, "divide advantages by the group std (off = Dr. GRPO)")
    updates_per_rollout: int = opt(1, "optimizer steps per rollout batch (>1 needs old log-probs)")
    micro_batch: int = opt(4, "sequences per forward/backward in the update")
    compile: bool | None = opt(
        None,
        "compile the decode step once per run (CUDA graphs on a GPU); default: on "
        "for CUDA without --fsdp, off on CPU; refused with --fsdp",
    )
    rollout_chunks: int = opt(
        1,
        "generate a rank's rollouts in this many chunks, scoring each while the next "
        "is generated (Whisper time hidden; smaller decode batches)",
    )
    fsdp: bool = opt(
        False, "shard policy and reference with FSDP2 over the ranks (needed for Llasa-3B/8B)"
    )
    # reward shape (reward.tts_reward)
    beta_c: float = opt(3.0, "CER utility sharpness: U_cer = 1 - tanh(beta_c * cer)")
    tau_n: float = opt(3.0, "NLL utility temperature: U_nll = exp(-nll / tau_n), nats")
    lambda_c: float = opt(0.6, "weight of the CER utility in the harmonic mean")
    lambda_n: float = opt(0.4, "weight of the NLL utility in the harmonic mean")
    # the per-clip measures beside the reward (measures.py) and the guard that holds them
    quality: str = opt(
        "",
        "speech quality per clip: 'dnsmos' (DNSMOS P.835 + P.808; pip install speechmos "
        "onnxruntime) or '' (off)",
    )
    guard: tuple = opt(
        (),
        "NAME[:BAND], repeatable: scale down the reward of a sample whose measure leaves BAND "
        "(its own units) around the initial policy's median; NAME one of "
        + ", ".join(MEASURES)
        + " (docs/prosody.md: defaults, directions; replaces --prosody-guard and --sim-guard)",
    )
    # voice cloning: rows with prompt_wav + prompt_text (data.py)
    speaker_model: str = opt(
        "wavlm-sv",
        "speaker model for `sim` (prompt rows only): 'wavlm-sv[:PATH]', a "
        "Seed-TTS-eval WavLM-large+ECAPA .pth, or 'module:function'",
    )
    prompt_decode: str = opt(
        "alone",
        "audio of a cloned clip: 'alone' (its codes decoded alone) or 'context' "
        "(after the prompt's codes, cut at the seam)",
    )
    sim_weight: float = opt(
        0.0, "weight of speaker similarity's own group-normalized advantage (GLM-TTS); 0 = off"
    )
    # LoRA (lora.py): train low-rank adapters on a frozen base instead of every weight
    lora_rank: int = opt(
        0,
        "LoRA rank r (0 = full fine-tuning); the base --model is frozen (bf16 on CUDA), the "
        "reference is the base itself (adapters off); try 16-64 with --lr 1e-5 to 1e-4",
    )
    lora_alpha: float = opt(32.0, "LoRA scale numerator: the update is alpha / r * B @ A")
    lora_targets: str = opt(
        ",".join(lora.TARGETS),
        "comma-separated projections of every decoder layer that get adapters",
    )
    # optimizer
    lr: float = opt(1e-6, "AdamW learning rate")
    warmup_steps: int = opt(0, "linear learning-rate warmup, steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "max global gradient norm (0 = off)")
    max_skipped_steps: int = opt(
        3,
        "a step with a non-finite gradient norm or loss is skipped (no "
        "optimizer step); stop after this many in a row (0 = never)",
    )
    grad_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    seed: int = opt(0, "seed for data order, sampling and the tiny models")
    # outputs
    sample_every: int = opt(50, "steps between saved audio samples")
    n_samples: int = opt(4, "audio samples saved each time")
    report_to: str = opt(
        "", "also log metrics to 'tensorboard' (OUT/tensorboard) or 'wandb', when installed"
    )
    save_every: int = opt(100, "steps between checkpoints (the last step always saves)")
    val_every: int = opt(50, "steps between validations (needs --val-data)")
    worker_timeout: float = opt(600.0, "seconds a reward request may take before the run stops")


def parse_config(
    argv=None, description: str = "GRPO for LLASA text-to-speech", inputs: bool = False
) -> Config:
    """Flags from the dataclass; a preset sets the defaults, any flag overrides them. Every value is
    checked (check_config); with `inputs` (grpo.py's command line) also what the flags name
    (check_inputs). A user's error exits with status 2 and one line on stderr."""
    pre = CLIParser(prog=PROG, add_help=False)
    pre.add_argument("--preset", default="")
    preset = pre.parse_known_args(argv)[0].preset
    if preset and preset not in PRESETS:
        pre.error(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    defaults.update(PRESETS.get(preset, {}))
    p = CLIParser(
        prog=PROG, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(Config):
        name = flag(f.name)
        default = defaults[f.name]
        if f.type in (bool, "bool", bool | None):
            help_text = f"{f.metadata['help']} (default: {default})"
            action = argparse.BooleanOptionalAction
            p.add_argument(name, action=action, default=default, help=help_text)
        elif f.type in (tuple, "tuple"):  # repeatable: the flags given replace the preset's
            help_text = f"{f.metadata['help']} (default: {' '.join(default) or 'none'})"
            p.add_argument(name, action="append", default=None, help=help_text)
        elif f.type in (float | None, "float | None"):
            help_text = f"{f.metadata['help']} (default: {default!r})"
            p.add_argument(name, type=float, default=default, help=help_text)
        else:
            help_text = f"{f.metadata['help']} (default: {default!r})"
            p.add_argument(name, type=type(f.default), default=default, help=help_text)
    values = vars(p.parse_args(argv))
    for f in dataclasses.fields(Config):
        if f.type in (tuple, "tuple"):
            values[f.name] = tuple(values[f.name] or defaults[f.name])
    cfg = Config(**values)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # ranks under torchrun
    try:
        check_config(cfg, world=world)
        if inputs:
            check_inputs(cfg)
    except ConfigError as e:
        p.error(str(e))  # one line, exit status 2
    return cfg
