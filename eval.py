"""Evaluate TTS: synthesize a test set with a checkpoint (--model), or take any system's wavs
(--wavs), and score every row: transcript, WER or CER as seed-tts-eval's run_wer.py computes them
(reward.table_error_rate), speaker similarity to the row's voice prompt, the TTS reward, prosody,
DNSMOS (--quality dnsmos), duration and real-time factor. A clip over 30 s is transcribed in
Whisper's 30 s windows and counted (the reward's rule gives it reward 0). The top floor of the
project: nothing imports it. Its flags and their checks are eval_args.py's.

    python eval.py --model CKPT --data meta.lst --out runs/eval_ckpt --speaker-model wavlm-sv
    python eval.py --wavs DIR --data test.jsonl --out runs/eval_sys --asr tiny.en --language en
    python eval.py --compare runs/eval_a runs/eval_b
    torchrun --nproc_per_node=N eval.py ...      (rank r takes rows r::N; rank 0 merges)

--model samples as LLASA does (temperature 0.8, top-p 1, no repetition penalty, seeded by --seed);
--temperature 0 decodes greedily (a codec LM decoded greedily tends to loop).

Writes DIR/run.json (what produces the results: --model or --wavs, the ASR, the speaker model,
--quality, sampling, seed), DIR/results.jsonl (one row per id; a rerun skips the rows scored without
error, retries the rest, and keeps the rows of ids outside its --data), DIR/summary.json (this
--data's rows) and prints a markdown table. A rerun whose run.json values differ is refused, naming
the flag. A bad row (missing or unreadable wav or prompt audio, unknown language, a clip the scorer
or the ASR refuses) is written with its file:line and `error`, and counted. Every row needs a
language (its own or --language; an English-only Whisper implies en) and a unique id: eval stops
before any work, naming the first row without one (or both rows of an id). A user's error (a bad
flag, a missing file, a foreign --out) is one line on stderr and exit status 2.
"""

import importlib
import json
import os
import sys
import time

import numpy as np

import data
import results
from eval_args import (
    check_args,
    default_language,
    is_function,
    load,
    parse_args,
    read_data,
    run_record,
)
from eval_args import english_only as english_only  # re-exported: tests call eval.english_only
from results import PROSODY, Refused
from reward import table_error_rate

WINDOW = 30 * data.SAMPLE_RATE  # samples: what Whisper hears at once (whisper.audio.N_SAMPLES)


def windows(audio: np.ndarray) -> list[np.ndarray]:
    """audio [S] cut into Whisper's 30 s windows, one after another (the last one shorter)."""
    return [audio[start : start + WINDOW] for start in range(0, len(audio), WINDOW)]


class Scoring:
    """The ASR, the reward's Whisper, the speaker model and DNSMOS; score(rows, audios, prompts)
    -> one dict per row. Refused naming the flag of a model that cannot be loaded."""

    def __init__(self, args, device):
        import scorer

        self.asr_spec = args.asr
        self.asr_fn = None  # a module:function ASR; None: the Whisper transcribes
        whisper_model = args.asr  # the Whisper that scores (reward, NLL, prosody), if any
        if is_function(args.asr):
            module_name, _, name = args.asr.partition(":")
            module = load("--asr", args.asr, lambda: importlib.import_module(module_name))
            self.asr_fn = getattr(module, name, None)
            if not callable(self.asr_fn):
                raise Refused(
                    f"--asr {args.asr!r}: module {module_name!r} has no function {name!r}"
                )
            whisper_model = args.reward_whisper
        self.sims = None  # SIM is to the row's voice prompt, for every clip heard (over 30 s too)
        if args.speaker_model:
            import speaker as spk

            speaker = load(
                "--speaker-model",
                args.speaker_model,
                lambda: spk.load_speaker_model(args.speaker_model, device),
            )
            self.sims = spk.SpeakerSimilarity(speaker)
        self.uses_prompts = self.sims is not None
        self.whisper = None
        if whisper_model is not None:
            flag = "--asr" if self.asr_fn is None else "--reward-whisper"
            self.whisper = load(
                flag,
                whisper_model,
                lambda: scorer.WhisperScorer(
                    whisper_model, device, args.language, batch_size=args.batch_size
                ),
            )
        self.dnsmos = None
        if args.quality == "dnsmos":
            import torch

            import dnsmos

            # torch's CPU threads: every core alone, one per rank under torchrun (OMP_NUM_THREADS)
            threads = torch.get_num_threads()
            self.dnsmos = load("--quality", "dnsmos", lambda: dnsmos.DNSMOS(threads=threads))

    def score(self, rows, audios, prompts) -> list[dict]:
        """One dict per row: transcript, WER or CER, sim, reward, nll, prosody, DNSMOS; or `error`.
        audios: float32 16 kHz clips; prompts: each row's voice prompt audio or None."""
        texts = [r["text"] for r in rows]
        languages = [r["language"] for r in rows]
        scores = [None] * len(rows)  # the Whisper's reward.Score per clip, when there is one
        if self.whisper:
            scores = self.whisper.score(audios, texts, languages)
        heard = []  # the clips scored: not those the Whisper could not hear (bad input)
        for audio, s in zip(audios, scores):
            if s is not None and s.error and not s.too_long:
                heard.append(None)
            else:
                heard.append(audio)
        sims = [None] * len(rows)
        if self.sims:
            sims = self.sims.sims(heard, prompts)
        long = {}  # row index -> (transcript, error) of a clip over 30 s, heard in windows
        if self.asr_fn is None:
            over = [i for i, s in enumerate(scores) if s.too_long]
            pieces = self.transcribe_windows([rows[i] for i in over], [audios[i] for i in over])
            long = dict(zip(over, pieces))
        out = []
        for i, row in enumerate(rows):
            out.append(self.score_row(row, audios[i], scores[i], sims[i], long.get(i)))
        return out

    def score_row(self, row, audio, s, sim, long) -> dict:
        """One row's dict (score's); s: the Whisper's Score or None; long: (transcript, error) of a
        clip over 30 s that the Whisper transcribed in windows, else None."""
        from prosody import measure

        too_long = s is not None and s.too_long  # the reward's rule: reward 0; still rated here
        if s is not None and s.error and not too_long:
            return dict(error=s.error, too_long=False)
        if self.asr_fn is not None:
            try:
                transcript = str(self.asr_fn(audio, row["language"]))
            except Exception as e:  # the ASR failing on one clip is that row's error, counted
                error = f"--asr {self.asr_spec}: {type(e).__name__}: {e}"
                return dict(error=error, too_long=too_long)
        elif too_long:
            transcript, error = long
            if error:
                return dict(error=error, too_long=True)
        else:
            transcript = s.transcript
        got = dict(transcript=transcript, too_long=too_long, sim=sim, reward=None, nll=None)
        if s is not None:
            got.update(reward=s.reward, nll=s.nll)
        if s is None or too_long:  # the Whisper measured no prosody: measured here
            got.update(measure(audio, row["text"]))
        else:
            got.update({k: getattr(s, k) for k in PROSODY})
        if self.dnsmos is not None:
            silence = np.zeros(1, np.float32)  # an empty clip is rated as the silence it is
            got.update(self.dnsmos.score(audio if len(audio) else silence))
        try:
            kind, rate = table_error_rate(row["text"], transcript, row["language"])
        except ValueError as e:  # a text with nothing left to compare after normalization
            return dict(error=str(e), too_long=too_long)
        got.update(metric=kind, **{kind: rate})
        return got

    def transcribe_windows(self, rows, audios) -> list[tuple[str, str | None]]:
        """(transcript, error) of each clip over 30 s: its 30 s windows transcribed one by one by
        the Whisper, each alone as a short clip is (bounded by the row's whole text), joined by a
        space; error: the first failing window's, else None."""
        clips = []  # every window of every clip, in order
        owners = []  # owners[w]: the index of window w's clip
        for i, audio in enumerate(audios):
            for window in windows(audio):
                clips.append(window)
                owners.append(i)
        texts = [rows[i]["text"] for i in owners]
        languages = [rows[i]["language"] for i in owners]
        scores = []
        if clips:
            scores = self.whisper.score(clips, texts, languages)
        heard = [[] for _ in audios]  # each clip's windows' transcripts, in order
        errors = [None] * len(audios)
        for i, s in zip(owners, scores):
            if s.error and errors[i] is None:
                errors[i] = f"a 30 s window: {s.error}"
            if s.transcript:
                heard[i].append(s.transcript)
        return [(" ".join(pieces), error) for pieces, error in zip(heard, errors)]


def prompt_problem(path: str) -> str | None:
    """Why a row's prompt audio cannot be used (missing, unreadable, empty), else None."""
    if not os.path.isfile(path):
        return f"prompt audio not found: {path}"
    try:
        import soundfile

        frames = soundfile.info(path).frames
    except Exception as e:  # any reason it cannot be read, named
        return f"prompt audio {path} cannot be read: {e}"
    return None if frames else f"prompt audio {path} is empty"


def check_rows(examples, args):
    """One row dict per example, with `error` set where the row cannot be scored (unknown language,
    missing or unreadable prompt audio, missing wav with --wavs)."""
    from scorer import language_code

    rows = []
    for ex in examples:
        language = ex.language or default_language(args)
        row = dict(id=ex.id, source=ex.source, text=ex.text, language=language)
        if language is not None:
            try:
                row["language"] = language_code(language)
            except ValueError as e:
                row["error"] = str(e)
        if ex.prompt_wav and "error" not in row:
            problem = prompt_problem(ex.prompt_wav)
            if problem:
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

        self.torch = torch
        self.args = args
        self.device = device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model, self.tokenizer = load(
            "--model", args.model, lambda: load_model(demo.resolve_model(args.model), device, dtype)
        )
        self.codec = load("--codec", args.codec, lambda: codec.load_codec(args.codec, device))
        self.vocab = data.speech_vocab(self.tokenizer)
        self.prompt_codes = {}  # prompt_wav path -> its speech codes, each prompt encoded once

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
            if len(ids[-1]) > room:
                errors.append(
                    f"prompt of {len(ids[-1])} tokens + --max-new-tokens "
                    f"{self.args.max_new_tokens} exceed the model's context of {context} tokens"
                )
            else:
                errors.append(None)
        go = [i for i, e in enumerate(errors) if e is None]  # the rows generated, by index
        audios = [None] * len(rows)
        finished = [False] * len(rows)
        if not go:
            return audios, finished, None, errors
        start = time.perf_counter()
        generator = self.torch.Generator(device=self.device).manual_seed(self.args.seed + index)
        out = generate(
            self.model,
            [ids[i] for i in go],
            max_new_tokens=self.args.max_new_tokens,
            temperature=self.args.temperature,
            top_p=self.args.top_p,
            top_k=self.args.top_k,
            repetition_penalty=self.args.repetition_penalty,
            stop_ids=(self.vocab.end_id,),
            allowed_ids=self.vocab.allowed_ids(),
            generator=generator,
        )
        ends = (out.lengths - out.finished.long()).tolist()  # [B]; the stop token is no speech
        speech = [self.vocab.to_codes(out.tokens[b, : ends[b]].tolist()) for b in range(len(go))]
        for b, (i, audio) in enumerate(zip(go, self.codec.decode(speech))):
            if len(speech[b]):
                audios[i] = np.asarray(audio, np.float32)
            else:
                audios[i] = np.zeros(0, np.float32)
            finished[i] = bool(out.finished[b])
        seconds = time.perf_counter() - start
        total = sum(len(audios[i]) for i in go) / data.SAMPLE_RATE  # seconds of audio made
        rtf = None
        if total:
            rtf = seconds / total
        return audios, finished, rtf, errors


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
    default_device = "cpu"
    if torch.cuda.is_available():
        default_device = f"cuda:{local}"
    device = torch.device(args.device or default_device)
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

    desc = f"eval rank {rank}" if world > 1 else "eval"
    bar = tqdm(total=len(todo), desc=desc, disable=rank != 0)
    with open(mine, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]  # (row index, row) pairs
            first = batch[0][0]  # the batch's seed is --seed + its first row's index
            answers = run_batch([r for _, r in batch], first, args, scoring, synth)
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
    except Exception as e:  # any reason it cannot be read: that row's error
        return None, f"prompt audio {path} cannot be read: {type(e).__name__}: {e}"
    if not np.isfinite(audio).all():
        return None, f"prompt audio {path} has NaN or inf samples"
    return audio, None


def run_batch(rows, index, args, scoring, synth) -> list[dict]:
    """Result dicts of one batch of rows, bad rows answered with their error. Only rows still good
    are read: a row marked bad (check_rows) or failing here is never touched again."""
    out = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    audios = [None] * len(rows)
    ok = [i for i, r in enumerate(rows) if "error" not in r]  # the rows still good, by index
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
        clips, finished, rtf, errors = synth([rows[i] for i in ok], [prompts[i] for i in ok], index)
        for i, clip, clip_finished, error in zip(ok, clips, finished, errors):
            if error:
                out[i]["error"] = error
                continue
            audios[i] = clip
            out[i]["truncated"] = not clip_finished
    if synth is None:
        for i in ok:
            try:
                audios[i] = data.read_audio(rows[i]["wav"])
            except Exception as e:  # an unreadable file is a bad row, named
                out[i]["error"] = f"unreadable audio {rows[i]['wav']}: {type(e).__name__}: {e}"
    ok = [i for i in ok if "error" not in out[i]]
    if args.model and ok:
        os.makedirs(os.path.join(args.out, "wavs"), exist_ok=True)
        import soundfile

        for i in ok:
            name = rows[i]["id"].replace(os.sep, "_")
            soundfile.write(
                os.path.join(args.out, "wavs", f"{name}.wav"), audios[i], data.SAMPLE_RATE
            )
    if ok:
        scores = scoring.score(
            [rows[i] for i in ok], [audios[i] for i in ok], [prompts[i] for i in ok]
        )
        for i, s in zip(ok, scores):
            out[i].update(s)
    for i in ok:
        audio = audios[i]
        out[i].update(
            duration_s=len(audio) / data.SAMPLE_RATE, silent=not bool(np.any(audio)), rtf=rtf
        )
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
