"""eval.py's output folder and its statistics: run.json (what produced the results, which a rerun
must repeat), results.jsonl (read, and the ranks' files folded into it), the summary and its
table, and --compare's paired bootstrap and sign test. Nothing here loads a model.
"""

import json
import math
import os
import re
import sys

import numpy as np

from dnsmos import KEYS as DNSMOS_KEYS

PROSODY = ("f0_std_semitones", "voiced_frac", "chars_per_s", "f0_median_hz")
# What --compare pairs: lower WER/CER is better, higher SIM, reward and DNSMOS.
COMPARED = ("wer", "cer", "sim", "reward", *DNSMOS_KEYS)
OUTLIER = 0.5  # a row whose WER (or CER) is above this is an outlier: counted, and a mean without
RECORD = "run.json"  # in --out: what produced its results


class Refused(SystemExit):
    """A user's error (a bad flag, a missing file, a foreign --out): main prints the one-line
    message on stderr and the process exits with status 2, no traceback."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = f"eval.py: {message}"

    def __str__(self):
        return self.message


def read_results(path: str, *, repair: bool = False) -> list[dict]:
    """The rows of a results.jsonl. An unparsable last line (a run killed mid-write) is dropped with
    a note on stderr, and with `repair` the file is rewritten without it (so that appending starts
    on a whole line); an unparsable line elsewhere stops, naming file:line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    rows = []
    keep = lines
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "id" not in row:
            if i != last:
                raise Refused(
                    f"{path}:{i + 1}: not a results row: {line.strip()[:80]!r}; "
                    "remove that line (or the file) and rerun"
                )
            note = "; file rewritten without it" if repair else ""
            print(
                f"eval.py: {path}:{i + 1}: dropped an unfinished last line (a run stopped "
                f"mid-write){note}",
                file=sys.stderr,
            )
            keep = lines[:i]
            break
        rows.append(row)
    if repair and lines and (keep is not lines or not lines[-1].endswith("\n")):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
        os.replace(path + ".tmp", path)
    return rows


def _shown(value) -> str:
    return "unset" if value is None else repr(value)


def rank_files(out: str) -> list[str]:
    """The OUT/results.rank{r}.jsonl files there, by rank (any world size)."""
    if not os.path.isdir(out):
        return []
    found = []  # (rank, path)
    for name in os.listdir(out):
        m = re.fullmatch(r"results\.rank(\d+)\.jsonl", name)
        if m:
            found.append((int(m.group(1)), os.path.join(out, name)))
    return [path for _, path in sorted(found)]


def check_record(out: str, record: dict):
    """Refuse a run into an --out whose results another run produced: Refused naming the first
    flag whose value differs from OUT/run.json's, or saying that results there have no run.json.
    An --out without results takes any run (write_record then replaces its run.json)."""
    held = [os.path.join(out, "results.jsonl")] + rank_files(out)
    if not any(os.path.isfile(p) and os.path.getsize(p) for p in held):
        return
    path = os.path.join(out, RECORD)
    if not os.path.isfile(path):
        raise Refused(
            f"--out {out} holds results but no {RECORD}, so what produced them is "
            "unknown; choose another --out (or move that folder away)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            was = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(f"{path}: not a run record ({e}); choose another --out") from None
    if not isinstance(was, dict):
        raise Refused(f"{path}: not a run record (not a JSON object); choose another --out")
    for key in dict.fromkeys([*record, *was]):
        if was.get(key) != record.get(key):
            flag = "--" + key.replace("_", "-")
            raise Refused(
                f"--out {out} holds the results of another run: {flag} was "
                f"{_shown(was.get(key))} there ({RECORD}), {_shown(record.get(key))} "
                "now; choose another --out, or repeat that run's flags"
            )


def write_record(out: str, record: dict):
    """OUT/run.json, replaced whole (another rank may be reading it)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, RECORD)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def fold(out: str, ids: list[str]) -> list[dict]:
    """Fold the ranks' files into OUT/results.jsonl, then delete them: one row per id, the newest
    (a rank's file is newer than results.jsonl: every run folds at its start and at its end). Ids
    already there keep their place; new ones follow in the order of `ids` (the data's). Returns
    the rows."""
    final = os.path.join(out, "results.jsonl")
    ranks = rank_files(out)
    merged = {row["id"]: row for row in read_results(final, repair=True)}
    there = list(merged)  # the ids already in results.jsonl, in their order
    for path in ranks:
        merged.update((row["id"], row) for row in read_results(path))
    order = dict.fromkeys(there + [i for i in ids if i in merged] + list(merged))
    with open(final + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(merged[i], ensure_ascii=False) + "\n" for i in order)
    os.replace(final + ".tmp", final)
    for path in ranks:
        os.remove(path)
    return [merged[i] for i in order]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarize(results: list[dict], n_rows: int, other_rows: int = 0) -> dict:
    """Means over scored rows (errors excluded, counted apart); WER and CER are each the mean of
    per-utterance rates (seed-tts-eval's average), over the rows rated by that metric, and again
    without the outliers (rates above OUTLIER), which are counted. other_rows: rows of other ids
    kept in results.jsonl, counted only."""
    good = [r for r in results if not r.get("error")]
    summary = dict(rows=n_rows, results=len(results), scored=len(good), other_rows=other_rows)
    for kind in ("wer", "cer"):
        rated = [r[kind] for r in good if r.get("metric") == kind]
        inliers = [rate for rate in rated if rate <= OUTLIER]
        summary[f"{kind}_mean"] = _mean(rated)
        summary[f"n_{kind}"] = len(rated)
        summary[f"{kind}_outliers"] = len(rated) - len(inliers)
        summary[f"{kind}_mean_without_outliers"] = _mean(inliers)
    summary["sim_mean"] = _mean(r.get("sim") for r in good)
    summary["reward_mean"] = _mean(r.get("reward") for r in good)
    for k in DNSMOS_KEYS:
        summary[f"{k}_mean"] = _mean(r.get(k) for r in good)
    for k in PROSODY:
        summary[f"{k}_median"] = _median(r.get(k) for r in good)
    summary["duration_s_mean"] = _mean(r.get("duration_s") for r in good)
    summary["rtf_mean"] = _mean(r.get("rtf") for r in good)
    summary["silent"] = sum(bool(r.get("silent")) for r in good)
    summary["too_long"] = sum(bool(r.get("too_long")) for r in results)
    summary["truncated"] = sum(bool(r.get("truncated")) for r in results)
    bad = [r for r in results if r.get("error")]
    summary["errors"] = len(bad)
    summary["bad_rows"] = [dict(id=r["id"], source=r.get("source"), error=r["error"]) for r in bad]
    return summary


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(summary: dict) -> str:
    """The summary as a markdown table: | metric | value |, one row per measure (DNSMOS's only
    where it was measured)."""
    names = [
        ("rows", "rows"),
        ("scored", "scored"),
        ("wer_mean", "WER (mean of per-utterance WER)"),
        ("n_wer", "rows rated by WER"),
        ("wer_outliers", f"rows with WER > {OUTLIER:g} (outliers)"),
        ("wer_mean_without_outliers", "WER without the outliers (mean)"),
        ("cer_mean", "CER (mean of per-utterance CER)"),
        ("n_cer", "rows rated by CER"),
        ("cer_outliers", f"rows with CER > {OUTLIER:g} (outliers)"),
        ("cer_mean_without_outliers", "CER without the outliers (mean)"),
        ("sim_mean", "SIM (mean)"),
        ("reward_mean", "reward (mean)"),
    ]
    if any(summary.get(f"{k}_mean") is not None for k in DNSMOS_KEYS):
        names += [
            ("dnsmos_sig_mean", "DNSMOS SIG (mean)"),
            ("dnsmos_bak_mean", "DNSMOS BAK (mean)"),
            ("dnsmos_ovrl_mean", "DNSMOS OVRL (mean)"),
            ("dnsmos_p808_mean", "DNSMOS P.808 (mean)"),
        ]
    names += [
        ("f0_std_semitones_median", "pitch spread, semitones (median)"),
        ("f0_median_hz_median", "median pitch, Hz (median)"),
        ("voiced_frac_median", "voiced fraction (median)"),
        ("chars_per_s_median", "chars/s (median)"),
        ("duration_s_mean", "duration, s (mean)"),
        ("rtf_mean", "real-time factor (mean)"),
        ("silent", "silent clips"),
        ("too_long", "over Whisper's 30 s window (reward 0)"),
        ("truncated", "truncated (no stop token)"),
        ("errors", "bad rows (errors)"),
    ]
    if summary.get("other_rows"):
        names.append(("other_rows", "other ids' rows kept in results.jsonl (not in this table)"))
    return "\n".join(
        ["| metric | value |", "| --- | --- |"]
        + [f"| {label} | {_fmt(summary.get(key))} |" for key, label in names]
    )


# ---- --compare: paired bootstrap and sign test --------------------------------------------------


def bootstrap_ci(
    diffs, *, resamples: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` over `resamples` paired resamples (seeded)."""
    d = np.asarray(diffs, np.float64)  # [N]
    picks = np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))  # [resamples, N]
    means = d[picks].mean(axis=1)  # [resamples]
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def sign_test(diffs) -> float:
    """Two-sided exact binomial sign test p-value of the differences (zeros dropped)."""
    pos = sum(d > 0 for d in diffs)
    neg = sum(d < 0 for d in diffs)
    n = pos + neg
    k = min(pos, neg)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def compare(dir_a: str, dir_b: str, *, resamples: int = 10000, seed: int = 0) -> list[dict]:
    """B - A per metric of COMPARED over the ids scored in both: a dict each, printed as a table."""
    runs = []
    for d in (dir_a, dir_b):
        rows = read_results(os.path.join(d, "results.jsonl"))
        runs.append({r["id"]: r for r in rows if not r.get("error")})
    a, b = runs
    ids = [i for i in a if i in b]
    out = []
    for key in COMPARED:
        both = [i for i in ids if a[i].get(key) is not None and b[i].get(key) is not None]
        pairs = [(a[i][key], b[i][key]) for i in both]
        if not pairs:
            continue
        diffs = [y - x for x, y in pairs]
        lo, hi = bootstrap_ci(diffs, resamples=resamples, seed=seed)
        out.append(
            dict(
                metric=key,
                n=len(pairs),
                mean_a=float(np.mean([x for x, _ in pairs])),
                mean_b=float(np.mean([y for _, y in pairs])),
                diff=float(np.mean(diffs)),
                ci_low=lo,
                ci_high=hi,
                sign_p=sign_test(diffs),
            )
        )
    title = (
        f"B = {dir_b} minus A = {dir_a}, paired by id ({len(ids)} ids in both); 95% paired "
        f"bootstrap ({resamples} resamples, seed {seed}); two-sided exact sign test"
    )
    lines = [
        title,
        "",
        "| metric | pairs | mean A | mean B | B - A | 95% CI | sign test p |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in out:
        ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        lines.append(
            f"| {r['metric']} | {r['n']} | {r['mean_a']:.4f} | {r['mean_b']:.4f} | "
            f"{r['diff']:+.4f} | {ci} | {r['sign_p']:.3g} |"
        )
    print("\n".join(lines))
    return out
