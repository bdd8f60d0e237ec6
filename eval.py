"""Evaluate TTS: synthesize a test set with a checkpoint (--model), or take any system's wavs (--wavs),
and score every row: transcript, WER or CER as seed-tts-eval's run_wer.py computes them
(reward.table_error_rate), speaker similarity to the row's voice prompt, the TTS reward, prosody,
duration and real-time factor. The top floor of the project: nothing imports it.

    python eval.py --model CKPT --data meta.lst --out runs/eval_ckpt --speaker-model wavlm-sv
    python eval.py --wavs DIR --data test.jsonl --out runs/eval_sys --asr tiny.en --language en
    python eval.py --compare runs/eval_a runs/eval_b
    torchrun --nproc_per_node=N eval.py ...      (rank r takes rows r::N; rank 0 merges)

Writes DIR/results.jsonl (one row per utterance; a rerun skips the rows scored without error and
retries the rest), DIR/summary.json and prints a markdown table. A bad row (missing or unreadable
wav or prompt audio, unknown language, a clip the scorer or the ASR refuses) is written with its
file:line and `error`, and counted. Every row needs a language (its own or --language; an
English-only Whisper implies en): eval stops before any work, naming the first row without one.
"""
import argparse
import importlib
import json
import math
import os
import sys
import time

import numpy as np

import data
from reward import table_error_rate

PROSODY = ("f0_std_semitones", "voiced_frac", "chars_per_s")
COMPARED = ("wer", "cer", "sim", "reward")  # what --compare pairs (lower WER/CER is better)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Synthesize (--model) or take (--wavs) a test set and score it.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="checkpoint directory or hub id to synthesize with ('tiny': random, offline)")
    what.add_argument("--wavs", help="folder of existing clips, DIR/<id>.wav per row (any system's output)")
    what.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                      help="compare two eval outputs: B - A per metric, paired by id")
    p.add_argument("--data", help="our JSONL, a .txt, or a Seed-TTS-eval list (meta.lst)")
    p.add_argument("--out", help="output folder (results.jsonl, summary.json; wavs/ with --model)")
    p.add_argument("--asr", default="large-v3",
                   help="openai-whisper name or checkpoint path, or module:function (audio float32 16 kHz, "
                        "language -> transcript) (default: large-v3)")
    p.add_argument("--reward-whisper", default=None,
                   help="Whisper (name or path) for the reward when --asr is a module:function (default: no reward)")
    p.add_argument("--language", default=None, help="language of rows without one (default: none; English-only "
                   "Whisper: en). zh, ja, ko, th, yue are rated by CER, the rest by WER")
    p.add_argument("--speaker-model", default=None,
                   help="speaker model for SIM (wavlm-sv[:PATH], Seed-TTS-eval's .pth, module:function); default none")
    p.add_argument("--codec", default="xcodec2", help="with --model: 'xcodec2[:PATH]', 'tone', 'words[:PATH]'")
    p.add_argument("--temperature", type=float, default=0.0, help="with --model: 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1500, help="speech tokens per clip, 50 per s (default 1500)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed, and --compare's bootstrap seed. Each batch is seeded (--seed + the index "
                        "of its first row), so sampled output (--temperature > 0) repeats for the same --seed, "
                        "--batch-size and world size (a resumed run batches the rows left differently)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda (the rank's) if available, else cpu")
    p.add_argument("--resamples", type=int, default=10000, help="--compare's bootstrap resamples")
    args = p.parse_args(argv)
    if not args.compare and (not args.data or not args.out):
        p.error("--data and --out are needed with --model or --wavs")
    return args


def fail(flag: str, value, e: Exception):
    """Stop with one line naming what could not be loaded and the flag for a local copy."""
    why = (str(e).splitlines() or [type(e).__name__])[0].replace("--whisper", flag)
    hint = "" if flag in why else f" (point {flag} at a local copy)"  # the error may say it already
    raise SystemExit(f"eval.py: cannot load {flag} {value!r}: {why}{hint}")


def load(flag, value, fn):
    try:
        return fn()
    except (OSError, ValueError, ImportError, AttributeError, RuntimeError) as e:
        fail(flag, value, e)


def is_function(spec: str) -> bool:
    return ":" in spec and not os.path.exists(spec) and not spec[1:3] == ":\\"


def english_only(asr: str) -> bool:
    """An English-only Whisper, by its name (tiny.en, path/whisper-tiny.en.pt): rows without a language are en."""
    return not is_function(asr) and os.path.basename(asr.rstrip("/\\")).removesuffix(".pt").endswith(".en")


def check_languages(examples, args):
    """Stop, before any model is loaded, at the first row with no language when none is implied:
    Seed-TTS-eval lists carry none, and test-zh rated by WER would be mis-scored silently."""
    if args.language or english_only(args.asr):
        return
    for ex in examples:
        if not ex.language:
            raise SystemExit(f"eval.py: {ex.source}: row {ex.id!r} has no language and --language is not given; "
                             "pass --language (e.g. --language en, or zh for a Chinese list)")


class Scoring:
    """The ASR, the reward's Whisper and the speaker model; score(rows, audios) -> one dict per row."""

    def __init__(self, args, device):
        import scorer
        self.asr_spec, self.asr_fn, whisper_model = args.asr, None, args.asr
        if is_function(args.asr):
            module, _, name = args.asr.partition(":")
            self.asr_fn = getattr(load("--asr", args.asr, lambda: importlib.import_module(module)), name, None)
            if not callable(self.asr_fn):
                raise SystemExit(f"eval.py: --asr {args.asr!r}: module {module!r} has no function {name!r}")
            whisper_model = args.reward_whisper
        speaker = None
        if args.speaker_model:
            import speaker as spk
            speaker = load("--speaker-model", args.speaker_model,
                           lambda: spk.load_speaker_model(args.speaker_model, device))
        flag = "--asr" if self.asr_fn is None else "--reward-whisper"
        self.whisper = None if whisper_model is None else load(flag, whisper_model, lambda: scorer.WhisperScorer(
            whisper_model, device, args.language, batch_size=args.batch_size, speaker_model=speaker))
        self.sims = None
        if speaker is not None and self.whisper is None:
            self.sims = spk.SpeakerSimilarity(speaker)

    def score(self, rows, audios, prompts) -> list[dict]:
        from prosody import measure
        texts, languages = [r["text"] for r in rows], [r["language"] for r in rows]
        scores = self.whisper.score(audios, texts, languages, prompts) if self.whisper else [None] * len(rows)
        sims = self.sims.sims(audios, prompts) if self.sims else [None] * len(rows)
        out = []
        for row, audio, s, sim in zip(rows, audios, scores, sims):
            if s is not None and s.error:
                out.append(dict(error=s.error, too_long=s.too_long))
                continue
            try:
                transcript = s.transcript if self.asr_fn is None else str(self.asr_fn(audio, row["language"]))
            except Exception as e:  # noqa: BLE001 -- the ASR failing on one clip is that row's error, counted
                out.append(dict(error=f"--asr {self.asr_spec}: {type(e).__name__}: {e}", too_long=False))
                continue
            got = dict(transcript=transcript, too_long=False,
                       sim=s.sim if s is not None else sim, reward=s.reward if s is not None else None,
                       nll=s.nll if s is not None else None)
            got.update({k: getattr(s, k) for k in PROSODY} if s is not None else measure(audio, row["text"]))
            try:
                kind, rate = table_error_rate(row["text"], transcript, row["language"])
            except ValueError as e:  # a text with nothing left to compare after normalization
                out.append(dict(error=str(e), too_long=False))
                continue
            got.update(metric=kind, **{kind: rate})
            out.append(got)
        return out


def read_results(path: str, *, repair: bool = False) -> list[dict]:
    """The rows of a results.jsonl. An unparsable last line (a run killed mid-write) is dropped with
    a note on stderr, and with `repair` the file is rewritten without it (so that appending starts
    on a whole line); an unparsable line elsewhere stops, naming file:line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    rows, keep, last = [], lines, max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines[:last + 1]):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "id" not in row:
            if i != last:
                raise SystemExit(f"eval.py: {path}:{i + 1}: not a results row: {line.strip()[:80]!r}; "
                                 "remove that line (or the file) and rerun")
            print(f"eval.py: {path}:{i + 1}: dropped an unfinished last line (a run stopped mid-write)"
                  + ("; file rewritten without it" if repair else ""), file=sys.stderr)
            keep = lines[:i]
            break
        rows.append(row)
    if repair and lines and (keep is not lines or not lines[-1].endswith("\n")):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
        os.replace(path + ".tmp", path)
    return rows


def prompt_problem(path: str) -> str | None:
    """Why a row's prompt audio cannot be used (missing, unreadable, empty), else None."""
    if not os.path.isfile(path):
        return f"prompt audio not found: {path}"
    try:
        import soundfile
        frames = soundfile.info(path).frames
    except Exception as e:  # noqa: BLE001 -- any reason it cannot be read, named
        return f"prompt audio {path} cannot be read: {e}"
    return None if frames else f"prompt audio {path} is empty"


def check_rows(examples, args):
    """One row dict per example, with `error` set where the row cannot be scored (unknown language,
    missing or unreadable prompt audio, missing wav with --wavs)."""
    from scorer import language_code
    rows = []
    for ex in examples:
        row = dict(id=ex.id, source=ex.source, text=ex.text, language=ex.language or args.language
                   or ("en" if english_only(args.asr) else None))
        try:
            row["language"] = None if row["language"] is None else language_code(row["language"])
        except ValueError as e:
            row["error"] = str(e)
        if ex.prompt_wav and "error" not in row and (problem := prompt_problem(ex.prompt_wav)):
            row["error"] = problem
        if args.wavs and "error" not in row:
            path = os.path.join(args.wavs, f"{ex.id}.wav")
            row["wav"] = path
            if not os.path.isfile(path):
                row["error"] = f"wav not found: {path}"
        row["prompt_wav"] = ex.prompt_wav
        row["_example"] = ex
        rows.append(row)
    return rows


class Synthesizer:
    """--model: greedy (or seeded sampled) LLASA synthesis through sample.generate and the codec."""

    def __init__(self, args, device):
        import torch

        import codec
        import demo
        from models import load_model
        self.torch, self.args, self.device = torch, args, device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model, self.tokenizer = load("--model", args.model,
                                          lambda: load_model(demo.resolve_model(args.model), device, dtype))
        self.codec = load("--codec", args.codec, lambda: codec.load_codec(args.codec, device))
        self.vocab, self.prompt_codes = data.speech_vocab(self.tokenizer), {}

    def __call__(self, rows, index: int):
        """(audios, finished flags, real-time factor) of rows; `index` seeds the batch."""
        from sample import generate
        prompts = []
        for row in rows:
            ex = row["_example"]
            codes = None
            if ex.prompt_wav:
                if ex.prompt_wav not in self.prompt_codes:
                    self.prompt_codes[ex.prompt_wav] = self.codec.encode([data.read_audio(ex.prompt_wav)])[0]
                codes = self.prompt_codes[ex.prompt_wav]
            prompts.append(data.prompt_ids(self.tokenizer, ex.text, ex.prompt_text if codes is not None else None, codes))
        start = time.perf_counter()
        generator = self.torch.Generator(device=self.device).manual_seed(self.args.seed + index)
        out = generate(self.model, prompts, max_new_tokens=self.args.max_new_tokens,
                       temperature=self.args.temperature, top_p=self.args.top_p, top_k=self.args.top_k,
                       repetition_penalty=self.args.repetition_penalty, stop_ids=(self.vocab.end_id,),
                       allowed_ids=self.vocab.allowed_ids(), generator=generator)
        codes = [self.vocab.to_codes(out.tokens[b, :int(out.lengths[b]) - int(out.finished[b])].tolist())
                 for b in range(len(rows))]
        audios = [np.asarray(a, np.float32) if len(c) else np.zeros(0, np.float32)
                  for a, c in zip(self.codec.decode(codes), codes)]
        seconds = time.perf_counter() - start
        total = sum(len(a) for a in audios) / data.SAMPLE_RATE
        return audios, out.finished.tolist(), seconds / total if total else None


def evaluate(args):
    import torch
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    os.makedirs(args.out, exist_ok=True)
    try:  # prompt audio is checked per row (check_rows): a bad one is a bad row, not a stop
        examples = data.load_dataset(args.data, check_prompts=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"eval.py: --data: {e}")
    check_languages(examples, args)
    final = os.path.join(args.out, "results.jsonl")
    mine = final if world == 1 else os.path.join(args.out, f"results.rank{rank}.jsonl")
    earlier = read_results(final, repair=rank == 0) + (read_results(mine, repair=True) if mine != final else [])
    done = {r["id"] for r in earlier if not r.get("error")}  # failed rows are retried
    scoring = Scoring(args, device)
    synth = Synthesizer(args, device) if args.model else None
    rows = check_rows(examples, args)
    todo = [(i, r) for i, r in enumerate(rows) if i % world == rank and r["id"] not in done]
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=f"eval rank {rank}" if world > 1 else "eval", disable=rank != 0)
    with open(mine, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            results = run_batch([r for _, r in batch], batch[0][0], args, scoring, synth)
            for result in results:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    bar.close()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    if rank == 0:  # one row per id, the newest (a retried row replaces its failure), in data order
        merged = {}
        for path in [final] + [os.path.join(args.out, f"results.rank{r}.jsonl") for r in range(world) if world > 1]:
            merged.update((row["id"], row) for row in read_results(path))
        with open(final + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(merged[row["id"]], ensure_ascii=False) + "\n"
                         for row in rows if row["id"] in merged)
        os.replace(final + ".tmp", final)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        summary = summarize(read_results(final), len(rows))
        with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, ensure_ascii=False)
        print(table(summary))
        for bad in summary["bad_rows"]:
            print(f"{bad['source']}: {bad['id']}: {bad['error']}", file=sys.stderr)
        return summary
    return None


def run_batch(rows, index, args, scoring, synth) -> list[dict]:
    """Result dicts of one batch of rows, bad rows answered with their error."""
    out = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    audios, ok = [None] * len(rows), [i for i, r in enumerate(rows) if "error" not in r]
    finished, rtf = [True] * len(rows), None
    if synth is not None and ok:
        clips, fin, rtf = synth([rows[i] for i in ok], index)
        for i, clip, f in zip(ok, clips, fin):
            audios[i], finished[i] = clip, f
            out[i]["truncated"] = not f
    for i in ok if synth is None else []:
        try:
            audios[i] = data.read_audio(rows[i]["wav"])
        except Exception as e:  # noqa: BLE001 -- an unreadable file is a bad row, named
            out[i]["error"] = f"unreadable audio {rows[i]['wav']}: {type(e).__name__}: {e}"
    ok = [i for i in ok if "error" not in out[i]]
    if args.model and ok:
        os.makedirs(os.path.join(args.out, "wavs"), exist_ok=True)
        import soundfile
        for i in ok:
            name = rows[i]["id"].replace(os.sep, "_")
            soundfile.write(os.path.join(args.out, "wavs", f"{name}.wav"), audios[i], data.SAMPLE_RATE)
    prompts = [None] * len(rows)
    if scoring.sims is not None or (scoring.whisper is not None and scoring.whisper.speaker is not None):
        prompts = [data.read_audio(rows[i]["prompt_wav"]) if rows[i]["prompt_wav"] else None for i in range(len(rows))]
    if ok:
        scores = scoring.score([rows[i] for i in ok], [audios[i] for i in ok], [prompts[i] for i in ok])
        for i, s in zip(ok, scores):
            out[i].update(s)
    for i in ok:
        audio = audios[i]
        out[i].update(duration_s=len(audio) / data.SAMPLE_RATE, silent=not bool(np.any(audio)), rtf=rtf)
    for o in out:
        o.setdefault("error", None)
        o.pop("prompt_wav", None)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarize(results: list[dict], n_rows: int) -> dict:
    """Means over scored rows (errors excluded, counted apart); WER and CER are each the mean of
    per-utterance rates (seed-tts-eval's average), over the rows rated by that metric."""
    good = [r for r in results if not r.get("error")]
    summary = dict(rows=n_rows, results=len(results), scored=len(good))
    for kind in ("wer", "cer"):
        rated = [r[kind] for r in good if r.get("metric") == kind]
        summary[f"{kind}_mean"], summary[f"n_{kind}"] = _mean(rated), len(rated)
    summary["sim_mean"] = _mean(r.get("sim") for r in good)
    summary["reward_mean"] = _mean(r.get("reward") for r in good)
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
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def table(summary: dict) -> str:
    names = [("rows", "rows"), ("scored", "scored"),
             ("wer_mean", "WER (mean of per-utterance WER)"), ("n_wer", "rows rated by WER"),
             ("cer_mean", "CER (mean of per-utterance CER)"), ("n_cer", "rows rated by CER"),
             ("sim_mean", "SIM (mean)"), ("reward_mean", "reward (mean)"),
             ("f0_std_semitones_median", "pitch spread, semitones (median)"),
             ("voiced_frac_median", "voiced fraction (median)"), ("chars_per_s_median", "chars/s (median)"),
             ("duration_s_mean", "duration, s (mean)"), ("rtf_mean", "real-time factor (mean)"),
             ("silent", "silent clips"), ("too_long", "too long (> 30 s)"), ("truncated", "truncated"),
             ("errors", "bad rows (errors)")]
    return "\n".join(["| metric | value |", "| --- | --- |"] +
                     [f"| {label} | {_fmt(summary.get(key))} |" for key, label in names])


# ---- --compare: paired bootstrap and sign test --------------------------------------------------

def bootstrap_ci(diffs, *, resamples: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` over `resamples` paired resamples (seeded)."""
    d = np.asarray(diffs, np.float64)
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def sign_test(diffs) -> float:
    """Two-sided exact binomial sign test p-value of the differences (zeros dropped)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n, k = pos + neg, min(pos, neg)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def compare(dir_a: str, dir_b: str, *, resamples: int = 10000, seed: int = 0) -> list[dict]:
    runs = []
    for d in (dir_a, dir_b):
        path = os.path.join(d, "results.jsonl")
        if not os.path.exists(path):
            raise SystemExit(f"eval.py: --compare: no results.jsonl in {d}")
        runs.append({r["id"]: r for r in read_results(path) if not r.get("error")})
    a, b = runs
    ids = [i for i in a if i in b]
    out = []
    for key in COMPARED:
        pairs = [(a[i][key], b[i][key]) for i in ids if a[i].get(key) is not None and b[i].get(key) is not None]
        if not pairs:
            continue
        diffs = [y - x for x, y in pairs]
        lo, hi = bootstrap_ci(diffs, resamples=resamples, seed=seed)
        out.append(dict(metric=key, n=len(pairs), mean_a=float(np.mean([x for x, _ in pairs])),
                        mean_b=float(np.mean([y for _, y in pairs])), diff=float(np.mean(diffs)),
                        ci_low=lo, ci_high=hi, sign_p=sign_test(diffs)))
    lines = [f"B = {dir_b} minus A = {dir_a}, paired by id ({len(ids)} ids in both); 95% paired bootstrap "
             f"({resamples} resamples, seed {seed}); two-sided exact sign test", "",
             "| metric | pairs | mean A | mean B | B - A | 95% CI | sign test p |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['metric']} | {r['n']} | {r['mean_a']:.4f} | {r['mean_b']:.4f} | {r['diff']:+.4f} | "
              f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['sign_p']:.3g} |" for r in out]
    print("\n".join(lines))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return compare(*args.compare, resamples=args.resamples, seed=args.seed)
    return evaluate(args)


if __name__ == "__main__":
    main()
