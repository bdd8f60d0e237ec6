"""Input checks, before any work: `sample.generate`'s arguments and the command line's flags.

`check_*` raise on a caller's bad argument to `generate` (ValueError; TypeError for a model that
is not a Llama). On the command line a user's mistake is one line naming the flag and the value,
found before anything loads: `CLIParser` makes argparse's own errors one line, and each
`*_problem` returns why a value cannot work, or None. The spec checks (`model_problem`,
`codec_problem`, `device_problem`) are shared by sample.py's CLI (`cli_problem`) and the trainer's
config.check_config.
"""

import argparse
import math
import os
import re

import torch

# ----------------------------------------------------------------------------- generate's arguments
# A caller's bug: an exception with a traceback, before any work.


def check_model(model):
    """TypeError unless `model` is a Llama-family *ForCausalLM."""
    llama_like = hasattr(getattr(model, "model", None), "rotary_emb")
    if not llama_like or not hasattr(model, "lm_head"):
        raise TypeError(
            "generate needs a Llama-family *ForCausalLM (model.model.rotary_emb, lm_head), "
            f"got {type(model).__name__}"
        )


def check_prompts(model, prompts, max_new_tokens: int):
    """ValueError unless every prompt holds ids of the vocabulary and fits the context with
    `max_new_tokens` more."""
    vocab = model.lm_head.out_features
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(
                f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
            )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    max_pos = model.config.max_position_embeddings
    if longest + max_new_tokens > max_pos:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {max_pos} (max_position_embeddings); shorten the prompt or "
            "max_new_tokens"
        )


def check_knobs(temperature: float, top_p: float, top_k: int, repetition_penalty: float):
    """ValueError for a sampling knob out of its range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


def check_ids(model, stop_ids, allowed_ids):
    """ValueError for stop or allowed ids outside the vocabulary, an empty `allowed_ids`, or a
    stop id it lacks."""
    vocab = model.lm_head.out_features
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long)
    # allowed_ids may hold 65,537 ids on the GPU: checked as one CPU tensor, never id by id.
    allowed = None
    if torch.is_tensor(allowed_ids):
        allowed = allowed_ids.cpu().long()
    elif allowed_ids is not None:
        allowed = torch.as_tensor(list(allowed_ids), dtype=torch.long)
    for name, ids in (("stop_ids", stop), ("allowed_ids", allowed)):
        if ids is None:
            continue
        bad = ids[(ids < 0) | (ids >= vocab)].tolist()
        if bad:
            raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if allowed is None:
        return
    if allowed.numel() == 0:
        raise ValueError("allowed_ids is empty: no token could be generated")
    missing = [int(t) for t in stop_ids if not bool((allowed == int(t)).any())]
    if missing:
        raise ValueError(f"stop ids {missing} are not in allowed_ids, so no row could ever stop")


# ----------------------------------------------------------------------------- the command line

# A Hugging Face Hub id, 'org/name' or 'name': never a path with two '/' or one that starts '.'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
CODEC_KINDS = ("words", "xcodec2", "xcodec2-package")  # the kinds that take an optional :PATH


class CLIParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `PROG: error: MESSAGE`, exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def model_problem(name: str) -> str | None:
    """Why --model `name` cannot name a model ('tiny', 'demo', a Hugging Face directory or a Hub
    id); None if it may (a Hub id is looked up only when loaded)."""
    if name in ("tiny", "demo"):
        return None
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "config.json")):
            return None
        return "a directory without config.json (not a Hugging Face model directory)"
    if os.path.exists(name):
        return "a file; expected a Hugging Face model directory or Hub id"
    if HUB_ID.fullmatch(name):
        return None
    return "no such directory (nor a Hugging Face Hub id such as HKUSTAudio/Llasa-1B)"


def codec_problem(spec: str) -> str | None:
    """Why --codec `spec` names no codec that codec.load_codec knows; None if it may (PATH, when
    given, must exist; a Hub id is looked up only when loaded)."""
    kind, _, path = spec.partition(":")
    if spec == "tone":
        return None
    if kind not in CODEC_KINDS:
        return "expected 'tone', 'words[:PATH]', 'xcodec2[:PATH]' or 'xcodec2-package[:PATH]'"
    if not path or os.path.exists(path):
        return None
    if kind != "words" and HUB_ID.fullmatch(path):
        return None
    return f"no such file or directory: {path}"


def device_problem(name: str, check_present: bool = True) -> str | None:
    """Why `name` is not a device to run on: 'cpu', 'cuda' or 'cuda:N' (with `check_present`, a
    CUDA device this machine has); None if it is."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return "expected 'cpu', 'cuda' or 'cuda:N'"
    if not check_present or device.type == "cpu":
        return None
    count = 0
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
    if count == 0:
        return "no CUDA device is visible on this machine"
    if (device.index or 0) >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def audio_problem(path: str) -> str | None:
    """Why `path` is not a sound file to read (missing, unreadable, empty); None if it is one."""
    import soundfile

    if not os.path.isfile(path):
        return "no such file"
    try:
        frames = soundfile.info(path).frames
    except Exception as e:  # any reason it cannot be read, said in the line
        return f"cannot be read ({e})"
    if frames == 0:
        return "empty (no audio frames)"
    return None


def cli_problem(args) -> str | None:
    """The first of sample.py's arguments that cannot work, as one line naming the flag and value;
    None if all may. Nothing is loaded (the model's context is checked once it is)."""
    import soundfile

    if not args.text.strip():
        return f"--text {args.text!r}: nothing to say"
    folder = os.path.dirname(args.out) or "."
    if not os.path.isdir(folder):
        return f"--out {args.out}: no such directory {folder}"
    extension = os.path.splitext(args.out)[1][1:].upper()
    if extension not in soundfile.available_formats():
        return f"--out {args.out}: expected a sound file name such as out.wav"
    if (args.prompt_wav is None) != (args.prompt_text is None):
        return "--prompt-wav and --prompt-text: voice cloning needs both"
    if args.prompt_wav is not None and (why := audio_problem(args.prompt_wav)):
        return f"--prompt-wav {args.prompt_wav}: {why}"
    if args.prompt_text is not None and not args.prompt_text.strip():
        return f"--prompt-text {args.prompt_text!r}: empty"
    if why := number_problem(args):
        return why
    specs = [
        ("--model", args.model, model_problem),
        ("--codec", args.codec, codec_problem),
        ("--device", args.device, device_problem),
    ]
    for flag, value, problem in specs:
        if why := problem(value):
            return f"{flag} {value}: {why}"
    return None


def number_problem(args) -> str | None:
    """The first of sample.py's numeric flags that is out of range or not finite, as one line;
    None if all are in range."""
    penalty = args.repetition_penalty
    # (flag, value, in range, the range in words)
    numbers = [
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1 = off)"),
        ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = off)"),
        ("--repetition-penalty", penalty, penalty > 0, "> 0 (1 = off)"),
        ("--max-context", args.max_context, args.max_context >= 1, ">= 1"),
    ]
    if args.max_new_tokens is not None:
        ok = args.max_new_tokens >= 1
        what = ">= 1 (unset: the context left)"
        numbers.append(("--max-new-tokens", args.max_new_tokens, ok, what))
    for flag, value, ok, what in numbers:
        if not math.isfinite(value):
            return f"{flag} {value}: must be a finite number"
        if not ok:
            return f"{flag} {value}: must be {what}"
    return None
