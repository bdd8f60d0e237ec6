"""report.py: --report-to mirrors metrics rows to the dashboard's package when installed, warns otherwise."""
import sys
import types

import pytest

import config
import report


def test_missing_package_warns_and_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, as when not installed
    with pytest.warns(UserWarning, match="not installed"):
        r = report.Reporter("wandb", str(tmp_path))
    r.log({"step": 1, "reward_mean": 0.5})  # a no-op, no error
    r.close()


def test_wandb_gets_every_numeric_metric_at_its_step(tmp_path, monkeypatch):
    logged, finished = [], []
    run = types.SimpleNamespace(log=lambda values, step: logged.append((step, values)),
                                finish=lambda: finished.append(True))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    r = report.Reporter("wandb", str(tmp_path), {"lr": 1e-6})
    r.log({"step": 3, "reward_mean": 0.25, "val_table_wer": 0.1, "note": "x", "nan": float("nan"),
           "flag": True, "none": None})
    r.close()
    assert logged == [(3, {"reward_mean": 0.25, "val_table_wer": 0.1})] and finished == [True]


def test_report_to_is_checked():
    with pytest.raises(ValueError, match="--report-to"):
        report.Reporter("mlflow", "/tmp")
    with pytest.raises((ValueError, SystemExit)):
        config.check_config(config.Config(report_to="mlflow"))
