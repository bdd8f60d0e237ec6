"""bench.py, bench_gpu.py: the GPU benchmark's CPU dry run, and its refusal without CUDA."""

import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO


def test_bench_gpu_smoke_runs_on_cpu():
    """`bench.py gpu --smoke`: every part of the GPU benchmark at tiny shapes on a CPU, one JSON
    line each and no error line (the script's crashes show up here, not on a rented GPU)."""
    import json

    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "tools.bench", "gpu", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows and not [x for x in rows if "error" in x], r.stdout + r.stderr[-3000:]
    names = {x["name"] for x in rows}
    assert {"gpu/decode", "gpu/decode_ratios", "gpu/grpo_step", "gpu/reward"} <= names, names
    assert {x["engine"] for x in rows if x["name"] == "gpu/decode"} == {
        "ours_eager",
        "ours_compiled",
        "hf_generate",
        "hf_static_compiled",
    }
    print(f"bench.py gpu --smoke: {time.time() - t0:.1f} s")


def test_bench_gpu_without_cuda_says_so(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.syspath_prepend(REPO)
    from tools import bench

    with pytest.raises(SystemExit, match="no CUDA device is visible"):  # before any model is built
        bench.main(["gpu"])
    assert capsys.readouterr().out == ""


def test_bench_reward_compares_the_verified_scorer_in_one_run(capsys, monkeypatch):
    """`bench.py reward`: the verified scorer against its whisper.decode path and the encoder alone,
    in one JSON line, with the draft's accepted fraction and the transcripts found equal; speech
    that says its text (--texts heard) takes one decoder call, every token from the draft."""
    import json
    import os

    from helpers import ASSETS

    if not os.path.isfile(os.path.join(ASSETS, "whisper-tiny.en.pt")):
        pytest.skip(f"{ASSETS}/whisper-tiny.en.pt not found (set TEST_ASSETS)")
    monkeypatch.syspath_prepend(REPO)
    monkeypatch.setenv("TEST_ASSETS", ASSETS)
    from tools import bench

    rows = []
    for texts in ("given", "heard"):
        bench.main(["reward", "--clips", "2", "--window", "6", "--threads", "1", "--texts", texts])
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert row["transcripts_equal_whisper_decode"] is True and row["texts"] == texts
        assert row["fraction_of_encoder_bound"] > 0 and row["ratio_over_whisper_decode"] > 0
        assert "seed_clips_per_s" not in row  # the seed heard 30 s windows only
        rows.append(row)
    assert rows[0]["draft_accepted_fraction"] < 1 < rows[0]["decoder_calls_per_run"]
    assert rows[1]["draft_accepted_fraction"] == 1.0 and rows[1]["decoder_calls_per_run"] == 1
