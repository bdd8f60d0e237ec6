"""The single-GPU acceptance run of `.ci/gpu-check`: `python gpu_check.py [--smoke] [--out DIR] [--parts a,b]`.
Seven parts, each in a process of its own under its own timeout (500 s in all at most on one H100/H200):
  a  the compiled decode step as the trainer builds it against the eager loop (gpu_check_decode.py), short
     prompts and clone-length ones reaching the last span: tokens, graphs, skips, ms/step vs the HBM bound
  b  real NCCL on a 1-rank group: the trainer's collectives; FSDP2 in bf16: gathered() + generate, the update
     against the replicated one, the full state dict, a distributed-checkpoint resume (gpu_check_fsdp.py)
  c  FSDP2 over 2 thread-ranks on one GPU (torch's threaded process group) against the replicated update
  d  peak memory of Llasa-1B replicated (full and LoRA r=16) and 3B/8B under FSDP2 (a fake 2/4-rank group)
     beside memory.py's: a ratio outside 0.75-1.25 fails
  e  one Llasa-1B-shaped grpo.Trainer step: phases, decoder_works, graphs, peak memory beside memory.py's
  f  Whisper large-v3 shapes (random weights) through WhisperScorer: batch 16 vs 64, prosody time
  g  FSDP2 + LoRA on a bf16 base over a real 1-rank group (gpu_check_fsdp.py): update vs replicated, base
     frozen and bf16, gathered + merged generate, the checkpoint (merged weights, PEFT adapter), a resume
JSON lines go to stdout and OUT/gpu-check.jsonl; the exit status is 1 if a part failed or timed out. --smoke:
the same code at tiny shapes on the CPU (gloo for NCCL, the 'eager' backend, a tiny Whisper), tested in the suite.
"""
import argparse
import contextlib
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

from gpu_check_decode import part_a
from gpu_check_fsdp import part_b, part_c, part_g

# part -> (timeout in seconds, what it checks), run in this order: a fills inductor's caches that e reuses
# (sized without a GPU measurement: 500 s in all, the whole run under 9 minutes)
PARTS = {"a": (165, "compiled decode == eager, graphs, skips, ms/step"), "b": (45, "NCCL on 1 rank, FSDP2 bf16"),
         "c": (40, "FSDP2 over 2 thread-ranks"), "d": (80, "peak memory vs memory.py"),
         "e": (90, "Llasa-1B trainer step"), "f": (45, "Whisper large-v3 batch 16 vs 64"),
         "g": (35, "FSDP2 + LoRA on a bf16 base, 1 rank")}
MEMORY_TOL = (0.75, 1.25)  # measured / predicted peak memory (d, e): outside, memory.py is wrong there


def emit(**row):
    print(json.dumps(row, default=str), flush=True)


# ----------------------------------------------------------------------------- d, e, f: memory, a step, Whisper

def part_d(dev, smoke):
    import gc
    import memory
    from bench_gpu import memory_case
    tiny = dict(vocab_size=1200, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    checks = {}
    for name, world, fsdp, mb, gcp, lora in [("llasa-1b", 1, False, 2, False, 0), ("llasa-1b", 1, False, 2, False, 16),
                                             ("llasa-3b", 2, True, 2, True, 0), ("llasa-8b", 4, True, 1, True, 0)]:
        shape = tiny if smoke else memory.LLASA_SHAPES[name]  # as the presets train them (LoRA: --lora-rank 16)
        row = memory_case(name, shape, world, fsdp, mb, gcp, dev, smoke, lora_rank=lora)
        case = name + (f"-lora{lora}" if lora else "")
        emit(name="gpu-check/d/" + case, **row)
        checks.update({f"{case}:{k[:-6]}": within(v) for k, v in row.items() if k.endswith("_ratio")})
        gc.collect()  # FSDP's modules hold cycles
        torch.cuda.empty_cache()
    return dict(note="[measured, predicted] GB: held (weights + AdamW state), and the rise of an update micro-batch, "
                     f"an AdamW step and a rollout call (measured on CUDA only); checks: ratios within {MEMORY_TOL}",
                checks=checks)


def within(ratio: float) -> bool:
    """A measured / predicted memory ratio memory.py may claim (MEMORY_TOL)."""
    return MEMORY_TOL[0] <= ratio <= MEMORY_TOL[1]


def part_e(dev, smoke):
    import memory
    from bench_gpu import grpo_step
    prompts, G, N = (2, 2, 6) if smoke else (4, 16, 256)  # the decode step built for 1500 new tokens, as the trainer's
    row, tr, metrics = grpo_step(dev, smoke, prompts, G, N, cache_tokens=8 if smoke else 1500)
    s = next(iter(tr.sampler.decoder.states.values()), None) if tr.sampler.decoder else None
    row.update(batch=tr.sampler.batch, cache_slots=s and s.cache.length,
               **{k: metrics[k] for k in ("loss", "grad_norm", "logp_mismatch", "logp_mismatch_max")})
    row["checks"] = dict(decoder_works=row["decoder_works"] is True, no_cudagraph_skips=row["cudagraph_skips"] == 0,
                         graph_per_span=row["graphs"] == len(row["spans_used"]),
                         finite=all(math.isfinite(row[k]) for k in ("loss", "grad_norm", "logp_mismatch")))
    if s is not None:  # memory.py at this step's shapes and cache (XCodec2's real shapes), no CUDA context
        c, R = tr.sampler.policy.lm.config, tr.sampler.batch
        P = max(len(tr.sampler.prompt(ex.text)) for ex in tr.examples)
        m = memory.training_memory(c, micro_batch=tr.cfg.micro_batch, seq_len=P + N, response_len=N, rollout_batch=R,
                                   rollout_len=P + N)
        kv = memory.kv_cache_bytes(c, R, s.cache.length) - m["decoder_cache"]
        row["predicted_gb"] = round((m["total"] + kv - m["cuda_context"]) / 1e9, 2)
        if "peak_mem_gb" in row:  # measured on CUDA only
            row["peak_ratio"] = round(row["peak_mem_gb"] / row["predicted_gb"], 3)
            row["checks"]["peak_within_tol"] = within(row["peak_ratio"])
    if not dev.type == "cuda":  # fp32 both ways: the rollout's log-probs are the update's
        row["checks"]["logp_mismatch_fp32"] = row["logp_mismatch_max"] < 1e-4
    return row


def part_f(dev, smoke):
    from concurrent.futures import ThreadPoolExecutor
    import prosody
    import scorer as scoring
    from bench_gpu import sample_clips, whisper_model
    n, batches = (4, (2, 4)) if smoke else (64, (16, 64))
    model, name = whisper_model(dev, smoke)
    audios, texts = sample_clips(n, smoke)
    row, out = dict(model=name, clips=n, audio_s=round(sum(map(len, audios)) / 16000, 1)), {}  # 3-8 s clips
    for bs in batches:
        sc = scoring.WhisperScorer(model, dev, "en", batch_size=bs, **(dict(max_transcript_tokens=8) if smoke else {}))
        sc.score(audios[:bs], texts[:bs])  # warm-up: kernels, cuDNN's choices
        t0 = time.perf_counter()
        out[bs] = sc.score(audios, texts)
        row[f"batch_{bs}_clips_per_s"] = round(n / (time.perf_counter() - t0), 2)
    times = [time.perf_counter()]
    for threads in (1, sc.prosody_threads):  # one thread, and the scorer's threads beside Whisper
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(prosody.measure, audios, texts))
        times.append(time.perf_counter())
    a, b = out[batches[0]], out[batches[1]]
    nll = max(abs(x.nll - y.nll) / max(abs(x.nll), 1e-6) for x, y in zip(a, b))
    row.update(speedup=round(row[f"batch_{batches[1]}_clips_per_s"] / row[f"batch_{batches[0]}_clips_per_s"], 2),
               prosody_ms_per_clip=round((times[1] - times[0]) / n * 1e3, 1), prosody_threads=sc.prosody_threads,
               prosody_wall_s=round(times[2] - times[1], 3), nll_max_rel_diff=nll,
               mean_transcript_chars=round(sum(len(s.transcript) for s in b) / n, 1))
    row["checks"] = dict(scored=all(s.error is None and math.isfinite(s.reward) for s in a + b),
                         batches_agree=nll <= (0.05 if dev.type == "cuda" else 1e-4))
    return row


# ----------------------------------------------------------------------------- the runner

def child(part: str, smoke: bool):
    """One part in this process, and its result line: status ok / failed / skipped, figures, checks."""
    t0, dev = time.time(), torch.device("cpu" if smoke else "cuda:0")
    torch.set_num_threads(1 if smoke else torch.get_num_threads())  # tiny shapes: more threads only contend
    try:
        parts = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f, "g": part_g}
        row = parts[part](dev, smoke)
        failed = [k for k, v in row.get("checks", {}).items() if not v]
        status = row.pop("status", "failed" if failed else "ok")
        row.update({"failed_checks": failed} if failed else {})
    except Exception as e:  # noqa: BLE001 -- the result line says what broke, the log has the traceback
        traceback.print_exc()
        status, row = "failed", dict(error=f"{type(e).__name__}: {e}"[:2000])
    emit(name=f"gpu-check/{part}", status=status, what=PARTS[part][1], **row, seconds=round(time.time() - t0, 1))


def run_part(part: str, args, timeout: float, out) -> str:
    """`gpu_check.py --part X` under `timeout` in a session of its own (killed whole on time-out, or when
    this process is told to stop): its JSON lines go to `out`, the rest to OUT/gpu-check-X.log. Its status."""
    log_path, t0, rows = os.path.join(args.out, f"gpu-check-{part}.log"), time.time(), []
    if timeout < 10:
        out(dict(name=f"gpu-check/{part}", status="timeout", error="no time left in --budget", seconds=0))
        return "timeout"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--part", part] + ["--smoke"] * args.smoke,
                                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
        signal.signal(signal.SIGTERM, lambda *_: (os.killpg(proc.pid, signal.SIGKILL), sys.exit(143)))

        def pump():  # result lines to `out` as they come, anything else the part prints to its log
            for line in proc.stdout:
                with contextlib.suppress(ValueError):
                    if isinstance(row := json.loads(line), dict):
                        rows.append(row)
                        out(row)
                        continue
                log.write(line)
        (reader := threading.Thread(target=pump, daemon=True)).start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    status = next((r.get("status") for r in rows if r.get("name") == f"gpu-check/{part}"), None)
    if status is None:
        status = "timeout" if time.time() - t0 >= timeout else "failed"  # killed for time, or died
        out(dict(name=f"gpu-check/{part}", status=status, what=PARTS[part][1], timeout_s=round(timeout),
                 error=f"no result line (exit status {proc.returncode})", seconds=round(time.time() - t0, 1)))
    if status in ("failed", "timeout"):
        tail = "\n".join(open(log_path, errors="replace").read().splitlines()[-25:])
        sys.stderr.write(f"--- gpu-check part {part}: {status}; the end of {log_path}:\n{tail}\n")
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the code paths, not the figures")
    p.add_argument("--out", default="gpu-check-out", help="folder for gpu-check.jsonl and each part's log")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    p.add_argument("--budget", type=float, default=sum(t for t, _ in PARTS.values()),
                   help="seconds for all parts (default: their timeouts' sum, 500); a part gets at most what is left")
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # one part, in this process
    args = p.parse_args(argv)
    if args.part:
        return child(args.part, args.smoke) or 0
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        p.error(f"unknown --parts {sorted(set(parts) - set(PARTS))}: expected some of {list(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device is visible; `python gpu_check.py --smoke` checks it on a CPU")
    import transformers
    os.makedirs(args.out, exist_ok=True)
    t0, jsonl = time.time(), open(os.path.join(args.out, "gpu-check.jsonl"), "w")

    def out(row):
        print(line := json.dumps(row, default=str), flush=True)
        jsonl.write(line + "\n")
        jsonl.flush()

    card = dict(card="cpu") if args.smoke else dict(card=torch.cuda.get_device_name(0), memory_gb=round(
        torch.cuda.get_device_properties(0).total_memory / 1e9, 1), cuda=torch.version.cuda)
    out(dict(name="gpu-check/setup", smoke=args.smoke, **card, torch=torch.__version__,
             transformers=transformers.__version__, python=sys.version.split()[0],
             timeouts={k: PARTS[k][0] for k in parts}, budget_s=args.budget))
    statuses = {part: run_part(part, args, min(PARTS[part][0], args.budget - (time.time() - t0)), out)
                for part in parts}
    bad = [k for k, v in statuses.items() if v in ("failed", "timeout")]
    out(dict(name="gpu-check/summary", status="failed" if bad else "ok", parts=statuses, failed=bad,
             seconds=round(time.time() - t0, 1)))
    jsonl.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
