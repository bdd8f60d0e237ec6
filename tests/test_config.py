"""config.py: flags, presets and their checks; train.sh."""
import dataclasses
import os
import subprocess

import pytest

import config
from helpers import REPO


def test_config_rejects_values_that_would_fail_later():
    for flags in (["--temperature", "0"], ["--save-every", "0"], ["--micro-batch", "0"],
                  ["--loss-agg", "sum"]):
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
    assert cfg.group_size == 8 and cfg.scale_rewards is False and cfg.codec == "tone"


def test_large_presets_shard_and_need_ranks(monkeypatch):
    """llasa-3b/8b shard with FSDP2 and recompute activations; under one process --fsdp is refused
    with a message that says how to run it."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name, micro in (("llasa-3b", 2), ("llasa-8b", 1)):
        cfg = config.parse_config(["--preset", name])
        assert cfg.fsdp and cfg.grad_checkpointing and cfg.micro_batch == micro
        assert cfg.max_new_tokens == 1500 and cfg.model == f"HKUSTAudio/Llasa-{name[-2:].upper()}"
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
    run = lambda *args, **extra: subprocess.run(["bash", os.path.join(REPO, "train.sh"), *args], env={**env, **extra},
                                               capture_output=True, text=True, check=True).stdout
    out = run("--steps", "3")
    assert "CUDA_VISIBLE_DEVICES=0,1,2 " in out and "--nproc_per_node=2" in out
    assert "--preset llasa-1b --whisper-device cuda:2 --out runs/llasa-1b --steps 3" in out
    out = run("llasa-8b", "--language", "ko", NPROC="4")
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4 " in out and "--nproc_per_node=4" in out
    assert "--preset llasa-8b --whisper-device cuda:4 --out runs/llasa-8b --language ko" in out


def test_fsdp_with_compile_is_refused():
    cfg = config.Config(fsdp=True, compile=True)
    with pytest.raises(ValueError, match="--fsdp --compile"):
        config.check_config(cfg, world=2)


def test_llasa_presets_use_the_seeds_adamw_weight_decay():
    """The seed's AdamW had weight decay 0.01 (the llasa presets once ran 0.0); the other presets keep 0."""
    assert config.parse_config(["--preset", "llasa-1b"]).weight_decay == 0.01
    for preset in ("llasa-3b", "llasa-8b"):  # FSDP presets: parsed alone they would need torchrun
        assert config.PRESETS[preset]["weight_decay"] == 0.01, preset
    assert config.parse_config(["--preset", "tiny"]).weight_decay == 0.0
