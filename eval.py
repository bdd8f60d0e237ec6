"""Evaluate TTS: synthesize a test set with a checkpoint (--model), or take any system's wavs (--wavs),
and score every row: transcript, WER or CER as seed-tts-eval's run_wer.py computes them
(reward.table_error_rate), speaker similarity to the row's voice prompt, the TTS reward, prosody,
duration and real-time factor. The top floor of the project: nothing imports it.

    python eval.py --model CKPT --data meta.lst --out runs/eval_ckpt --speaker-model wavlm-sv
    python eval.py --wavs DIR --data test.jsonl --out runs/eval_sys --asr tiny.en --language en
    python eval.py --compare runs/eval_a runs/eval_b
    torchrun --nproc_per_node=N eval.py ...      (rank r takes rows r::N; rank 0 merges)

--model samples as LLASA does (temperature 0.8, top-p 1, no repetition penalty, seeded by --seed);
--temperature 0 decodes greedily (a codec LM decoded greedily tends to loop).

Writes DIR/run.json (what produces the results: --model or --wavs, the ASR, the speaker model,
sampling, seed), DIR/results.jsonl (one row per id; a rerun skips the rows scored without error,
retries the rest, and keeps the rows of ids outside its --data), DIR/summary.json (this --data's
rows) and prints a markdown table. A rerun whose run.json values differ is refused, naming the
flag. A bad row (missing or unreadable wav or prompt audio, unknown language, a clip the scorer or
the ASR refuses) is written with its file:line and `error`, and counted. Every row needs a
language (its own or --language; an English-only Whisper implies en) and a unique id: eval stops
before any work, naming the first row without one (or both rows of an id). A user's error (a bad
flag, a missing file, a foreign --out) is one line on stderr and exit status 2.
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
import results
from results import PROSODY, Refused
from reward import table_error_rate


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
    p.add_argument("--temperature", type=float, default=0.8,
                   help="with --model: sampling temperature (default 0.8, LLASA's); 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling, in (0, 1] (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="repetition penalty, > 0 (default 1.0 = none)")
    p.add_argument("--max-new-tokens", type=int, default=1500, help="speech tokens per clip, 50 per s (default 1500)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed, and --compare's bootstrap seed. Each batch is seeded (--seed + the index "
                        "of its first row), so sampled output (--temperature > 0) repeats for the same --seed, "
                        "--batch-size and world size (a resumed run batches the rows left differently)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda (the rank's) if available, else cpu")
    p.add_argument("--resamples", type=int, default=10000, help="--compare's bootstrap resamples")
    return p.parse_args(argv)


CODECS = ("xcodec2", "tone", "words", "xcodec2-package")


def check_args(args):
    """Every flag and input path, before anything is loaded or written: Refused naming the flag."""
    for name in ("batch_size", "resamples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise Refused(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise Refused(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise Refused(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise Refused(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        raise Refused(f"--repetition-penalty must be > 0 (1 = none), got {args.repetition_penalty}")
    if args.compare:
        for d in args.compare:
            if not os.path.isfile(os.path.join(d, "results.jsonl")):
                raise Refused(f"--compare: no results.jsonl in {d}")
        return
    if not args.data or not args.out:
        raise Refused("--data and --out are needed with --model or --wavs")
    if not os.path.isfile(args.data):
        raise Refused(f"--data {args.data}: no such file")
    if args.wavs and not os.path.isdir(args.wavs):
        raise Refused(f"--wavs {args.wavs}: no such folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise Refused(f"--out {args.out} is a file, not a folder")
    if args.model and args.codec.partition(":")[0] not in CODECS:
        raise Refused(f"--codec {args.codec!r}: expected 'tone', 'words[:PATH]', 'xcodec2[:PATH]' "
                      "or 'xcodec2-package[:PATH]'")
    if args.reward_whisper and not is_function(args.asr):
        raise Refused(f"--reward-whisper {args.reward_whisper!r} is for a module:function --asr; "
                      f"the Whisper --asr {args.asr!r} gives the reward itself")
    from scorer import language_code
    try:
        language_code(args.language or "en")
    except ValueError as e:
        raise Refused(f"--language: {e}") from None
    import torch
    try:
        device = torch.device(args.device or "cpu")
    except RuntimeError as e:
        raise Refused(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Refused(f"--device {args.device!r}: CUDA is not available here")


def fail(flag: str, value, e: Exception):
    """Stop with one line naming what could not be loaded and the flag for a local copy."""
    why = (str(e).splitlines() or [type(e).__name__])[0].replace("--whisper", flag)
    hint = "" if flag in why else f" (point {flag} at a local copy)"  # the error may say it already
    raise Refused(f"cannot load {flag} {value!r}: {why}{hint}")


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
            raise Refused(f"{ex.source}: row {ex.id!r} has no language and --language is not "
                          "given; pass --language (e.g. --language en, or zh for a Chinese list)")


class Scoring:
    """The ASR, the reward's Whisper and the speaker model; score(rows, audios) -> one dict per row."""

    def __init__(self, args, device):
        import scorer
        self.asr_spec, self.asr_fn, whisper_model = args.asr, None, args.asr
        if is_function(args.asr):
            module, _, name = args.asr.partition(":")
            self.asr_fn = getattr(load("--asr", args.asr, lambda: importlib.import_module(module)), name, None)
            if not callable(self.asr_fn):
                raise Refused(f"--asr {args.asr!r}: module {module!r} has no function {name!r}")
            whisper_model = args.reward_whisper
        speaker = None
        if args.speaker_model:
            import speaker as spk
            speaker = load("--speaker-model", args.speaker_model,
                           lambda: spk.load_speaker_model(args.speaker_model, device))
        flag = "--asr" if self.asr_fn is None else "--reward-whisper"
        self.whisper = None if whisper_model is None else load(flag, whisper_model, lambda: scorer.WhisperScorer(
            whisper_model, device, args.language, batch_size=args.batch_size, speaker_model=speaker))
        self.uses_prompts = speaker is not None  # SIM is to the row's voice prompt
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
    """--model: seeded sampled (or greedy) LLASA synthesis through sample.generate and the codec."""

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

    def __call__(self, rows, prompts, index: int):
        """(audios, finished flags, real-time factor, errors) of rows; prompts: each row's voice
        prompt audio or None; `index` seeds the batch. A row whose prompt leaves no room for
        --max-new-tokens in the model's context gets an error (and no audio) instead."""
        from sample import generate
        context = self.model.config.max_position_embeddings
        room = context - self.args.max_new_tokens  # what a prompt may take
        ids = []
        errors = []
        for row, audio in zip(rows, prompts):
            codes = None
            if audio is not None:
                if row["prompt_wav"] not in self.prompt_codes:
                    self.prompt_codes[row["prompt_wav"]] = self.codec.encode([audio])[0]
                codes = self.prompt_codes[row["prompt_wav"]]
            prompt_text = row["_example"].prompt_text if codes is not None else None
            ids.append(data.prompt_ids(self.tokenizer, row["text"], prompt_text, codes))
            why = (f"prompt of {len(ids[-1])} tokens + --max-new-tokens {self.args.max_new_tokens} "
                   f"exceed the model's context of {context} tokens")
            errors.append(why if len(ids[-1]) > room else None)
        go = [i for i, e in enumerate(errors) if e is None]
        audios = [None] * len(rows)
        finished = [False] * len(rows)
        if not go:
            return audios, finished, None, errors
        start = time.perf_counter()
        generator = self.torch.Generator(device=self.device).manual_seed(self.args.seed + index)
        out = generate(self.model, [ids[i] for i in go], max_new_tokens=self.args.max_new_tokens,
                       temperature=self.args.temperature, top_p=self.args.top_p, top_k=self.args.top_k,
                       repetition_penalty=self.args.repetition_penalty, stop_ids=(self.vocab.end_id,),
                       allowed_ids=self.vocab.allowed_ids(), generator=generator)
        ends = (out.lengths - out.finished.long()).tolist()  # the stop token is no speech
        codes = [self.vocab.to_codes(out.tokens[b, :ends[b]].tolist()) for b in range(len(go))]
        for b, (i, audio) in enumerate(zip(go, self.codec.decode(codes))):
            audios[i] = np.asarray(audio, np.float32) if len(codes[b]) else np.zeros(0, np.float32)
            finished[i] = bool(out.finished[b])
        seconds = time.perf_counter() - start
        total = sum(len(audios[i]) for i in go) / data.SAMPLE_RATE
        return audios, finished, seconds / total if total else None, errors


def read_data(args) -> list:
    """--data's examples, refused (Refused) where an id appears twice (naming both file:lines) or
    a row has no language (check_languages). Prompt audio is checked per row later (check_rows)."""
    try:
        examples = data.load_dataset(args.data, check_prompts=False)
    except (OSError, ValueError) as e:
        raise Refused(f"--data: {e}") from None
    first = {}
    for ex in examples:  # an id names its wav and its results row: two rows would share both
        if ex.id in first:
            raise Refused(f"--data: id {ex.id!r} appears twice, {first[ex.id]} and {ex.source}; "
                          "give every row its own id")
        first[ex.id] = ex.source
    check_languages(examples, args)
    return examples


def run_record(args) -> dict:
    """What produces --out's results (run.json): a rerun into that --out must repeat it."""
    def where(value):  # a path absolute, so that a rerun from another folder compares equal
        return os.path.abspath(value) if value and os.path.exists(value) else value

    from scorer import language_code
    language = args.language or ("en" if english_only(args.asr) else None)  # as check_rows has it
    if language is not None:
        language = language_code(language)  # 'English' and 'en' alike
    record = {"model": where(args.model), "wavs": where(args.wavs), "asr": where(args.asr),
              "reward_whisper": where(args.reward_whisper),
              "speaker_model": where(args.speaker_model), "language": language}
    if args.model:  # what --wavs ignores
        record.update(codec=where(args.codec), temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                      max_new_tokens=args.max_new_tokens, seed=args.seed)
    return record


def evaluate(args):
    """Score --data's rows into --out (every rank); returns the summary on rank 0, else None."""
    import torch
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    examples = read_data(args)  # the cheap checks first, on every rank alike: all stop, or none
    record = run_record(args)
    results.check_record(args.out, record)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    ids = [ex.id for ex in examples]
    if rank == 0:  # before any result: what produces them; a stopped run's rank files folded in
        results.write_record(args.out, record)
        results.fold(args.out, ids)
    if world > 1:
        dist.barrier()
    final = os.path.join(args.out, "results.jsonl")
    mine = final if world == 1 else os.path.join(args.out, f"results.rank{rank}.jsonl")
    earlier = results.read_results(final)
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
            answers = run_batch([r for _, r in batch], batch[0][0], args, scoring, synth)
            f.writelines(json.dumps(answer, ensure_ascii=False) + "\n" for answer in answers)
            f.flush()
            bar.update(len(batch))
    bar.close()
    if world > 1:
        dist.barrier()
    summary = None
    if rank == 0:  # one row per id, the newest (a retried row replaces its failure)
        every = results.fold(args.out, ids)
        wanted = set(ids)
        ours = [r for r in every if r["id"] in wanted]
        summary = results.summarize(ours, len(rows), other_rows=len(every) - len(ours))
        with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, ensure_ascii=False)
        print(results.table(summary))
        for bad in summary["bad_rows"]:
            print(f"{bad['source']}: {bad['id']}: {bad['error']}", file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def read_prompt(path: str) -> tuple[np.ndarray | None, str | None]:
    """(a row's voice prompt audio, None), or (None, why it cannot be used)."""
    try:
        audio = data.read_audio(path)
    except Exception as e:  # noqa: BLE001 -- any reason it cannot be read: that row's error
        return None, f"prompt audio {path} cannot be read: {type(e).__name__}: {e}"
    if not np.isfinite(audio).all():
        return None, f"prompt audio {path} has NaN or inf samples"
    return audio, None


def run_batch(rows, index, args, scoring, synth) -> list[dict]:
    """Result dicts of one batch of rows, bad rows answered with their error. Only rows still good
    are read: a row marked bad (check_rows) or failing here is never touched again."""
    out = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    audios, ok = [None] * len(rows), [i for i, r in enumerate(rows) if "error" not in r]
    prompts = [None] * len(rows)
    rtf = None
    if synth is not None or scoring.uses_prompts:
        for i in ok:
            if rows[i]["prompt_wav"]:
                prompts[i], error = read_prompt(rows[i]["prompt_wav"])
                if error:
                    out[i]["error"] = error
        ok = [i for i in ok if "error" not in out[i]]
    if synth is not None and ok:
        clips, fin, rtf, errors = synth([rows[i] for i in ok], [prompts[i] for i in ok], index)
        for i, clip, f, error in zip(ok, clips, fin, errors):
            if error:
                out[i]["error"] = error
                continue
            audios[i] = clip
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


def main(argv=None):
    """eval.py's command line; a user's error (Refused) is one line on stderr, exit status 2."""
    args = parse_args(argv)
    try:
        check_args(args)
        if args.compare:
            return results.compare(*args.compare, resamples=args.resamples, seed=args.seed)
        return evaluate(args)
    except Refused as e:
        print(e, file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    main()
