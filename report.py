"""--report-to: metrics.jsonl mirrored to TensorBoard (OUT/tensorboard) or Weights & Biases, each row
logged at its step. Used only where that package is installed: without it, one warning and
metrics.jsonl alone (the run does not fail for a dashboard). Imports nothing of the project."""
import math
import os
import warnings

KINDS = ("", "tensorboard", "wandb")


def numeric(metrics: dict) -> dict:
    """The finite numbers of a metrics row (bools and None left out), without the step."""
    return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Reporter:
    """log(metrics) for each row written to metrics.jsonl (rank 0 only), close() at the end."""

    def __init__(self, kind: str, out: str, config: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"--report-to {kind!r}: expected one of {KINDS[1:]} or ''")
        self.kind, self.backend = kind, None
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.backend = SummaryWriter(os.path.join(out, "tensorboard"))
            elif kind == "wandb":
                import wandb
                self.backend = wandb.init(dir=out, name=os.path.basename(os.path.abspath(out)), config=config)
        except ImportError as e:
            warnings.warn(f"--report-to {kind}: not installed ({e}); metrics go to metrics.jsonl only")

    def log(self, metrics: dict):
        if self.backend is None:
            return
        step, values = int(metrics.get("step", 0)), numeric(metrics)
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.backend.add_scalar(k, v, step)
            self.backend.flush()
        else:
            self.backend.log(values, step=step)

    def close(self):
        if self.backend is not None:
            (self.backend.close if self.kind == "tensorboard" else self.backend.finish)()
            self.backend = None
