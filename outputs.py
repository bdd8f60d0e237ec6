"""What a run writes and reads back (DESIGN.md §3): checkpoints and trainer state, the resume rules
for --out, samples to listen to, metrics.jsonl (the numbers in it: metrics.py).

Nothing is lost: a run never starts in an --out that holds another run unless asked to continue
it; checkpoints are written to PATH.tmp, fsynced (files, then the trainer state last, then the
directory) and renamed into place, so a crash at any moment leaves the previous checkpoint whole,
and a directory without trainer_state.pt is never taken for a checkpoint.
"""

import dataclasses
import json
import math
import os
import pickle
import re
import shutil

import torch

import lora
import parallel
from codec import SAMPLE_RATE
from metrics import clip_means, table_metrics  # noqa: F401 (re-exported: tests call outputs.*)
from plot import plot

STATE_FILE = "trainer_state.pt"  # written last: its presence marks a complete checkpoint
OPTIMIZER_DIR = "optimizer"  # with --fsdp: every rank's AdamW shard (torch distributed checkpoint)


class Refused(ValueError):
    """A checkpoint --resume must not load, refused before anything is loaded or written (a user's
    error: grpo.main prints the one line, exit status 2)."""


# ----------------------------------------------------------------------------------------------
# --out and --resume


def checkpoints(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints in OUT/checkpoints as (step, path), oldest first."""
    root = os.path.join(out, "checkpoints")
    found = []
    if not os.path.isdir(root):
        return found
    for name in os.listdir(root):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_resume(out: str, resume: str) -> str | None:
    """The checkpoint directory to continue from, or None to start fresh.

    resume '' refuses an --out that already holds a run (metrics or checkpoints), before anything
    is written; 'auto' takes the newest complete checkpoint there (None if there is none yet);
    anything else is a checkpoint directory, which must hold a trainer state, and continues into
    its own run's --out or one that holds no run: a resumed run rewrites --out's metrics past the
    checkpoint and its later checkpoints, which must not be another run's (FileExistsError)."""
    if resume == "auto":
        found = checkpoints(out)
        if not found:
            return None
        return found[-1][1]  # the newest one's path
    held = held_run(out)
    if resume:
        if not os.path.isfile(os.path.join(resume, STATE_FILE)):
            raise FileNotFoundError(
                f"--resume {resume}: no {STATE_FILE} there (expected OUT/checkpoints/step_N "
                "as written by a run; a directory without it is an incomplete checkpoint)"
            )
        home = run_of(resume)
        if held and home != os.path.realpath(out):
            raise FileExistsError(
                f"--resume {resume} is a checkpoint of {home or 'no run directory'}, but --out "
                f"{out} holds another run ({'; '.join(held)}). Nothing was written. Resume into "
                "the checkpoint's own run directory, or choose an --out that holds no run."
            )
        return resume
    if held:
        raise FileExistsError(
            f"--out {out} already holds a run ({'; '.join(held)}). Nothing "
            "was written. To continue it, add --resume auto; to start a new run, "
            "choose another --out (or move that directory away)."
        )
    return None


def held_run(out: str) -> list[str]:
    """What of a run --out holds, in words (metrics.jsonl's steps, checkpoints/); [] for none."""
    held = []
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as f:
            steps = sum(1 for line in f if line.strip())
        held.append(f"metrics.jsonl with {steps} steps")
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        first_names = sorted(os.listdir(ckpt_dir))[:5]
        held.append(f"checkpoints/ ({', '.join(first_names)})")
    return held


def run_of(checkpoint: str) -> str | None:
    """The run directory (real path) of checkpoint RUN/checkpoints/step_N; None when it is not
    laid out so (a copied checkpoint belongs to no run directory)."""
    parent = os.path.dirname(os.path.realpath(checkpoint))
    if os.path.basename(parent) != "checkpoints":
        return None
    return os.path.dirname(parent)


def read_trainer_state(path: str, cfg, world: int) -> dict:
    """The trainer state of checkpoint `path`, checked against this run's config and world size.

    Loaded on the CPU: optimizer.load_state_dict moves AdamW's moments to their parameters' device
    and keeps each `step` a CPU scalar, as a fresh AdamW has it (loaded onto the GPU, every step
    count would cost a host sync per parameter per step); the generator states are CPU tensors.
    Nothing in the checkpoint runs (load_plain); with --fsdp, neither does the optimizer shards'
    index (check_dcp_metadata). Refused: a checkpoint that is not plain data, or of another
    setup."""
    state = load_plain(os.path.join(path, STATE_FILE), f"--resume {path}")
    if cfg.fsdp:
        check_dcp_metadata(os.path.join(path, OPTIMIZER_DIR, ".metadata"), f"--resume {path}")
    if state["world_size"] != world:
        raise Refused(
            f"--resume {path}: checkpoint was written by {state['world_size']} ranks, "
            f"this run has {world}; the sampling streams cannot continue exactly"
        )
    keys = [
        "prompts_per_step",
        "group_size",
        "seed",
        "fsdp",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
    ]
    if cfg.lora_rank:  # LoRA: the adapter fits its base model only
        keys.append("model")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}  # (older checkpoints)
    for key in keys:
        was = state["config"].get(key, defaults[key])
        now = getattr(cfg, key)
        if key == "lora_targets":  # the same set in any order
            was = sorted(lora.parse_targets(was))
            now = sorted(lora.parse_targets(now))
        if was != now:
            raise Refused(
                f"--resume {path}: --{key.replace('_', '-')} was {was!r} in the "
                f"checkpoint, {now!r} now"
            )
    # A guard holds to the *initial* policy's median: one the checkpoint's run lacked was never
    # measured. (Older checkpoints named --prosody-guard and --sim-guard instead.)
    had = {spec.partition(":")[0] for spec in state["config"].get("guard", ())}
    if state["config"].get("prosody_guard"):
        had |= {"chars_per_s", "f0_std_semitones"}
    if state["config"].get("sim_guard"):
        had.add("sim")
    for spec in cfg.guard:
        name = spec.partition(":")[0]
        if name not in had:
            raise Refused(
                f"--resume {path}: --guard {name} is on, but the run that wrote the checkpoint "
                "had no such guard, so the initial policy's reference it holds to was never "
                f"measured; resume without --guard {name}, or start a new run with it"
            )
    return state


def load_plain(path: str, what: str) -> dict:
    """A trainer state file as plain data: torch.load(weights_only=True) takes tensors, numbers,
    strings, lists, tuples and dicts only, so nothing in the file runs as it loads (a pickled
    object would: a shared checkpoint could run any code). Refused, in one line naming `what`
    and the reason, when the file needs more, or is not a trainer state."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message is a paragraph: keep what it names
        named = re.search(r"GLOBAL (\S+)", str(e))
        why = "not a torch.save file"
        if named:
            why = f"it names {named.group(1)}"
        raise Refused(
            f"{what}: {os.path.basename(path)} is not plain data ({why}); refused "
            "without running anything in it (a trainer state holds tensors, numbers, "
            "strings, lists and dicts only)"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise Refused(f"{what}: {os.path.basename(path)} is not a trainer state (no 'step')")
    return state


# What a torch distributed checkpoint's .metadata (one pickle, which torch.distributed.checkpoint
# reads with pickle.load: anything in it would run) may name: its classes, sizes, layouts, paths.
_DCP = "torch.distributed.checkpoint."
_DCP_METADATA_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    (_DCP + "filesystem", "_StorageInfo"),
}
_DCP_GLOBALS |= {(_DCP + "metadata", name) for name in _DCP_METADATA_CLASSES}


class _DcpUnpickler(pickle.Unpickler):
    """Builds only _DCP_GLOBALS' classes and torch's dtypes; any other global is an error."""

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"GLOBAL {module}.{name}, which no distributed checkpoint index holds"
        )


def check_dcp_metadata(path: str, what: str):
    """Refuse (one line naming `what`) a distributed checkpoint index that names anything beyond
    what torch writes there, before torch.distributed.checkpoint unpickles it."""
    try:
        with open(path, "rb") as f:
            _DcpUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError) as e:
        raise Refused(
            f"{what}: {path} is not a plain distributed checkpoint index ({e}); refused "
            "without running anything in it"
        ) from None


# ----------------------------------------------------------------------------------------------
# Checkpoints


def tmp_path(path: str) -> str:
    """Where checkpoint `path` is written before it is renamed into place."""
    return path + ".tmp"


def begin_checkpoint(path: str):
    """An empty PATH.tmp, for writers that come before save_checkpoint (FSDP's optimizer shards)."""
    shutil.rmtree(tmp_path(path), ignore_errors=True)
    os.makedirs(tmp_path(path))


def save_checkpoint(
    path: str,
    policy,
    tokenizer,
    trainer_state: dict,
    *,
    weights: dict | None = None,
    keep_tmp: bool = False,
    extra=None,
):
    """A Hugging Face directory (model + tokenizer) plus trainer_state.pt, atomic and durable.

    Everything goes to PATH.tmp (kept as begin_checkpoint left it if keep_tmp); model and tokenizer
    files are fsynced, then the trainer state is written and fsynced last, then the directory; only
    then is it renamed into place (and the parent directory fsynced, so the rename itself survives
    a power cut). weights: the full state dict to write (FSDP gathers it, LoRA merges it; or a
    function returning it, called here), else the model's own. extra(folder): writes more files
    into the checkpoint (LoRA's adapter) before the fsyncs."""
    tmp = tmp_path(path)
    old = path + ".old"  # the previous checkpoint at `path`, until the new one is in place
    if not keep_tmp:
        begin_checkpoint(path)
    if callable(weights):
        weights = weights()
    dtype = None  # the weights' dtype, read first (save_pretrained may empty the dict)
    if weights:
        dtype = next(iter(weights.values())).dtype
    policy.save_pretrained(tmp, state_dict=weights)
    if dtype is not None:  # config.json names the parameters' dtype, which may not be the weights'
        config_dtype(os.path.join(tmp, "config.json"), dtype)
    tokenizer.save_pretrained(tmp)
    portable_tokenizer_config(os.path.join(tmp, "tokenizer_config.json"))
    if extra is not None:
        extra(tmp)
    for folder, _, names in sorted(os.walk(tmp)):
        for name in sorted(names):
            _fsync(os.path.join(folder, name))
        if folder != tmp:
            _fsync(folder)
    torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    _fsync(os.path.join(tmp, STATE_FILE))
    _fsync(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def save_everywhere(
    path: str,
    policy,
    optimizer,
    tokenizer,
    state: dict,
    d,
    fsdp: bool,
    *,
    weights: dict | None = None,
    extra=None,
):
    """Checkpoint `path`; every rank calls it. policy: llama.LogProbs (its .lm is the Hugging Face
    model); weights and extra as save_checkpoint takes them (on rank 0: under FSDP the caller has
    gathered the weights there). With FSDP every rank writes its optimizer shard; rank 0 writes the
    Hugging Face directory and the trainer state (save_checkpoint)."""
    if fsdp:
        with d.together(f"preparing checkpoint {path}"):
            if d.rank == 0:
                begin_checkpoint(path)
        parallel.save_sharded_optimizer(
            os.path.join(tmp_path(path), OPTIMIZER_DIR), policy, optimizer
        )
    with d.together(f"writing checkpoint {path}"):
        if d.rank == 0:
            save_checkpoint(
                path, policy.lm, tokenizer, state, weights=weights, keep_tmp=fsdp, extra=extra
            )


def _fsync(path: str):
    """Flush a file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_dtype(path: str, dtype: torch.dtype):
    """Set a Hugging Face config.json's dtype (`dtype`, and 4.x's `torch_dtype` where present) to
    the weights' own: LoRA writes fp32 merged weights from a bf16 base, which "auto" loading must
    keep."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def portable_tokenizer_config(path: str):
    """transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x (and LLASA's usual
    inference code on it) cannot load; "PreTrainedTokenizerFast" loads on both."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# metrics.jsonl and samples


def open_metrics(out: str, start_step: int) -> str:
    """OUT/metrics.jsonl ready for appending: on a resumed run, the lines past `start_step` (and a
    line torn by a crash) are dropped, since those steps are run again. Returns its path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.jsonl")
    keep = []
    if start_step and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            keep = [line for line in f if _step_of(line) <= start_step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)
    return path


def write_step(d, out: str, metrics_path: str | None, reporter, metrics: dict, samples: dict):
    """A step's metrics (metrics.jsonl, --report-to's reporter, metrics.png) and samples/<name> for
    each name in `samples` (rank 0's clips), written by rank 0; every rank calls it (a collective:
    a failed write stops every rank)."""
    with d.together(f"writing step {metrics['step']}'s metrics and samples"):
        if d.rank == 0:
            append_metrics(metrics_path, metrics)
            reporter.log(metrics, samples)  # and the first validation clips
            plot(metrics_path)
            for name, shown in samples.items():
                save_samples(os.path.join(out, "samples", name), **shown)


def append_metrics(path: str, metrics: dict):
    """One line of metrics.jsonl; a non-finite number (a skipped step's loss) is written null."""
    finite = {name: _json_number(value) for name, value in metrics.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(finite, allow_nan=False) + "\n")


def _json_number(value):
    """`value`, or None for a non-finite float (strict JSON has no NaN or inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def save_samples(folder: str, audios, texts, scores, finished):
    """Wavs to listen to, with samples.jsonl: text, every field of the clip's Score, finished,
    seconds."""
    import soundfile as sf

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "samples.jsonl"), "w", encoding="utf-8") as f:
        for i, (audio, text, score, fin) in enumerate(zip(audios, texts, scores, finished)):
            sf.write(os.path.join(folder, f"{i}.wav"), audio, SAMPLE_RATE)
            row = {
                "wav": f"{i}.wav",
                "text": text,
                **dataclasses.asdict(score),
                "finished": bool(fin),
                "seconds": len(audio) / SAMPLE_RATE,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
