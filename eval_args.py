"""eval.py's command line: its flags (parse_args), every check a flag or --data gets before
anything is loaded or written (check_args, read_data), loading what a flag names with a one-line
refusal (load), the language a row without one gets, and run.json's record of a run's flags.
A user's error is results.Refused: one line naming the flag, file:line or value, exit status 2.
"""

import argparse
import math
import os

import data
from results import Refused


def parse_args(argv=None):
    """eval.py's flags (argparse: a bad or missing flag exits with status 2)."""
    p = argparse.ArgumentParser(
        description="Synthesize (--model) or take (--wavs) a test set and score it."
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--model",
        help="checkpoint directory or hub id to synthesize with ('tiny': random, offline)",
    )
    what.add_argument(
        "--wavs", help="folder of existing clips, DIR/<id>.wav per row (any system's output)"
    )
    what.add_argument(
        "--compare",
        nargs=2,
        metavar=("DIR_A", "DIR_B"),
        help="compare two eval outputs: B - A per metric, paired by id",
    )
    p.add_argument("--data", help="our JSONL, a .txt, or a Seed-TTS-eval list (meta.lst)")
    p.add_argument("--out", help="output folder (results.jsonl, summary.json; wavs/ with --model)")
    p.add_argument(
        "--asr",
        default="large-v3",
        help="openai-whisper name or checkpoint path, or module:function (audio float32 16 kHz, "
        "language -> transcript) (default: large-v3)",
    )
    p.add_argument(
        "--reward-whisper",
        default=None,
        help="Whisper (name or path) for the reward when --asr is a module:function "
        "(default: no reward)",
    )
    p.add_argument(
        "--language",
        default=None,
        help="language of rows without one (default: none; English-only "
        "Whisper: en). zh, ja, ko, th, yue are rated by CER, the rest by WER",
    )
    p.add_argument(
        "--speaker-model",
        default=None,
        help="speaker model for SIM (wavlm-sv[:PATH], Seed-TTS-eval's .pth, module:function); "
        "default none",
    )
    p.add_argument(
        "--quality",
        choices=["dnsmos"],
        default=None,
        help="speech quality per row: dnsmos (DNSMOS P.835 SIG, BAK, OVRL and P.808; needs "
        "pip install speechmos onnxruntime); default none",
    )
    p.add_argument(
        "--codec", default="xcodec2", help="with --model: 'xcodec2[:PATH]', 'tone', 'words[:PATH]'"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="with --model: sampling temperature (default 0.8, LLASA's); 0 = greedy",
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (default 1.0 = off)"
    )
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="repetition penalty, > 0 (default 1.0 = none)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=1500,
        help="speech tokens per clip, 50 per s (default 1500)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed, and --compare's bootstrap seed. Each batch is seeded (--seed + the "
        "index of its first row), so sampled output (--temperature > 0) repeats for the same "
        "--seed, --batch-size and world size (a resumed run batches the rows left differently)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--device", default=None, help="default: cuda (the rank's) if available, else cpu"
    )
    p.add_argument("--resamples", type=int, default=10000, help="--compare's bootstrap resamples")
    return p.parse_args(argv)


CODECS = ("xcodec2", "tone", "words", "xcodec2-package")


def check_args(args):
    """Every flag and input path, before anything is loaded or written: Refused naming the flag."""
    for name in ("batch_size", "resamples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise Refused(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise Refused(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise Refused(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise Refused(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        raise Refused(f"--repetition-penalty must be > 0 (1 = none), got {args.repetition_penalty}")
    if args.compare:
        for d in args.compare:
            if not os.path.isfile(os.path.join(d, "results.jsonl")):
                raise Refused(f"--compare: no results.jsonl in {d}")
        return
    if not args.data or not args.out:
        raise Refused("--data and --out are needed with --model or --wavs")
    if not os.path.isfile(args.data):
        raise Refused(f"--data {args.data}: no such file")
    if args.wavs and not os.path.isdir(args.wavs):
        raise Refused(f"--wavs {args.wavs}: no such folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise Refused(f"--out {args.out} is a file, not a folder")
    if args.model and args.codec.partition(":")[0] not in CODECS:
        raise Refused(
            f"--codec {args.codec!r}: expected 'tone', 'words[:PATH]', 'xcodec2[:PATH]' "
            "or 'xcodec2-package[:PATH]'"
        )
    if args.reward_whisper and not is_function(args.asr):
        raise Refused(
            f"--reward-whisper {args.reward_whisper!r} is for a module:function --asr; "
            f"the Whisper --asr {args.asr!r} gives the reward itself"
        )
    from scorer import language_code

    try:
        language_code(args.language or "en")
    except ValueError as e:
        raise Refused(f"--language: {e}") from None
    import torch

    try:
        device = torch.device(args.device or "cpu")
    except RuntimeError as e:
        raise Refused(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Refused(f"--device {args.device!r}: CUDA is not available here")
    if args.quality == "dnsmos":
        import dnsmos

        try:
            dnsmos.model_dir()  # finds the packages without loading them
        except ImportError as e:
            raise Refused(f"--quality dnsmos: {e}") from None


def fail(flag: str, value, e: Exception):
    """Stop with one line naming what could not be loaded and the flag for a local copy."""
    why = (str(e).splitlines() or [type(e).__name__])[0].replace("--whisper", flag)
    hint = "" if flag in why else f" (point {flag} at a local copy)"  # the error may say it already
    raise Refused(f"cannot load {flag} {value!r}: {why}{hint}")


def load(flag, value, fn):
    """fn(), or Refused naming flag and value (fail) when loading raises OSError, ValueError,
    ImportError, AttributeError or RuntimeError."""
    try:
        return fn()
    except (OSError, ValueError, ImportError, AttributeError, RuntimeError) as e:
        fail(flag, value, e)


def is_function(spec: str) -> bool:
    """A module:function spec, not a path (an existing file, or a drive's C:\\...)."""
    return ":" in spec and not os.path.exists(spec) and spec[1:3] != ":\\"


def english_only(asr: str) -> bool:
    """An English-only Whisper, by its name (tiny.en, path/whisper-tiny.en.pt): rows without a
    language are en."""
    if is_function(asr):
        return False
    name = os.path.basename(asr.rstrip("/\\")).removesuffix(".pt")
    return name.endswith(".en")


def default_language(args) -> str | None:
    """The language of rows without one: --language, else en with an English-only Whisper."""
    if args.language:
        return args.language
    if english_only(args.asr):
        return "en"
    return None


def check_languages(examples, args):
    """Stop, before any model is loaded, at the first row with no language when none is implied:
    Seed-TTS-eval lists carry none, and test-zh rated by WER would be mis-scored silently."""
    if args.language or english_only(args.asr):
        return
    for ex in examples:
        if not ex.language:
            raise Refused(
                f"{ex.source}: row {ex.id!r} has no language and --language is not "
                "given; pass --language (e.g. --language en, or zh for a Chinese list)"
            )


def read_data(args) -> list:
    """--data's examples, refused (Refused) where an id appears twice (naming both file:lines) or
    a row has no language (check_languages). Prompt audio is checked per row later
    (eval.check_rows)."""
    try:
        examples = data.load_dataset(args.data, check_prompts=False)
    except (OSError, ValueError) as e:
        raise Refused(f"--data: {e}") from None
    first = {}
    for ex in examples:  # an id names its wav and its results row: two rows would share both
        if ex.id in first:
            raise Refused(
                f"--data: id {ex.id!r} appears twice, {first[ex.id]} and {ex.source}; "
                "give every row its own id"
            )
        first[ex.id] = ex.source
    check_languages(examples, args)
    return examples


def run_record(args) -> dict:
    """What produces --out's results (run.json): a rerun into that --out must repeat it."""

    def where(value):  # a path absolute, so that a rerun from another folder compares equal
        return os.path.abspath(value) if value and os.path.exists(value) else value

    from scorer import language_code

    language = default_language(args)  # as eval.check_rows has it
    if language is not None:
        language = language_code(language)  # 'English' and 'en' alike
    record = {
        "model": where(args.model),
        "wavs": where(args.wavs),
        "asr": where(args.asr),
        "reward_whisper": where(args.reward_whisper),
        "speaker_model": where(args.speaker_model),
        "language": language,
        "quality": args.quality,
    }
    if args.model:  # what --wavs ignores
        record.update(
            codec=where(args.codec),
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
    return record
