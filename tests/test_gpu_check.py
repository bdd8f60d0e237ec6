"""tools.gpu_check: the single-GPU acceptance run's CPU dry run (`--smoke`), so that the script
cannot rot between the rare runs on a rented GPU: every part runs its code at tiny shapes, each in
its own process, and the figures that must hold on any device hold."""

import json
import os
import subprocess
import sys
import time

from helpers import REPO
from tools import gpu_check


def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path):
    t0 = time.time()
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "tools.gpu_check", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    with open(out / "gpu-check.jsonl") as f:  # the same lines in $OUT
        assert [json.loads(line) for line in f] == rows
    parts = {x["name"].removeprefix("gpu-check/"): x for x in rows if x["name"].count("/") == 1}
    assert set(parts) == {"setup", "a", "b", "c", "d", "e", "f", "g", "summary"}, sorted(parts)
    for name in "abcdefg":
        x = parts[name]
        # A CPU can skip only what it cannot run, and then says why; nothing may fail.
        assert x["status"] == "ok" or (x["status"] == "skipped" and x.get("reason")), x
        assert not x.get("failed_checks"), x
        assert all(x.get("checks", {}).values()), x
    assert parts["summary"]["status"] == "ok"
    assert parts["summary"]["failed"] == []
    a, b, e = parts["a"], parts["b"], parts["e"]
    # (a) the compiled step (eager backend) and the eager loop: the same tokens; one graph per span
    # used; clone-length prompts reach the cache's last span, compiling only spans not used before
    assert a["tokens_equal"] is True, a
    assert a["graphs"] == len(a["spans_used"]) >= 2, a
    assert a["cudagraph_skips"] == 0
    assert a["recompiled_in_timed_runs"] == 0
    late = a["late"]
    assert late["tokens_equal"] is True, late
    assert max(late["spans_used"]) == late["cache_slots"] == a["cache_slots"], late
    assert late["graphs"] == len(set(late["spans_used"]) - set(a["spans_used"])) >= 1
    assert late["prompt_len"][0] > 256
    # (b) FSDP2 on a 1-rank mesh equals the replicated update, a resumed one the uninterrupted one
    assert b["update_rel_err"] < 1e-4, b
    assert b["resume_step_max"] > 0, b
    assert b["resume_max_diff"] <= 1e-6, b
    # (c) FSDP2 over two thread-ranks, when torch's threaded group can run it here
    if parts["c"]["status"] == "ok":
        assert parts["c"]["update_rel_err"] < 1e-4, parts["c"]
    # (d) one row per memory case beside tools.memory's prediction, each ratio a check
    cases = {
        x["name"].removeprefix("gpu-check/d/"): x
        for x in rows
        if x["name"].startswith("gpu-check/d/")
    }
    assert set(cases) == {"llasa-1b", "llasa-1b-lora16", "llasa-3b", "llasa-8b"}, sorted(cases)
    assert cases["llasa-1b-lora16"]["lora_rank"] == 16
    assert set(parts["d"]["checks"]) >= {f"{c}:held" for c in cases}
    # (e) the trainer's compiled decode step worked (no fallback to the eager loop)
    assert e["decoder_works"] is True, e
    assert e["graphs"] == len(e["spans_used"]), e
    # (g) FSDP2 + LoRA on a bf16 base: the replicated update, only adapters trained, the base
    # untouched, the checkpoint's adapter read back, a resume equal to the uninterrupted run
    g = parts["g"]
    if g["status"] == "ok":  # skipped only on torch < 2.8 (FSDP2 wants one dtype per group there)
        assert g["base_dtype"] == "bf16", g
        assert g["update_rel_err"] < 1e-4, g
        assert g["trained_tensors"] > 0, g
        assert g["resume_step_max"] > 0, g
        assert g["resume_max_diff"] <= 1e-6, g
        assert g["checks"]["adapter_round_trip"], g
        assert g["checks"]["base_frozen"], g
    assert sum(t for t, _ in gpu_check.PARTS.values()) <= 500  # the whole run under 9 minutes
    assert all(os.path.exists(out / f"gpu-check-{p}.log") for p in "abcdefg")
    print(f"python -m tools.gpu_check --smoke: {time.time() - t0:.1f} s")


def test_a_memory_ratio_outside_its_tolerance_fails_part_d(monkeypatch, capsys):
    """(d): tools.memory's prediction off by more than 25% (either way) for any case and phase is a
    failed check, and the part's status says so."""
    from tools import gpu_check_memory

    ratios = iter(
        [
            dict(held_ratio=1.0, update_ratio=1.24),
            dict(held_ratio=1.3),
            dict(step_ratio=0.7),
            dict(held_ratio=0.76),
        ]
    )
    monkeypatch.setattr(
        gpu_check_memory,
        "memory_case",
        lambda name, *args, lora_rank=0: dict(model=name, **next(ratios)),
    )
    gpu_check.child("d", smoke=True)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    d = rows[-1]
    assert d["name"] == "gpu-check/d", d
    assert d["status"] == "failed", d
    assert d["failed_checks"] == ["llasa-1b-lora16:held", "llasa-3b:step"], d
    assert gpu_check.within(1.25)
    assert gpu_check.within(0.75)
    assert not gpu_check.within(1.26)
