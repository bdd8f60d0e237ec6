"""The single-GPU acceptance run of `.ci/gpu-check`:
`python -m tools.gpu_check [--smoke] [--out DIR] [--parts a,b] [--budget S]`, from the repository
root. Seven parts, each in a process of its own under its own timeout (PARTS; 500 s in all at most):
  a  the compiled decode step as the trainer builds it against the eager loop
     (tools/gpu_check_decode.py), short prompts and clone-length ones reaching the last span:
     tokens, graphs, skips, ms/step vs the HBM bound
  b  real NCCL on a 1-rank group: the trainer's collectives; FSDP2 in bf16: gathered() + generate,
     the update against the replicated one, the full state dict, a distributed-checkpoint resume
     (tools/gpu_check_fsdp.py)
  c  FSDP2 over 2 thread-ranks on one GPU (torch's threaded process group) against the replicated
     update
  d  peak memory of Llasa-1B replicated (full and LoRA r=16) and 3B/8B under FSDP2 (a fake 2/4-rank
     group) beside tools.memory's (tools/gpu_check_memory.py): a ratio outside 0.75-1.25 fails
  e  one Llasa-1B-shaped grpo.Trainer step: phases, decoder_works, graphs, peak memory beside
     tools.memory's
  f  Whisper large-v3 shapes (random weights) through WhisperScorer: batch 16 vs 64, prosody time
  g  FSDP2 + LoRA on a bf16 base over a real 1-rank group (tools/gpu_check_lora.py): update vs
     replicated, base frozen and bf16, gathered + merged generate, the checkpoint (merged weights,
     PEFT adapter), a resume
JSON lines go to stdout and OUT/gpu-check.jsonl, each part's other output to OUT/gpu-check-X.log;
the exit status is 1 if a part failed or timed out. --smoke: the same code at tiny shapes on the
CPU (gloo for NCCL, the 'eager' backend, a tiny Whisper), tested in the suite.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

import torch

from tools import gpu_check_memory, memory
from tools.gpu_builders import grpo_step, sample_clips, whisper_model
from tools.gpu_check_decode import part_a
from tools.gpu_check_fsdp import part_b, part_c
from tools.gpu_check_lora import part_g
from tools.gpu_check_memory import MEMORY_TOL, within

# part -> (timeout in seconds, what it checks), run in this order: a fills inductor's caches that
# e reuses (sized without a GPU measurement: 500 s in all, the whole run under 9 minutes)
PARTS = {
    "a": (165, "compiled decode == eager, graphs, skips, ms/step"),
    "b": (45, "NCCL on 1 rank, FSDP2 bf16"),
    "c": (40, "FSDP2 over 2 thread-ranks"),
    "d": (80, "peak memory vs tools.memory"),
    "e": (90, "Llasa-1B trainer step"),
    "f": (45, "Whisper large-v3 batch 16 vs 64"),
    "g": (35, "FSDP2 + LoRA on a bf16 base, 1 rank"),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the parts' working folder


def emit(**row):
    """Print one JSON result line."""
    print(json.dumps(row, default=str), flush=True)


# ----------------------------------------------------------------------------- d, e, f


def part_d(dev, smoke):
    """Every memory case (gpu_check_memory.CASES) on its own line, gpu-check/d/<case>; one check
    per case and phase."""
    checks = {}
    for name, world, fsdp, mb, gcp, lora in gpu_check_memory.CASES:
        if smoke:
            shape = gpu_check_memory.TINY_SHAPE
        else:
            shape = memory.LLASA_SHAPES[name]
        row = gpu_check_memory.memory_case(
            name, shape, world, fsdp, mb, gcp, dev, smoke, lora_rank=lora
        )
        case = f"{name}-lora{lora}" if lora else name
        emit(name="gpu-check/d/" + case, **row)
        for key, ratio in row.items():
            if key.endswith("_ratio"):
                checks[f"{case}:{key.removesuffix('_ratio')}"] = within(ratio)
        gc.collect()  # FSDP's modules hold cycles
        torch.cuda.empty_cache()
    return dict(
        note="[measured, predicted] GB: held (weights + AdamW state), and the rise of an update "
        "micro-batch, an AdamW step and a rollout call (measured on CUDA only); checks: ratios "
        f"within {MEMORY_TOL}",
        checks=checks,
    )


def part_e(dev, smoke):
    """One Llasa-1B-shaped trainer step (tiny in smoke runs): its figures, and its peak memory
    beside tools.memory's at the step's shapes."""
    if smoke:
        prompts, G, N = 2, 2, 6
    else:
        prompts, G, N = 4, 16, 256
    # the decode step built for 1500 new tokens, as the trainer's
    row, tr, metrics = grpo_step(dev, smoke, prompts, G, N, cache_tokens=8 if smoke else 1500)
    s = None
    if tr.sampler.decoder:
        s = next(iter(tr.sampler.decoder.states.values()), None)
    losses = ("loss", "grad_norm", "logp_mismatch", "logp_mismatch_max")
    row.update(
        batch=tr.sampler.batch,
        cache_slots=s and s.cache.length,
        **{k: metrics[k] for k in losses},
    )
    row["checks"] = dict(
        decoder_works=row["decoder_works"] is True,
        no_cudagraph_skips=row["cudagraph_skips"] == 0,
        graph_per_span=row["graphs"] == len(row["spans_used"]),
        finite=all(math.isfinite(row[k]) for k in ("loss", "grad_norm", "logp_mismatch")),
    )
    if s is not None:  # tools.memory at this step's shapes and cache (XCodec2's), no CUDA context
        c = tr.sampler.policy.lm.config
        R = tr.sampler.batch
        P = max(len(tr.sampler.prompt(ex.text)) for ex in tr.examples)
        m = memory.training_memory(
            c,
            micro_batch=tr.cfg.micro_batch,
            seq_len=P + N,
            response_len=N,
            rollout_batch=R,
            rollout_len=P + N,
        )
        kv = memory.kv_cache_bytes(c, R, s.cache.length) - m["decoder_cache"]
        row["predicted_gb"] = round((m["total"] + kv - m["cuda_context"]) / 1e9, 2)
        if "peak_mem_gb" in row:  # measured on CUDA only
            row["peak_ratio"] = round(row["peak_mem_gb"] / row["predicted_gb"], 3)
            row["checks"]["peak_within_tol"] = within(row["peak_ratio"])
    if dev.type != "cuda":  # fp32 both ways: the rollout's log-probs are the update's
        row["checks"]["logp_mismatch_fp32"] = row["logp_mismatch_max"] < 1e-4
    return row


def part_f(dev, smoke):
    """Whisper large-v3 shapes through WhisperScorer at two batch sizes (clips/s, the same NLLs),
    and prosody's time per clip on one thread and on the scorer's threads."""
    from concurrent.futures import ThreadPoolExecutor

    import prosody
    import scorer as scoring

    if smoke:
        n, batches = 4, (2, 4)
    else:
        n, batches = 64, (16, 64)
    model, name = whisper_model(dev, smoke)
    audios, texts = sample_clips(n, smoke)  # 3-8 s clips
    row = dict(model=name, clips=n, audio_s=round(sum(map(len, audios)) / 16000, 1))
    out = {}  # batch size -> the Scores
    cap = dict(max_transcript_tokens=8) if smoke else {}
    for bs in batches:
        sc = scoring.WhisperScorer(model, dev, "en", batch_size=bs, **cap)
        sc.score(audios[:bs], texts[:bs])  # warm-up: kernels, cuDNN's choices
        t0 = time.perf_counter()
        out[bs] = sc.score(audios, texts)
        row[f"batch_{bs}_clips_per_s"] = round(n / (time.perf_counter() - t0), 2)
    times = [time.perf_counter()]
    for threads in (1, sc.prosody_threads):  # one thread, and the scorer's threads beside Whisper
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(prosody.measure, audios, texts))
        times.append(time.perf_counter())
    small = out[batches[0]]
    large = out[batches[1]]
    nll = max(abs(x.nll - y.nll) / max(abs(x.nll), 1e-6) for x, y in zip(small, large))
    speedup = row[f"batch_{batches[1]}_clips_per_s"] / row[f"batch_{batches[0]}_clips_per_s"]
    row.update(
        speedup=round(speedup, 2),
        prosody_ms_per_clip=round((times[1] - times[0]) / n * 1e3, 1),
        prosody_threads=sc.prosody_threads,
        prosody_wall_s=round(times[2] - times[1], 3),
        nll_max_rel_diff=nll,
        mean_transcript_chars=round(sum(len(s.transcript) for s in large) / n, 1),
    )
    row["checks"] = dict(
        scored=all(s.error is None and math.isfinite(s.reward) for s in small + large),
        batches_agree=nll <= (0.05 if dev.type == "cuda" else 1e-4),
    )
    return row


# ----------------------------------------------------------------------------- the runner


def child(part: str, smoke: bool):
    """One part in this process, and its result line: status ok / failed / skipped, figures,
    checks."""
    t0 = time.time()
    dev = torch.device("cpu" if smoke else "cuda:0")
    if smoke:  # tiny shapes: more threads only contend
        torch.set_num_threads(1)
    parts = {
        "a": part_a,
        "b": part_b,
        "c": part_c,
        "d": part_d,
        "e": part_e,
        "f": part_f,
        "g": part_g,
    }
    try:
        row = parts[part](dev, smoke)
        failed = [k for k, v in row.get("checks", {}).items() if not v]
        status = row.pop("status", "failed" if failed else "ok")
        if failed:
            row["failed_checks"] = failed
    except Exception as e:  # the result line says what broke, the log has the traceback
        traceback.print_exc()
        status = "failed"
        row = dict(error=f"{type(e).__name__}: {e}"[:2000])
    seconds = round(time.time() - t0, 1)
    emit(name=f"gpu-check/{part}", status=status, what=PARTS[part][1], **row, seconds=seconds)


def run_part(part: str, args, timeout: float, out) -> str:
    """`python -m tools.gpu_check --part X` under `timeout` in a session of its own (killed whole on
    time-out, or when this process is told to stop): its JSON lines go to `out`, the rest to
    OUT/gpu-check-X.log. Returns its status: ok, skipped, failed or timeout."""
    log_path = os.path.join(args.out, f"gpu-check-{part}.log")
    t0 = time.time()
    rows = []
    if timeout < 10:
        out(
            dict(
                name=f"gpu-check/{part}",
                status="timeout",
                error="no time left in --budget",
                seconds=0,
            )
        )
        return "timeout"
    command = [sys.executable, "-m", "tools.gpu_check", "--part", part]
    if args.smoke:
        command.append("--smoke")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
            cwd=REPO,
        )

        def stop(*_):  # told to stop: the part's whole session goes with this process
            os.killpg(proc.pid, signal.SIGKILL)
            sys.exit(143)

        signal.signal(signal.SIGTERM, stop)

        def pump():  # result lines to `out` as they come, anything else the part prints to its log
            for line in proc.stdout:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict):
                        rows.append(row)
                        out(row)
                        continue
                log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    result = f"gpu-check/{part}"
    status = next((r.get("status") for r in rows if r.get("name") == result), None)
    if status is None:  # killed for time, or died
        status = "timeout" if time.time() - t0 >= timeout else "failed"
        out(
            dict(
                name=result,
                status=status,
                what=PARTS[part][1],
                timeout_s=round(timeout),
                error=f"no result line (exit status {proc.returncode})",
                seconds=round(time.time() - t0, 1),
            )
        )
    if status in ("failed", "timeout"):
        with open(log_path, errors="replace") as f:
            tail = "\n".join(f.read().splitlines()[-25:])
        sys.stderr.write(f"--- gpu-check part {part}: {status}; the end of {log_path}:\n{tail}\n")
    return status


def parse_args(argv) -> tuple[argparse.Namespace, list[str]]:
    """The flags and the parts to run; a bad flag or part exits with argparse's usage error."""
    p = argparse.ArgumentParser(
        prog="python -m tools.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU: the code paths, not the figures",
    )
    p.add_argument(
        "--out", default="gpu-check-out", help="folder for gpu-check.jsonl and each part's log"
    )
    p.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=sum(t for t, _ in PARTS.values()),
        help="seconds for all parts (default: their timeouts' sum, 500); a part gets at most what "
        "is left",
    )
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # one, in this process
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown and not args.part:
        p.error(f"unknown --parts {unknown}: expected some of {list(PARTS)}")
    return args, parts


def main(argv=None) -> int:
    """Run one part (--part, in this process) or every part of --parts in turn; returns the exit
    status: 1 if a part failed or timed out."""
    args, parts = parse_args(argv)
    if args.part:
        return child(args.part, args.smoke) or 0
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "tools.gpu_check: no CUDA device is visible; `python -m tools.gpu_check --smoke` "
            "checks it on a CPU"
        )
    import transformers

    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if args.smoke:
        card = dict(card="cpu")
    else:
        props = torch.cuda.get_device_properties(0)
        card = dict(
            card=torch.cuda.get_device_name(0),
            memory_gb=round(props.total_memory / 1e9, 1),
            cuda=torch.version.cuda,
        )
    with open(os.path.join(args.out, "gpu-check.jsonl"), "w") as jsonl:

        def out(row):
            line = json.dumps(row, default=str)
            print(line, flush=True)
            jsonl.write(line + "\n")
            jsonl.flush()

        out(
            dict(
                name="gpu-check/setup",
                smoke=args.smoke,
                **card,
                torch=torch.__version__,
                transformers=transformers.__version__,
                python=sys.version.split()[0],
                timeouts={k: PARTS[k][0] for k in parts},
                budget_s=args.budget,
            )
        )
        statuses = {}
        for part in parts:
            left = args.budget - (time.time() - t0)
            statuses[part] = run_part(part, args, min(PARTS[part][0], left), out)
        bad = [k for k, v in statuses.items() if v in ("failed", "timeout")]
        out(
            dict(
                name="gpu-check/summary",
                status="failed" if bad else "ok",
                parts=statuses,
                failed=bad,
                seconds=round(time.time() - t0, 1),
            )
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
