"""Every check of a run's flags, in one place, before anything loads: `check_config` (each flag's
value, the forms of what it names, local paths present, what the flags need of each other and of
the world size) and `check_inputs` (what the flags name: data rows, --out and --resume, devices).
A failure is a ConfigError, one line naming the flag (or file:line) and the value.
"""

import importlib.util
import math
import os

import torch

import data
import dnsmos
import lora
from checks import HUB_ID, codec_problem, device_problem, model_problem
from loss import IMPORTANCE_LEVELS, LOSS_AGGS
from measures import DNSMOS_MEASURES, parse_guards
from presets import PRESETS


class ConfigError(ValueError):
    """A user's mistake in a flag or in an input it names, in one line naming the flag (or the
    file:line) and the value: parse_config exits with status 2, no traceback."""


# Each number's range (floats must also be finite): field -> (holds, what it must be).
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
RANGES = {
    "whisper_batch": AT_LEAST_1,
    "whisper_max_tokens": (lambda v: v >= 0, ">= 0 (0 = no cap)"),
    "whisper_threads": (lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    # Whisper's encoder has 50 positions per second: the window must be a whole number of them.
    "whisper_window": (
        lambda v: 0 < v <= 30 and abs(v * 50 - round(v * 50)) <= 1e-6,
        "a multiple of 0.02 s in (0, 30]",
    ),
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
    "sim_weight": (lambda v: v >= 0, ">= 0 (0 = off)"),
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
    "quality": ("", "dnsmos"),
}


def flag(name: str) -> str:
    """A Config field's flag: lora_rank -> --lora-rank."""
    return "--" + name.replace("_", "-")


def check_config(cfg, world: int = 1):
    """Every option of `cfg` (a config.Config), before anything is loaded or written: ranges,
    choices, the forms of the model, codec, Whisper, reward and speaker specs, files that must
    exist, and what the options need of each other and of the `world` size. ConfigError ("--flag
    VALUE: why") on the first failing."""
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
    check_measures(cfg)
    check_specs(cfg)
    check_together(cfg, world)


def check_measures(cfg):
    """--guard's specs, and what each guarded measure needs: DNSMOS guards --quality dnsmos, and
    --quality dnsmos its packages. ConfigError naming the flag."""
    try:
        guards = parse_guards(cfg.guard)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in guards:
        if name in DNSMOS_MEASURES and cfg.quality != "dnsmos":
            raise ConfigError(f"--guard {name}: needs --quality dnsmos (it measures {name})")
    if cfg.quality == "dnsmos":
        try:
            dnsmos.model_dir()
        except ImportError as e:
            raise ConfigError(f"--quality dnsmos: {e}") from None


def check_specs(cfg):
    """The named models, codec, reward, devices and files: each of a form that loads, each local
    path present (a Hugging Face Hub id is looked up only when loaded). ConfigError naming it."""
    problems = {
        "model": model_problem(cfg.model),
        "codec": codec_problem(cfg.codec),
        "speaker_model": speaker_problem(cfg.speaker_model),
        "whisper_device": device_problem(cfg.whisper_device, check_present=False),
    }
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


def check_together(cfg, world: int):
    """What the options need of each other and of the world size (ranks under torchrun)."""
    torch_version = tuple(int(x) for x in torch.__version__.split(".")[:2])
    if cfg.fsdp and cfg.lora_rank and torch_version < (2, 8):
        # FSDP2 before 2.8 wants one dtype per sharded group: a frozen bf16 base, fp32 adapters.
        raise ConfigError(
            f"--fsdp --lora-rank needs torch >= 2.8 (FSDP2 then allows a frozen bf16 "
            f"base beside fp32 adapters); this is torch {torch.__version__}: upgrade "
            "torch or drop --fsdp"
        )
    if cfg.prompts_per_step % world:
        raise ConfigError(
            f"--prompts-per-step {cfg.prompts_per_step}: must divide by the {world} "
            "ranks (whole prompt groups live on one rank)"
        )
    if cfg.fsdp and world < 2:
        raise ConfigError(
            "--fsdp shards over ranks: run it under torchrun with --nproc_per_node >= 2"
        )
    if cfg.fsdp and cfg.compile:
        # CUDA graphs read weights at fixed addresses; FSDP2 gathers them into new memory at every
        # rollout and frees it after, so the graphs would be recorded again at every rollout.
        raise ConfigError(
            "--fsdp --compile: the compiled decode step needs weights at fixed "
            "addresses, and FSDP2 gathers them into new memory for every rollout; "
            "drop --compile (FSDP runs use the eager decode loop)"
        )
    if world > 1 and cfg.device not in ("auto", "cpu"):
        raise ConfigError(
            f"--device {cfg.device}: would put every rank on one device; under "
            "torchrun use 'auto' (rank r on cuda:LOCAL_RANK) or 'cpu'"
        )


def check_inputs(cfg):
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
