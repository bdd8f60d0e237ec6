"""config.py: flags, presets and their checks (a user's error: one line, exit 2, before anything
loads); train.sh."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import config
import grpo
from helpers import REPO


def test_config_rejects_values_that_would_fail_later():
    for flags in (
        ["--temperature", "0"],
        ["--save-every", "0"],
        ["--micro-batch", "0"],
        ["--loss-agg", "sum"],
    ):
        with pytest.raises(SystemExit):
            config.parse_config(["--preset", "tiny", *flags])


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(config.Config):
        assert "--" + f.name.replace("_", "-") in text
    assert text.count("(default:") >= len(dataclasses.fields(config.Config))
    cfg = config.parse_config(["--preset", "tiny", "--group-size", "8", "--no-scale-rewards"])
    assert cfg.group_size == 8
    assert cfg.scale_rewards is False
    assert cfg.codec == "tone"


def test_large_presets_shard_and_need_ranks(monkeypatch):
    """llasa-3b/8b shard with FSDP2 and recompute activations; under one process --fsdp is refused
    with a message that says how to run it."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name, micro in (("llasa-3b", 2), ("llasa-8b", 1)):
        cfg = config.parse_config(["--preset", name])
        assert cfg.fsdp
        assert cfg.grad_checkpointing
        assert cfg.micro_batch == micro
        assert cfg.max_new_tokens == 1500
        assert cfg.model == f"HKUSTAudio/Llasa-{name[-2:].upper()}"
    assert not config.parse_config(["--preset", "llasa-1b"]).fsdp
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit):
        config.parse_config(["--preset", "llasa-8b"])
    with pytest.raises(ValueError, match="--fsdp shards over ranks"):
        config.check_config(config.Config(fsdp=True), world=1)


def test_train_sh_takes_the_preset_and_the_gpu_count(tmp_path):
    """train.sh with a stand-in torchrun that prints what it was given."""
    fake = tmp_path / "torchrun"
    fake.write_text('#!/usr/bin/env bash\necho "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"

    def run(*args, **extra):
        return subprocess.run(
            ["bash", os.path.join(REPO, "train.sh"), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    out = run("--steps", "3")
    assert "CUDA_VISIBLE_DEVICES=0,1,2 " in out
    assert "--nproc_per_node=2" in out
    assert "--preset llasa-1b --whisper-device cuda:2 --out runs/llasa-1b --steps 3" in out
    out = run("llasa-8b", "--language", "ko", NPROC="4")
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4 " in out
    assert "--nproc_per_node=4" in out
    assert "--preset llasa-8b --whisper-device cuda:4 --out runs/llasa-8b --language ko" in out


def test_fsdp_with_compile_is_refused():
    cfg = config.Config(fsdp=True, compile=True)
    with pytest.raises(ValueError, match="--fsdp --compile"):
        config.check_config(cfg, world=2)


# ---- a user's error: one line naming the flag, exit status 2, before anything loads -------------

# (flags after `--preset tiny --out TMP/run`, what the one line must say). TMP is the test's folder:
# TMP/bad.jsonl has a bad line 2, TMP/afile is a file, TMP/held holds a run.
BAD_FLAGS = [
    # found by review: a traceback, some after the policy and Whisper had loaded, or a run
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k -1: must be >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be > 0"),
    (["--codec", "bogus"], "--codec bogus: expected 'tone', 'words[:PATH]'"),
    (["--lr", "-1"], "--lr -1.0: must be >= 0"),
    (["--worker-timeout", "0"], "--worker-timeout 0.0: must be > 0"),
    (["--resume", "TMP/nope"], "--resume TMP/nope: no trainer_state.pt there"),
    (["--data", "TMP/nope.jsonl"], "--data TMP/nope.jsonl: no such file"),
    (["--kl-coef", "-1"], "--kl-coef -1.0: must be >= 0"),
    (["--n-samples", "-1"], "--n-samples -1: must be >= 0"),
    # more numbers
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--group-size", "1"], "--group-size 1: must be >= 2"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--warmup-steps", "-1"], "--warmup-steps -1: must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be >= 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be >= 0"),
    (["--beta-c", "0"], "--beta-c 0.0: must be > 0"),
    (["--tau-n", "inf"], "--tau-n inf: must be a finite number"),
    (["--lambda-c", "0", "--lambda-n", "0"], "--lambda-c 0.0 --lambda-n 0.0: the reward needs"),
    (["--whisper-threads", "-1"], "--whisper-threads -1: must be >= 0"),
    (["--whisper-window", "0.015"], "--whisper-window 0.015: must be a multiple of 0.02 s"),
    (["--micro-batch", "0"], "--micro-batch 0: must be >= 1"),
    (["--tis-cap", "0.5"], "--tis-cap 0.5: must be 0 (off) or >= 1"),
    # choices and forms
    (["--loss-agg", "sum"], "--loss-agg 'sum': expected one of 'token-mean'"),
    (["--preset", "nope"], "--preset nope: expected one of tiny,"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--lora-targets", ","], "--lora-targets ',': expected comma-separated names"),
    (["--model", "./nope"], "--model ./nope: no such directory"),
    (["--model", "TMP/afile"], "--model TMP/afile: a file"),
    (["--codec", "words:TMP/nope.npz"], "--codec words:TMP/nope.npz: no such file"),
    (["--whisper", "nope"], "--whisper nope: not a checkpoint file, 'random-tiny' or one of"),
    (["--whisper", "TMP/nope.pt"], "--whisper TMP/nope.pt: no such checkpoint file"),
    (["--reward", "no_such_module_26:f"], "--reward no_such_module_26:f: no module"),
    (["--reward", "peak"], "--reward peak: expected 'whisper' or 'module:function'"),
    (["--speaker-model", "TMP/nope.pth"], "--speaker-model TMP/nope.pth: no such checkpoint file"),
    (["--speaker-model", "bogus"], "--speaker-model bogus: expected 'wavlm-sv[:PATH]'"),
    (["--device", "tpu"], "--device tpu: expected 'cpu', 'cuda' or 'cuda:N'"),
    (["--whisper-device", "cuda:x"], "--whisper-device cuda:x: expected 'cpu', 'cuda' or 'cuda:N'"),
    (["--val-data", "TMP/nope"], "--val-data TMP/nope: no such file"),
    (["--out", "TMP/afile"], "--out TMP/afile: a file, not a directory"),
    (["--fsdp"], "--fsdp shards over ranks"),
    # what the flags name (check_inputs)
    (["--data", "TMP/bad.jsonl"], "TMP/bad.jsonl:2: expected an object with a string field 'text'"),
    (["--language", "klingon"], "--language: language 'klingon' is not one Whisper"),
    (["--out", "TMP/held"], "--out TMP/held already holds a run"),
    (["--device", "cuda:0"], "--device cuda:0: no CUDA device is visible"),
    (["--whisper-device", "cuda"], "--whisper-device cuda: no CUDA device is visible"),
]


@pytest.fixture
def no_training(tmp_path, monkeypatch):
    """grpo.main's inputs in TMP, torch seeing no GPU, and a train() that fails the test if it is
    reached; returns (base argv, TMP, the configs train was given)."""
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reached = []
    monkeypatch.setattr(grpo, "train", reached.append)
    return ["--preset", "tiny", "--out", str(tmp_path / "run")], str(tmp_path), reached


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_exit_2_before_anything_loads(no_training, capsys, flags, message):
    base, tmp, reached = no_training
    with pytest.raises(SystemExit) as stop:
        grpo.main(base + [f.replace("TMP", tmp) for f in flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert not reached, err
    assert err.startswith(f"grpo.py: error: {message.replace('TMP', tmp)}")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_good_flags_reach_training(no_training):
    base, _, reached = no_training
    clone_data = os.path.join(REPO, "data", "clone", "train.jsonl")
    grpo.main(base + ["--resume", "auto", "--data", clone_data])
    assert len(reached) == 1
    assert reached[0].resume == "auto"


def test_every_number_has_a_range_and_every_preset_passes():
    fields = dataclasses.fields(config.Config)
    numbers = {f.name for f in fields if f.type in (int, float, float | None)}
    assert numbers == set(config.RANGES)
    for name, preset in config.PRESETS.items():
        world = 2 if preset.get("fsdp") else 1
        config.check_config(config.Config(preset=name, **preset), world=world)


def test_cli_bad_flag_exits_2_in_one_line(tmp_path):
    """The real command line: one line on stderr, status 2, nothing loaded or written."""
    argv = ["grpo.py", "--preset", "tiny", "--out", str(tmp_path / "run"), "--top-p", "0"]
    r = subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert (r.returncode, r.stdout) == (2, ""), r.stderr[-2000:]
    assert r.stderr == "grpo.py: error: --top-p 0.0: must be in (0, 1] (1 = off)\n"
    assert not (tmp_path / "run").exists()


def test_llasa_presets_use_the_seeds_adamw_weight_decay():
    """The seed's AdamW had weight decay 0.01 (llasa presets once ran 0.0); other presets keep 0."""
    assert config.parse_config(["--preset", "llasa-1b"]).weight_decay == 0.01
    for preset in ("llasa-3b", "llasa-8b"):  # FSDP presets: parsed alone they would need torchrun
        assert config.PRESETS[preset]["weight_decay"] == 0.01, preset
    assert config.parse_config(["--preset", "tiny"]).weight_decay == 0.0
