"""report.py: --report-to mirrors metrics rows and the first validation clips to the dashboard's
package when installed (fakes of tensorboard and wandb here), warns otherwise."""

import sys
import types

import numpy as np
import pytest

import config
import report


def test_missing_package_warns_and_logs_nothing(tmp_path, monkeypatch):
    # import wandb -> ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(UserWarning, match="not installed"):
        r = report.Reporter("wandb", str(tmp_path))
    r.log({"step": 1, "reward_mean": 0.5})  # a no-op, no error
    r.close()


def test_wandb_gets_every_numeric_metric_at_its_step(tmp_path, monkeypatch):
    logged = []
    finished = []
    run = types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: finished.append(True)
    )

    def audio(data, sample_rate, caption):  # wandb.Audio
        return types.SimpleNamespace(data=data, sample_rate=sample_rate, caption=caption)

    monkeypatch.setitem(
        sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run, Audio=audio)
    )
    r = report.Reporter("wandb", str(tmp_path), {"lr": 1e-6})
    r.log(
        {
            "step": 3,
            "reward_mean": 0.25,
            "val_table_wer": 0.1,
            "note": "x",
            "nan": float("nan"),
            "flag": True,
            "none": None,
        }
    )
    r.log({"step": 5, "reward_mean": 0.5}, _samples())
    r.close()
    assert logged[0] == (3, {"reward_mean": 0.25, "val_table_wer": 0.1})
    assert finished == [True]
    step, values = logged[1]
    clips = values.pop("val_clips")
    assert step == 5
    assert values == {"reward_mean": 0.5}
    assert [(c.data.shape, c.sample_rate, c.caption) for c in clips] == [
        ((100,), 16000, "text 0"),
        ((320,), 16000, "text 1"),
        ((50,), 16000, "text 2"),
        ((400,), 16000, "text 3"),
    ]


def _samples():
    """grpo's write() samples: a step's clips and a validation's 6 (one empty, one too loud)."""
    audios = [np.full(100 * (i + 1), 0.1 * i, np.float32) for i in range(6)]
    audios[1] = np.zeros(0, np.float32)
    audios[2] = np.full(50, 2.0, np.float32)
    val = dict(
        audios=audios, texts=[f"text {i}" for i in range(6)], scores=[None] * 6, finished=[True] * 6
    )
    train = dict(audios=[np.ones(10, np.float32)], texts=["train"], scores=[None], finished=[True])
    return {"step_5": train, "val_step_5": val}


def test_tensorboard_gets_scalars_and_the_first_validation_clips(tmp_path, monkeypatch):
    calls = []

    class SummaryWriter:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def __getattr__(self, name):
            return lambda *a, **kw: calls.append((name, a, kw))

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    r = report.Reporter("tensorboard", str(tmp_path))
    r.log({"step": 5, "reward_mean": 0.5}, _samples())
    r.close()
    assert calls[0] == ("init", str(tmp_path / "tensorboard"))
    assert ("add_scalar", ("reward_mean", 0.5, 5), {}) in calls
    audio = [c for c in calls if c[0] == "add_audio"]
    # the first 4, none of training's
    assert [c[1][0] for c in audio] == [f"val_clips/{i}" for i in range(4)]
    assert all(c[1][2] == 5 and c[2] == {"sample_rate": 16000} for c in audio)
    # [1, S]; empty: 320 zeros (tensorboard needs >= 2)
    assert [c[1][1].shape for c in audio] == [(1, 100), (1, 320), (1, 50), (1, 400)]
    assert audio[2][1][1].max() == 1.0  # clipped to [-1, 1]
    assert [c[1][1] for c in calls if c[0] == "add_text"] == [
        "text 0",
        "text 1",
        "text 2",
        "text 3",
    ]
    assert calls[-2][0] == "flush"
    assert calls[-1][0] == "close"


def test_report_to_is_checked():
    with pytest.raises(ValueError, match="--report-to"):
        report.Reporter("mlflow", "/tmp")
    with pytest.raises((ValueError, SystemExit)):
        config.check_config(config.Config(report_to="mlflow"))


def test_grpo_train_reports_metrics_and_validation_clips(tmp_path, monkeypatch):
    """grpo.train --report-to wandb: each metrics row at its step, with the validation's clips."""
    import grpo
    from helpers import _tiny

    logged = []
    run = types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: None
    )
    audio = lambda data, sample_rate, caption: (len(data), sample_rate, caption)  # noqa: E731
    monkeypatch.setitem(
        sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run, Audio=audio)
    )
    grpo.train(
        _tiny(
            tmp_path,
            "--reward",
            "test_grpo:tone_reward",
            "--steps",
            "1",
            "--val-every",
            "1",
            "--report-to",
            "wandb",
            "--save-every",
            "9",
        )
    )
    assert [step for step, _ in logged] == [0, 1]  # the validation before step 1, then step 1
    for _, values in logged:
        assert "val_reward" in values
        assert len(values["val_clips"]) >= 1
        assert all(rate == 16000 and isinstance(text, str) for _, rate, text in values["val_clips"])
    assert "reward_mean" in logged[1][1]
