"""The numbers a step reports in metrics.jsonl: means over clips (`clip_means`), a training step's
metrics over every rank (`step_metrics`), and validation's WER / CER table (`table_metrics`).
outputs.py writes them.
"""

import dataclasses

import numpy as np


def clip_means(scores: list, rewards: list, finished: list, prefix: str = "") -> dict:
    """Means over clips: the reward that was used (0 when truncated), every numeric field of the
    scores (bool fields as `name_frac`; None = not measured, left out; the median where the field
    says so in its metadata), and the error fraction."""
    out = {
        f"{prefix}reward": mean(rewards),
        f"{prefix}finished": mean([float(f) for f in finished]),
        f"{prefix}error_frac": mean([float(s.error is not None) for s in scores]),
    }
    if not scores:
        return out
    for f in dataclasses.fields(scores[0]):
        if f.name == "reward":
            continue
        values = [getattr(s, f.name) for s in scores]
        if any(isinstance(v, bool) for v in values):
            out[f"{prefix}{f.name}_frac"] = mean([float(v) for v in values])
        elif any(isinstance(v, (int, float)) for v in values):
            numbers = [v for v in values if isinstance(v, (int, float))]
            if f.metadata.get("agg") == "median":
                out[f"{prefix}{f.name}"] = float(np.median(numbers))
            else:
                out[f"{prefix}{f.name}"] = mean(numbers)
    return out


def step_metrics(
    d, scores: list, rewards, roll, guard: list | None, seconds: dict, group_size: int
) -> dict:
    """A step's metrics over every rank's clips (a collective): clip_means, reward std, the
    fraction of groups whose rewards are all equal (they teach nothing), response lengths, the
    mean --guard factor, and `time_<phase>` for each phase of `seconds` ({phase: seconds}
    on this rank): the slowest rank's, which sets the pace."""
    groups = rewards.view(-1, group_size)  # [groups, G]
    local = {
        "scores": scores,
        "reward": rewards.tolist(),
        "finished": roll.finished.tolist(),
        "length": roll.lengths.tolist(),
        "guard": guard or [],
        "zero_std": (groups == groups[:, :1]).all(dim=1).tolist(),
    }
    parts = d.gather((local, seconds))  # every rank's, in rank order
    every = {name: [] for name in local}
    for rank_local, _ in parts:
        for name, values in rank_local.items():
            every[name] += values
    slowest = {phase: max(p[1][phase] for p in parts) for phase in seconds}
    metrics = clip_means(every["scores"], every["reward"], every["finished"])
    metrics["reward_mean"] = metrics.pop("reward")
    metrics["reward_std"] = float(np.std(every["reward"]))
    metrics["zero_std_frac"] = mean([float(z) for z in every["zero_std"]])
    metrics["response_len"] = mean(every["length"])
    metrics["truncated_frac"] = 1 - metrics["finished"]
    metrics["guard_factor"] = mean(every["guard"])
    for phase, value in slowest.items():
        metrics[f"time_{phase}"] = value
    metrics["tokens_per_s"] = sum(every["length"]) / max(slowest["rollout"], 1e-9)
    return metrics


def mean(xs):
    """The mean of the numbers in xs (None left out) as a float; None when there are none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return float(np.mean(xs))


def table_metrics(
    scores: list, examples: list, world: int, language: str = "", prefix: str = "val_"
) -> dict:
    """The evaluation table's WER / CER (reward.table_error_rate, the one eval.py reports) of each
    Whisper-scored clip's transcript, as means of per-utterance rates: `{prefix}table_wer`,
    `{prefix}table_cer` (only those with rows). A row's language: its own, else `language`
    (--language), else the one Whisper heard the clip in (Score.language): CER for zh, ja, ko, th,
    yue, WER for the rest. scores come in Sampler.sample_and_score's order (rank 0's share
    examples[0::world] first); clips with an error or no Whisper transcript (cer None) are left
    out."""
    from reward import table_error_rate
    from scorer import language_code

    ordered = [ex for r in range(world) for ex in examples[r::world]]
    rates = {"wer": [], "cer": []}
    for score, ex in zip(scores, ordered):
        if score.error is None and score.cer is not None:
            lang = ex.language or language or score.language
            try:
                lang = lang and language_code(lang)
                kind, rate = table_error_rate(ex.text, score.transcript, lang)
            except ValueError:
                continue
            rates[kind].append(rate)
    return {f"{prefix}table_{k}": mean(v) for k, v in rates.items() if v}
