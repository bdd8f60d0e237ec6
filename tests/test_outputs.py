"""outputs.py: checkpoints, the --out and --resume rules, metrics.

Runs name `test_grpo:tone_reward` as their --reward (the Whisper worker imports test_grpo)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import grpo
import models
import outputs
import parallel
import scorer as scoring
from helpers import _ScriptedScorer, _tiny, noise, read_jsonl
from reward import Score

# ---- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_loads_to_identical_logits(tmp_path):
    tok = data.tiny_tokenizer(n_speech=64)
    model = models.tiny_llama(len(tok), seed=5)
    path = str(tmp_path / "ckpt")
    outputs.save_checkpoint(path, model, tok, {"step": 1})
    # overwriting an existing checkpoint is atomic too
    outputs.save_checkpoint(path, model, tok, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([data.prompt_ids(AutoTokenizer.from_pretrained(path), "Hello there.")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)["step"] == 2
    with open(os.path.join(path, "tokenizer_config.json")) as f:  # loadable by transformers 4.x too
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_checkpoint_is_durable_trainer_state_last(tmp_path, monkeypatch):
    tok = data.tiny_tokenizer(n_speech=8)
    model = models.tiny_llama(len(tok), seed=0)
    events = []
    real_fsync = outputs._fsync
    real_replace = os.replace
    monkeypatch.setattr(
        outputs,
        "_fsync",
        lambda p: (events.append(("fsync", os.path.relpath(p, tmp_path))), real_fsync(p)),
    )
    monkeypatch.setattr(
        outputs.os,
        "replace",
        lambda a, b: (events.append(("rename", os.path.relpath(a, tmp_path))), real_replace(a, b)),
    )
    outputs.save_checkpoint(str(tmp_path / "ckpt"), model, tok, {"step": 1})
    synced = [p for kind, p in events if kind == "fsync"]
    files = [p for p in synced if p.startswith("ckpt.tmp/")]
    assert "ckpt.tmp/model.safetensors" in files
    assert "ckpt.tmp/tokenizer_config.json" in files
    assert files[-1] == "ckpt.tmp/trainer_state.pt"  # written and synced after every other file
    rename = events.index(("rename", "ckpt.tmp"))
    assert events[rename - 1] == ("fsync", "ckpt.tmp")  # the directory itself, before the rename
    assert events[rename + 1] == ("fsync", ".")  # and the parent, so the rename is durable
    assert outputs.checkpoints(str(tmp_path / "x")) == []


# ---- --out and --resume --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--reward", "test_grpo:tone_reward", "--guard", "chars_per_s", "--guard", "f0_median_hz"],
        ["--reward", "test_grpo:half_flat_reward", "--dynamic-sampling"],
    ],
)
def test_resume_continues_exactly(tmp_path, flags):
    """Resume from a run's step-2 checkpoint: steps 3-4 equal the uninterrupted run's (with
    --dynamic-sampling too: its refill prompts are a function of the step)."""
    common = [*flags, "--val-data", "", "--kl-coef", "0.04", "--save-every", "2"]
    full = grpo.train(_tiny(tmp_path / "a", *common, "--steps", "4"))
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_2"
    resumed = grpo.train(_tiny(tmp_path / "b", *common, "--steps", "4", "--resume", str(ckpt)))
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("reward_mean", "loss", "kl", "entropy", "response_len", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a.get("dyn_rounds") == b.get("dyn_rounds")
        # the guard's initial medians, kept
        refs = {k: v for k, v in a.items() if k.startswith("ref_")}
        assert refs == {k: v for k, v in b.items() if k.startswith("ref_")}
        assert bool(refs) == ("--guard" in flags)
    if "--dynamic-sampling" in flags:
        assert any(m["dyn_rounds"] > 1 for m in full)  # refill rounds ran, and resumed the same
    lines = read_jsonl(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [m["step"] for m in lines] == [3, 4]


@pytest.mark.parametrize("guard", ["sim", "dnsmos_ovrl:0.2", "f0_median_hz"])
def test_resume_refuses_a_guard_the_checkpointed_run_did_not_measure(tmp_path, guard):
    """A guard keeps the initial policy's medians: turned on at --resume, they were not measured.
    A guard the run had resumes (with another band too: the reference is the same median)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    before = _tiny(tmp_path, "--guard", "chars_per_s")
    state = {"step": 2, "world_size": 1, "config": dataclasses.asdict(before)}
    torch.save(state, ckpt / outputs.STATE_FILE)
    assert outputs.read_trainer_state(str(ckpt), before, 1)["world_size"] == 1
    wider = _tiny(tmp_path, "--guard", "chars_per_s:5")
    assert outputs.read_trainer_state(str(ckpt), wider, 1)["step"] == 2
    name = guard.partition(":")[0]
    quality = ["--quality", "dnsmos"] if name.startswith("dnsmos") else []
    after = _tiny(tmp_path, "--guard", "chars_per_s", "--guard", guard, *quality)
    with pytest.raises(ValueError, match=f"--guard {name} is on, but the run that wrote the"):
        outputs.read_trainer_state(str(ckpt), after, 1)


def test_resume_reads_an_older_checkpoints_prosody_guard(tmp_path):
    """A checkpoint from before --guard (prosody_guard, sim_guard in its config) resumes with
    the guards it measured, and refuses one it did not."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = dataclasses.asdict(_tiny(tmp_path))
    del config["guard"]
    config["prosody_guard"] = True
    torch.save({"step": 2, "world_size": 1, "config": config}, ckpt / outputs.STATE_FILE)
    old_guards = _tiny(tmp_path, "--guard", "chars_per_s", "--guard", "f0_std_semitones")
    assert outputs.read_trainer_state(str(ckpt), old_guards, 1)["step"] == 2
    with pytest.raises(ValueError, match="--guard sim is on"):
        outputs.read_trainer_state(str(ckpt), _tiny(tmp_path, "--guard", "sim"), 1)


def test_out_holding_a_run_is_refused_and_resume_auto_continues(tmp_path, capsys):
    common = [
        "--reward",
        "test_grpo:tone_reward",
        "--val-data",
        "",
        "--save-every",
        "1",
        "--sample-every",
        "9",
    ]
    grpo.train(_tiny(tmp_path, *common, "--steps", "2"))
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(
        FileExistsError, match=r"already holds a run \(metrics.jsonl with 2 steps; checkpoints/"
    ):
        grpo.train(_tiny(tmp_path, *common, "--steps", "3"))
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing was touched
    # An incomplete checkpoint (no trainer state) is never picked.
    (run / "checkpoints" / "step_7").mkdir()
    resumed = grpo.train(_tiny(tmp_path, *common, "--steps", "3", "--resume", "auto"))
    assert [m["step"] for m in resumed] == [3]
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    capsys.readouterr()
    assert grpo.train(_tiny(tmp_path, *common, "--steps", "3", "--resume", "auto")) == []
    assert "already complete" in capsys.readouterr().out
    # A fresh --out with --resume auto simply starts.
    assert (
        len(grpo.train(_tiny(tmp_path / "new", *common, "--steps", "1", "--resume", "auto"))) == 1
    )


def _fake_run(out, steps: int):
    """An --out holding a run: metrics.jsonl with `steps` lines and checkpoint step_1 (a trainer
    state file, nothing else). Returns the checkpoint's path."""
    ckpt = out / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1}, ckpt / outputs.STATE_FILE)
    lines = [json.dumps({"step": i + 1}) + "\n" for i in range(steps)]
    (out / "metrics.jsonl").write_text("".join(lines))
    return ckpt


def test_resume_into_an_out_holding_another_run_is_refused(tmp_path, capsys, monkeypatch):
    """--resume A/checkpoints/step_1 --out B, B holding a run: one line naming both, exit 2, and
    nothing of B touched; into A itself (by any path to it), or into an empty --out, it goes on."""
    ckpt = _fake_run(tmp_path / "a", 3)
    other = tmp_path / "b"
    _fake_run(other, 2)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        grpo.main(["--preset", "tiny", "--out", str(other), "--resume", str(ckpt)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"--out {other} holds another run" in err[0], err
    assert f"--resume {ckpt} is a checkpoint of {tmp_path / 'a'}," in err[0], err
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    assert outputs.resolve_resume(str(tmp_path / "a"), str(ckpt)) == str(ckpt)  # its own run
    monkeypatch.chdir(tmp_path)
    assert outputs.resolve_resume("a/", "./a/checkpoints/step_1") == "./a/checkpoints/step_1"
    assert outputs.resolve_resume(str(tmp_path / "new"), str(ckpt)) == str(ckpt)  # a fresh --out
    copied = tmp_path / "copy"  # a checkpoint outside any run's checkpoints/: only a fresh --out
    copied.mkdir()
    torch.save({"step": 1}, copied / outputs.STATE_FILE)
    with pytest.raises(FileExistsError, match="is a checkpoint of no run directory"):
        outputs.resolve_resume(str(tmp_path / "a"), str(copied))


class _Payload:
    """Unpickled, it would write `marker`: what a shared checkpoint could do to whoever loads it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _no_worker(monkeypatch):
    """grpo.train/main in this process without the Whisper worker (a scorer never called)."""

    class Unused:
        def score(self, *a, **kw):
            raise AssertionError("nothing is scored before the checkpoint is read")

        def close(self):
            pass

    monkeypatch.setattr(parallel, "start_scorer", lambda *a, **kw: (None, Unused()))


def test_resume_runs_no_code_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    """A trainer state with a pickled payload is refused in one line (exit 2) and the payload never
    runs; a plain one (tensors, numbers, strings, lists, dicts) loads as before."""
    marker = tmp_path / "ran"
    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    cfg = _tiny(tmp_path)
    state = {"step": 1, "world_size": 1, "config": dataclasses.asdict(cfg)}
    state["payload"] = _Payload(marker)
    torch.save(state, ckpt / outputs.STATE_FILE)
    with pytest.raises(outputs.Refused, match=r"trainer_state.pt is not plain data \(it names exe"):
        outputs.read_trainer_state(str(ckpt), cfg, 1)
    _no_worker(monkeypatch)
    with pytest.raises(SystemExit) as e:
        grpo.main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--resume", "auto"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"grpo.py: --resume {ckpt}: trainer_state.pt is not plain data"), err
    assert not marker.exists()  # the payload never ran
    state["payload"] = [torch.zeros(2), {"a": (1, 2.5, "x", None)}]
    torch.save(state, ckpt / outputs.STATE_FILE)
    assert outputs.read_trainer_state(str(ckpt), cfg, 1)["payload"][1] == {"a": (1, 2.5, "x", None)}


def test_fsdp_optimizer_index_runs_no_code(tmp_path):
    """--fsdp's optimizer shards: torch.distributed.checkpoint unpickles their index (.metadata)
    with pickle.load; one torch wrote passes the check, one with a payload is refused unrun."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    ckpt = tmp_path / "ckpt"
    shards = str(ckpt / outputs.OPTIMIZER_DIR)
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=shards)
    cfg = dataclasses.replace(_tiny(tmp_path), fsdp=True)  # (check_config wants 2 ranks for --fsdp)
    state = {"step": 1, "world_size": 1, "config": dataclasses.asdict(cfg)}
    torch.save(state, ckpt / outputs.STATE_FILE)
    assert outputs.read_trainer_state(str(ckpt), cfg, 1)["step"] == 1
    marker = tmp_path / "ran"
    with open(ckpt / outputs.OPTIMIZER_DIR / ".metadata", "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(outputs.Refused, match=r"\.metadata is not a plain distributed checkpoint"):
        outputs.read_trainer_state(str(ckpt), cfg, 1)
    assert not marker.exists()


# ---- metrics -------------------------------------------------------------------------------------


def test_step_metrics_report_errors_too_long_zero_std_and_the_lr_used(tmp_path):
    cfg = _tiny(
        tmp_path, "--val-data", "", "--warmup-steps", "4", "--lr", "1e-3", "--max-new-tokens", "200"
    )

    # 4 groups of 4: group 0 all errors (zero std), group 1 too long at clip 4, others vary
    def make(i):
        if i < 4:
            return Score(reward=0.0, error="audio has 3 NaN or inf samples")
        if i == 4:
            return Score(
                reward=0.0, error="31.0 s is longer than Whisper's 30 s window", too_long=True
            )
        return Score(reward=0.1 * (i % 4), transcript="x", cer=0.5, nll=1.0)

    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _ScriptedScorer(make))
    m, _ = tr.train_step(0)
    assert m["error_frac"] == pytest.approx(5 / 16)
    assert m["too_long_frac"] == pytest.approx(1 / 16)
    # errors have no cer, not 0
    assert m["cer"] == pytest.approx(0.5)
    assert m["nll"] == pytest.approx(1.0)
    assert m["zero_std_frac"] >= 0.25  # group 0 at least (truncation may zero more)
    assert m["lr"] == pytest.approx(1e-3 / 4)  # warm-up: the first step runs at 1/4 of the rate
    m2, _ = tr.train_step(1)
    assert m2["lr"] == pytest.approx(2e-3 / 4)


# ---- the validation table ------------------------------------------------------------------------


def test_validation_table_rates_a_row_without_language_by_the_detected_one():
    """A row without a language (and no --language) is rated in the language Whisper heard: CER
    for zh (ja, ko, th, yue), WER for en; the row's own language or --language comes first."""
    from data import Example

    examples = [
        Example("你好世界", "0"),
        Example("Hello there.", "1"),
        Example("你好世界", "2", language="en"),
    ]
    zh = Score(0.5, "你好世间", cer=0.25, language="zh")
    scores = [zh, Score(0.5, "hello", cer=0.1, language="en"), zh]
    got = outputs.table_metrics(scores, examples, world=1)
    assert got == {"val_table_cer": pytest.approx(0.25), "val_table_wer": pytest.approx(0.75)}
    wer = {"val_table_wer": 1.0}  # one Chinese "word", wrong
    assert outputs.table_metrics([zh], examples[:1], world=1, language="en") == wer
    unheard = Score(0.5, "你好世间", cer=0.25)  # no language known: WER, as before
    assert outputs.table_metrics([unheard], examples[:1], world=1) == wer


def test_whisper_scores_say_the_language_heard():
    """Score.language: the one asked for, else the one Whisper detected (silence too)."""
    whisper = scoring.WhisperScorer(
        scoring.random_tiny_whisper(seed=0), "cpu", batch_size=4, max_transcript_tokens=4
    )
    audios = [noise(1.0, 1), noise(1.0, 2), np.zeros(16000, np.float32)]  # the last silent
    results = whisper.score(audios, ["Hi.", "안녕", "Hi."], [None, "korean", None])
    assert results[1].language == "ko"
    assert all(r.language in scoring.model_languages(whisper.model) for r in results), results
