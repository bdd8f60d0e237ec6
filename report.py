"""--report-to: metrics.jsonl mirrored to TensorBoard (OUT/tensorboard) or Weights & Biases, each
row logged at its step, with the first few validation clips of each written validation (their texts
as captions). Used only where that package is installed: without it, one warning and metrics.jsonl
alone (the run does not fail for a dashboard). Imports nothing of the project."""

import math
import os
import warnings

import numpy as np

KINDS = ("", "tensorboard", "wandb")
SAMPLE_RATE = 16000  # the clips' rate (XCodec2's and Whisper's)
N_CLIPS = 4  # validation clips logged per validation


def clips(samples: dict | None, n: int = N_CLIPS) -> list[tuple[np.ndarray, str]]:
    """(audio float32 [S] in [-1, 1], text) of the first n clips of each validation in `samples`
    (grpo's {name: dict(audios, texts, ...)}, validations named val_*); an empty clip is 320
    zeros."""
    out = []
    for name, shown in (samples or {}).items():
        if not name.startswith("val_"):
            continue
        for audio, text in list(zip(shown["audios"], shown["texts"]))[:n]:
            audio = np.clip(np.asarray(audio, np.float32).reshape(-1), -1.0, 1.0)
            if audio.size <= 1:  # tensorboard needs 2 samples or more
                audio = np.zeros(320, np.float32)
            out.append((audio, text))
    return out


def numeric(metrics: dict) -> dict:
    """The finite numbers of a metrics row (bools and None left out), without the step."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


class Reporter:
    """log(metrics) for each row written to metrics.jsonl (rank 0 only), close() at the end."""

    def __init__(self, kind: str, out: str, config: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"--report-to {kind!r}: expected one of {KINDS[1:]} or ''")
        self.kind = kind
        self.backend = None  # the SummaryWriter or wandb run; None: metrics.jsonl only
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.backend = SummaryWriter(os.path.join(out, "tensorboard"))
            elif kind == "wandb":
                import wandb

                name = os.path.basename(os.path.abspath(out))
                self.backend = wandb.init(dir=out, name=name, config=config)
        except ImportError as e:
            message = f"--report-to {kind}: not installed ({e}); metrics go to metrics.jsonl only"
            warnings.warn(message, stacklevel=2)

    def log(self, metrics: dict, samples: dict | None = None):
        """A metrics row at its step, and the first N_CLIPS clips of each validation in `samples`
        (grpo's write(): {name: dict(audios, texts, ...)}) as audio at 16 kHz, texts as captions."""
        if self.backend is None:
            return
        step = int(metrics.get("step", 0))
        values = numeric(metrics)
        heard = clips(samples)
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.backend.add_scalar(k, v, step)
            for i, (audio, text) in enumerate(heard):
                clip = audio[None]  # [1, S]
                self.backend.add_audio(f"val_clips/{i}", clip, step, sample_rate=SAMPLE_RATE)
                # A tag of its own for the text: one plugin per tag.
                self.backend.add_text(f"val_text/{i}", text, step)
            self.backend.flush()
        else:
            if heard:
                import wandb

                values["val_clips"] = [
                    wandb.Audio(a, sample_rate=SAMPLE_RATE, caption=t) for a, t in heard
                ]
            self.backend.log(values, step=step)

    def close(self):
        """Flush and close the dashboard's writer (a no-op without one)."""
        if self.backend is None:
            return
        if self.kind == "tensorboard":
            self.backend.close()
        else:
            self.backend.finish()
        self.backend = None
