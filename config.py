"""The trainer's configuration: one dataclass, named presets, flags generated from it, every check
in one place: `check_config` (each flag's value, the forms of what it names, local paths present)
and `check_inputs` (what the flags name: data rows, --out and --resume, devices), both before
anything loads. A user's mistake is one line, `grpo.py: error: --flag VALUE: why`, exit status 2.

    python grpo.py --help       # every flag with its default
"""
import argparse
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field

import torch

import data
import lora
from checks import HUB_ID, CLIParser, codec_problem, device_problem, model_problem

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    preset: str = opt("", "named defaults: 'tiny' (offline CPU smoke run), 'tiny-clone' (with voice prompts), 'demo' (real Whisper, learns on a CPU in "
                          "minutes), 'llasa-1b' (the seed's recipe), 'llasa-3b', 'llasa-8b' (the same with FSDP2 "
                          "and activation checkpointing)")
    # models
    model: str = opt("HKUSTAudio/Llasa-1B", "policy: Hugging Face id or directory; 'tiny' = tiny random Llama")
    codec: str = opt("xcodec2", "speech codec: 'xcodec2[:PATH]', 'xcodec2-package[:PATH]' or 'tone' (test codec)")
    codec_precision: str = opt("tf32", "XCodec2's arithmetic on CUDA: 'tf32' (TF32 matmuls, ~1e-3 relative), 'bf16' "
                                       "(autocast, 37 dB SNR against fp32) or 'fp32' (strict, ~8x slower)")
    whisper: str = opt("large-v3", "Whisper model name, checkpoint path, or 'random-tiny'")
    whisper_device: str = opt("cuda:2", "device of the Whisper worker process (one per node)")
    whisper_batch: int = opt(16, "clips per Whisper batch")
    whisper_max_tokens: int = opt(0, "cap on the greedy transcript, tokens (0 = bounded by each target's "
                                     "length only)")
    whisper_threads: int = opt(0, "CPU threads of the Whisper worker process (0 = torch's default)")
    whisper_window: float = opt(30.0, "seconds of audio Whisper hears (30 = its own window; less is faster on "
                                      "a CPU for short clips; longer clips are refused)")
    language: str = opt("", "Whisper language for rows without a 'language' field ('' = detect)")
    reward: str = opt("whisper", "'whisper' or 'module:function' scoring (audio, text) -> float in [0, 1]")
    device: str = opt("auto", "training device: 'auto' (cuda:LOCAL_RANK if available, else cpu) or 'cpu'")
    # data and outputs
    data: str = opt(data.SAMPLE_DATA, "training texts: JSONL with a 'text' field, or .txt one per line")
    val_data: str = opt("", "validation texts (same formats); '' = no validation")
    out: str = opt("runs/grpo", "output directory: metrics.jsonl, samples/, checkpoints/; must not hold "
                                "another run unless --resume")
    resume: str = opt("", "'auto' (continue from the newest complete checkpoint in --out, or start) or a "
                          "checkpoint directory OUT/checkpoints/step_N")
    # GRPO
    steps: int = opt(200, "optimizer steps (rollout batches) to run in total")
    epochs: float = opt(0.0, "if > 0, the run's length in passes over --data instead of "
                             "--steps: ceil(epochs * rows / --prompts-per-step) steps (seed: 1)")
    prompts_per_step: int = opt(8, "prompts per step over all ranks; must divide by the world size")
    group_size: int = opt(16, "samples per prompt (G)")
    max_new_tokens: int = opt(1500, "longest response in speech tokens (50 tokens = 1 s; Whisper hears 30 s)")
    max_context: int = opt(2048, "prompt + response tokens the model was trained at (LLASA: "
                                 "2048); prompts --max-new-tokens can take past it are counted, "
                                 "said once at start; 0 = off")
    temperature: float = opt(0.8, "sampling temperature; training log-probs use the same")
    top_p: float = opt(0.9, "nucleus sampling threshold (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    repetition_penalty: float = opt(1.0, "HF repetition penalty (1 = off)")
    clip_eps: float = opt(0.2, "PPO clip range epsilon: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]")
    clip_eps_high: float | None = opt(None, "upper clip range (DAPO's clip-higher, e.g. 0.28 with --clip-eps 0.2); "
                                            "default: --clip-eps")
    importance_level: str = opt("token", "importance ratio per 'token' (PPO/GRPO) or per 'sequence' (GSPO: "
                                         "exp of the sequence's mean log-ratio, with a small clip range, GSPO's "
                                         "paper --clip-eps 3e-4 --clip-eps-high 4e-4, and --loss-agg "
                                         "seq-mean-token-mean as in verl)")
    tis_cap: float = opt(0.0, "truncated importance sampling: weight each token's policy-gradient term by "
                              "min(exp(old - rollout log-prob), cap), correcting the rollout engine's mismatch "
                              "(verl, TRL; e.g. 2); 0 = off")
    dynamic_sampling: bool = opt(False, "drop groups whose samples all scored alike (no advantage) and refill the "
                                        "step with informative groups of further prompts (DAPO's dynamic sampling)")
    max_refill_rounds: int = opt(3, "--dynamic-sampling: extra rollout rounds a step may run to refill; then it "
                                    "trains on the informative groups it has")
    clip_ratio_c: float = opt(3.0, "dual-clip bound for negative advantages (verl's clip_ratio_c), > 1")
    kl_coef: float = opt(0.0, "k3 KL penalty to the frozen initial model; 0 drops the reference model")
    loss_agg: str = opt("token-mean", f"loss aggregation: {', '.join(LOSS_AGGS)}")
    scale_rewards: bool = opt(True, "divide advantages by the group std (off = Dr. GRPO)")
    updates_per_rollout: int = opt(1, "optimizer steps per rollout batch (>1 needs old log-probs)")
    micro_batch: int = opt(4, "sequences per forward/backward in the update")
    compile: bool | None = opt(None, "compile the decode step once per run (CUDA graphs on a GPU); default: on "
                                     "for CUDA without --fsdp, off on CPU; refused with --fsdp")
    rollout_chunks: int = opt(1, "generate a rank's rollouts in this many chunks, scoring each while the next "
                                 "is generated (Whisper time hidden; smaller decode batches)")
    fsdp: bool = opt(False, "shard policy and reference with FSDP2 over the ranks (needed for Llasa-3B/8B)")
    # reward shape (reward.tts_reward)
    beta_c: float = opt(3.0, "CER utility sharpness: U_cer = 1 - tanh(beta_c * cer)")
    tau_n: float = opt(3.0, "NLL utility temperature: U_nll = exp(-nll / tau_n), nats")
    lambda_c: float = opt(0.6, "weight of the CER utility in the harmonic mean")
    lambda_n: float = opt(0.4, "weight of the NLL utility in the harmonic mean")
    # prosody and pacing guard (prosody.guard_factor)
    prosody_guard: bool = opt(False, "scale down the reward of samples whose speaking rate or pitch spread "
                                     "leaves a band around the initial policy's")
    guard_rate_band: float = opt(0.25, "relative band on chars_per_s: [ref / (1 + b), ref * (1 + b)]")
    guard_pitch_band: float = opt(0.5, "relative band on f0_std_semitones: [ref / (1 + b), ref * (1 + b)]")
    # voice cloning: rows with prompt_wav + prompt_text (data.py)
    speaker_model: str = opt("wavlm-sv", "speaker model for `sim` (prompt rows only): 'wavlm-sv[:PATH]', a "
                                         "Seed-TTS-eval WavLM-large+ECAPA .pth, or 'module:function'")
    prompt_decode: str = opt("alone", "audio of a cloned clip: 'alone' (its codes decoded alone) or 'context' "
                                      "(after the prompt's codes, cut at the seam)")
    sim_weight: float = opt(0.0, "weight of speaker similarity's own group-normalized advantage (GLM-TTS); 0 = off")
    sim_guard: bool = opt(False, "scale down the reward of samples whose speaker similarity falls more than "
                                 "--sim-guard-band below the initial policy's median")
    sim_guard_band: float = opt(0.05, "how far below the initial median SIM (cosine) the guard starts")
    # LoRA (lora.py): train low-rank adapters on a frozen base instead of every weight
    lora_rank: int = opt(0, "LoRA rank r (0 = full fine-tuning); the base --model is frozen (bf16 on CUDA), the "
                            "reference is the base itself (adapters off); try 16-64 with --lr 1e-5 to 1e-4")
    lora_alpha: float = opt(32.0, "LoRA scale numerator: the update is alpha / r * B @ A")
    lora_targets: str = opt(",".join(lora.TARGETS), "comma-separated projections of every decoder layer that "
                                                    "get adapters")
    # optimizer
    lr: float = opt(1e-6, "AdamW learning rate")
    warmup_steps: int = opt(0, "linear learning-rate warmup, steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "max global gradient norm (0 = off)")
    max_skipped_steps: int = opt(3, "a step with a non-finite gradient norm or loss is skipped (no "
                                    "optimizer step); stop after this many in a row (0 = never)")
    grad_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    seed: int = opt(0, "seed for data order, sampling and the tiny models")
    # outputs
    sample_every: int = opt(50, "steps between saved audio samples")
    n_samples: int = opt(4, "audio samples saved each time")
    report_to: str = opt("", "also log metrics to 'tensorboard' (OUT/tensorboard) or 'wandb', when installed")
    save_every: int = opt(100, "steps between checkpoints (the last step always saves)")
    val_every: int = opt(50, "steps between validations (needs --val-data)")
    worker_timeout: float = opt(600.0, "seconds a reward request may take before the run stops")


_SAMPLE_VAL = os.path.join(os.path.dirname(data.SAMPLE_DATA), "val.jsonl")
PRESETS = {
    "tiny": dict(model="tiny", codec="tone", whisper="random-tiny", whisper_device="cpu", device="cpu",
                 val_data=_SAMPLE_VAL, out="runs/tiny", steps=6, prompts_per_step=4, group_size=4,
                 max_new_tokens=64, top_p=1.0, lr=1e-3, kl_coef=0.04, micro_batch=8, sample_every=3,
                 save_every=3, val_every=3, n_samples=2, whisper_max_tokens=16, whisper_threads=1),
    # The tiny run with voice prompts (data/clone: two tone-codec "voices"), speaker similarity by a
    # seeded random tiny speaker model: the cloning path end to end, offline.
    "tiny-clone": dict(model="tiny", codec="tone", whisper="random-tiny", whisper_device="cpu", device="cpu",
                       data=os.path.join(os.path.dirname(data.SAMPLE_DATA), "clone", "train.jsonl"),
                       val_data=os.path.join(os.path.dirname(data.SAMPLE_DATA), "clone", "val.jsonl"),
                       out="runs/tiny-clone", steps=4, prompts_per_step=4, group_size=4, max_new_tokens=64,
                       top_p=1.0, lr=1e-3, kl_coef=0.04, micro_batch=8, sample_every=2, save_every=2, val_every=2,
                       n_samples=2, whisper_max_tokens=16, whisper_threads=1, speaker_model="random-tiny"),
    # The seed's recipe (README: Changes from the seed), responses capped at Whisper's 30 s window.
    "llasa-1b": dict(model="HKUSTAudio/Llasa-1B", codec="xcodec2", whisper="large-v3", whisper_device="cuda:2",
                     steps=200, prompts_per_step=8, group_size=16, max_new_tokens=1500, temperature=0.8,
                     top_p=0.9, lr=1e-6, kl_coef=0.0, updates_per_rollout=1, micro_batch=2,
                     weight_decay=0.01,  # the seed's AdamW
                     # One GPU worker serves both ranks' 64 clips a step: one batch per rank.
                     whisper_batch=64),
}
# The CPU demo (demo.py): a small warm-started Llama that speaks through spoken-word clips, rewarded by
# the real Whisper tiny.en hearing 8 s windows; about 5 minutes on 2 CPU cores.
_DEMO = os.path.join(os.path.dirname(data.SAMPLE_DATA), "demo")
PRESETS["demo"] = dict(model="demo", codec="words", whisper="tiny.en", whisper_device="cpu", device="cpu",
                       whisper_window=8.0, whisper_threads=2, data=os.path.join(_DEMO, "train.jsonl"),
                       val_data=os.path.join(_DEMO, "val_demo.jsonl"), out="runs/demo", steps=20,
                       prompts_per_step=8, group_size=8, max_new_tokens=16, temperature=1.0, top_p=1.0,
                       lr=1e-3, kl_coef=0.0, micro_batch=64, sample_every=10, save_every=20, val_every=5,
                       n_samples=4)
# The larger LLASAs on 80 GB GPUs (README's memory table): sharded weights, gradients and AdamW
# state (FSDP2), activations recomputed in backward, the seed's recipe otherwise.
PRESETS["llasa-3b"] = {**PRESETS["llasa-1b"], "model": "HKUSTAudio/Llasa-3B", "fsdp": True, "micro_batch": 2,
                       "grad_checkpointing": True}
PRESETS["llasa-8b"] = {**PRESETS["llasa-1b"], "model": "HKUSTAudio/Llasa-8B", "fsdp": True, "micro_batch": 1,
                       "grad_checkpointing": True}


PROG = "grpo.py"  # how a user's error begins: "grpo.py: error: --flag VALUE: why"


class ConfigError(ValueError):
    """A user's mistake in a flag or in an input it names, in one line naming the flag (or the
    file:line) and the value: parse_config exits with status 2, no traceback."""


def parse_config(argv=None, description: str = "GRPO for LLASA text-to-speech",
                 inputs: bool = False) -> Config:
    """Flags from the dataclass; a preset sets the defaults, any flag overrides them. Every value is
    checked (check_config); with `inputs` (grpo.py's command line) also what the flags name
    (check_inputs). A user's error exits with status 2 and one line on stderr."""
    pre = CLIParser(prog=PROG, add_help=False)
    pre.add_argument("--preset", default="")
    preset = pre.parse_known_args(argv)[0].preset
    if preset and preset not in PRESETS:
        pre.error(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
    defaults = {**{f.name: f.default for f in dataclasses.fields(Config)}, **PRESETS.get(preset, {})}
    p = CLIParser(prog=PROG, description=description,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, d = "--" + f.name.replace("_", "-"), defaults[f.name]
        if f.type in (bool, "bool", bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=d,
                           help=f"{f.metadata['help']} (default: {d})")
        elif f.type in (float | None, "float | None"):
            p.add_argument(flag, type=float, default=d, help=f"{f.metadata['help']} (default: {d!r})")
        else:
            p.add_argument(flag, type=type(f.default), default=d, help=f"{f.metadata['help']} (default: {d!r})")
    cfg = Config(**vars(p.parse_args(argv)))
    try:
        check_config(cfg, world=int(os.environ.get("WORLD_SIZE", "1")))
        if inputs:
            check_inputs(cfg)
    except ConfigError as e:
        p.error(str(e))  # one line, exit status 2
    return cfg


# Each number's range (floats must also be finite): field -> (holds, what it must be).
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
RANGES = {
    "whisper_batch": AT_LEAST_1,
    "whisper_max_tokens": (lambda v: v >= 0, ">= 0 (0 = no cap)"),
    "whisper_threads": (lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    # Whisper's encoder has 50 positions per second: the window must be a whole number of them.
    "whisper_window": (lambda v: 0 < v <= 30 and abs(v * 50 - round(v * 50)) <= 1e-6,
                       "a multiple of 0.02 s in (0, 30]"),
    "steps": AT_LEAST_1,
    "prompts_per_step": AT_LEAST_1,
    "group_size": (lambda v: v >= 2, ">= 2 (advantages compare samples of one prompt)"),
    "max_new_tokens": AT_LEAST_1,
    "temperature": (lambda v: v > 0, "> 0 (training log-probs are taken at logits / temperature)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1 = off)"),
    "clip_eps": (lambda v: 0 < v < 1, "in (0, 1)"),
    "clip_eps_high": (lambda v: v is None or v > 0, "> 0 (or unset: --clip-eps)"),
    "tis_cap": (lambda v: v == 0 or v >= 1, "0 (off) or >= 1 (a cap < 1 shrinks on-policy tokens)"),
    "max_refill_rounds": NON_NEGATIVE,
    "clip_ratio_c": (lambda v: v > 1, "> 1"),
    "kl_coef": (lambda v: v >= 0, ">= 0 (0 = no reference model)"),
    "updates_per_rollout": AT_LEAST_1,
    "micro_batch": AT_LEAST_1,
    "rollout_chunks": AT_LEAST_1,
    "beta_c": POSITIVE,
    "tau_n": POSITIVE,
    "lambda_c": NON_NEGATIVE,
    "lambda_n": NON_NEGATIVE,
    "guard_rate_band": POSITIVE,
    "guard_pitch_band": POSITIVE,
    "sim_weight": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "sim_guard_band": POSITIVE,
    "lora_rank": (lambda v: v >= 0, ">= 0 (0 = full fine-tuning)"),
    "lora_alpha": POSITIVE,
    "lr": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "seed": (lambda v: v >= 0, ">= 0 (numpy seeds the data order, and takes no negative seed)"),
    "sample_every": AT_LEAST_1,
    "n_samples": NON_NEGATIVE,
    "save_every": AT_LEAST_1,
    "val_every": AT_LEAST_1,
    "worker_timeout": (lambda v: v > 0, "> 0 seconds"),
    "max_skipped_steps": (lambda v: v >= 0, ">= 0 (0 = never)"),
    "epochs": (lambda v: v >= 0, ">= 0 (0 = off: --steps)"),
    "max_context": (lambda v: v >= 0, ">= 0 (0 = off)"),
}
CHOICES = {
    "preset": ("", *PRESETS),
    "codec_precision": ("tf32", "bf16", "fp32"),
    "loss_agg": LOSS_AGGS,
    "importance_level": IMPORTANCE_LEVELS,
    "prompt_decode": ("alone", "context"),
    "report_to": ("", "tensorboard", "wandb"),
}


def flag(name: str) -> str:
    """A Config field's flag: lora_rank -> --lora-rank."""
    return "--" + name.replace("_", "-")


def check_config(cfg: Config, world: int = 1):
    """Every option, before anything is loaded or written: ranges, choices, the forms of the model,
    codec, Whisper, reward and speaker specs, files that must exist, and what the options need of
    each other and of the `world` size. ConfigError ("--flag VALUE: why") on the first failing."""
    for name, (holds, what) in RANGES.items():
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag(name)} {value}: must be a finite number")
        if not holds(value):
            raise ConfigError(f"{flag(name)} {value}: must be {what}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            expected = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)!r}: expected one of {expected}")
    if cfg.lambda_c + cfg.lambda_n <= 0:
        weights = f"--lambda-c {cfg.lambda_c} --lambda-n {cfg.lambda_n}"
        raise ConfigError(f"{weights}: the reward needs a positive weight on one of them")
    try:
        lora.parse_targets(cfg.lora_targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_specs(cfg)
    check_together(cfg, world)


def check_specs(cfg: Config):
    """The named models, codec, reward, devices and files: each of a form that loads, each local
    path present (a Hugging Face Hub id is looked up only when loaded). ConfigError naming it."""
    problems = {"model": model_problem(cfg.model), "codec": codec_problem(cfg.codec),
                "speaker_model": speaker_problem(cfg.speaker_model),
                "whisper_device": device_problem(cfg.whisper_device, check_present=False)}
    if cfg.device != "auto":
        problems["device"] = device_problem(cfg.device, check_present=False)
    if cfg.reward == "whisper":
        problems["whisper"] = whisper_problem(cfg.whisper)
    else:
        problems["reward"] = function_problem(cfg.reward, "'whisper' or 'module:function'")
    problems["data"] = None if os.path.isfile(cfg.data) else "no such file"
    if cfg.val_data and not os.path.isfile(cfg.val_data):
        problems["val_data"] = "no such file ('' = no validation)"
    if not cfg.out:
        problems["out"] = "the run needs an output directory"
    elif os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        problems["out"] = "a file, not a directory"
    for name, why in problems.items():
        if why:
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)}: {why}")


def check_together(cfg: Config, world: int):
    """What the options need of each other and of the world size (ranks under torchrun)."""
    if cfg.fsdp and cfg.lora_rank and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 8):
        # FSDP2 before 2.8 wants one dtype per sharded group: the frozen bf16 base beside fp32 adapters
        raise ConfigError(f"--fsdp --lora-rank needs torch >= 2.8 (FSDP2 then allows a frozen bf16 "
                          f"base beside fp32 adapters); this is torch {torch.__version__}: upgrade "
                          "torch or drop --fsdp")
    if cfg.prompts_per_step % world:
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step}: must divide by the {world} "
                          "ranks (whole prompt groups live on one rank)")
    if cfg.fsdp and world < 2:
        raise ConfigError("--fsdp shards over ranks: run it under torchrun with "
                          "--nproc_per_node >= 2")
    if cfg.fsdp and cfg.compile:
        # CUDA graphs read weights at fixed addresses; FSDP2 gathers them into new memory at every
        # rollout and frees it after, so the graphs would be recorded again at every rollout.
        raise ConfigError("--fsdp --compile: the compiled decode step needs weights at fixed "
                          "addresses, and FSDP2 gathers them into new memory for every rollout; "
                          "drop --compile (FSDP runs use the eager decode loop)")
    if world > 1 and cfg.device not in ("auto", "cpu"):
        raise ConfigError(f"--device {cfg.device}: would put every rank on one device; under "
                          "torchrun use 'auto' (rank r on cuda:LOCAL_RANK) or 'cpu'")


def check_inputs(cfg: Config):
    """What the flags name, read before anything loads (grpo.py's start; check_config first): --out
    and --resume (outputs.resolve_resume), every row of --data and --val-data and their languages
    (data.load_data, naming file:line), and the devices on this machine. ConfigError on the first
    that fails."""
    import outputs
    try:
        outputs.resolve_resume(cfg.out, cfg.resume)
        data.load_data(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # each names a flag or file:line
        raise ConfigError(str(e)) from None
    for name in ("device", "whisper_device"):
        value = getattr(cfg, name)
        if value != "auto" and (why := device_problem(value)):
            raise ConfigError(f"{flag(name)} {value}: {why}")


def whisper_problem(name: str) -> str | None:
    """Why --whisper `name` is not a Whisper checkpoint file, name or 'random-tiny'; None if it
    is one."""
    if name == "random-tiny" or os.path.isfile(name):
        return None
    if os.sep in name or name.endswith(".pt"):
        return "no such checkpoint file"
    import whisper
    if name in whisper.available_models():
        return None
    return f"not a checkpoint file, 'random-tiny' or one of {', '.join(whisper.available_models())}"


def function_problem(spec: str, forms: str) -> str | None:
    """Why `spec` is not a 'module:function' whose module is on the Python path (found, not run: the
    function is looked up where it is loaded); `forms` says what the flag takes."""
    module, _, function = spec.partition(":")
    if not module or not function:
        return f"expected {forms}"
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that is missing, or a malformed name
        found = None
    return None if found else f"no module {module!r} on the Python path"


def speaker_problem(spec: str) -> str | None:
    """Why --speaker-model `spec` is none of the forms speaker.load_speaker_model takes; None if
    it may be one."""
    if spec in ("random-tiny", "wavlm-sv"):
        return None
    if spec.startswith("wavlm-sv:"):
        path = spec.partition(":")[2]
        if os.path.exists(path) or HUB_ID.fullmatch(path):
            return None
        return f"no such directory: {path}"
    if spec.endswith(".pth"):
        return None if os.path.isfile(spec) else "no such checkpoint file"
    forms = "'wavlm-sv[:PATH]', a Seed-TTS-eval .pth checkpoint, 'module:function' or 'random-tiny'"
    return function_problem(spec, forms)
