"""The reward worker: a scorer (scorer.py: WhisperScorer, or a custom reward) in its own process
and on its own device, serving every rank of a node, and its command line. With `speaker_model` in
its scorer_kwargs, the worker also builds that speaker model (speaker.py) on the scorer's device
and answers `sim` for every clip sent with a voice prompt.

WhisperWorker starts the process (spawn) and waits, bounded, until the model is loaded; clients
(WorkerClient, one per rank) send clips over an authenticated local socket, and the worker batches
the pending requests of all ranks into one scorer call. Every wait is bounded and a dead worker is
detected and named with its exit code and traceback (WorkerDiedError), never waited on.

CLI: python whisper_worker.py --model tiny.en --device cpu --language en --wav a.wav --text "Hello."
(or --jsonl rows; rows with prompt_wav also get sim, from --speaker-model, default wavlm-sv).
"""

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Client, wait

import numpy as np
import soundfile as sf

import data
import dnsmos
from reward import RewardConfig, Score
from scorer import SAMPLE_RATE, WINDOW_S, WhisperScorer, check_lengths
from worker_process import serve, write_file

# ---- the worker, seen from its parent and its clients (worker_process.py: the process's side) ----


class WhisperWorker:
    """WhisperScorer(**scorer_kwargs) (or reward="module:function", with scorer_kwargs'
    speaker_model and device only) in its own process (spawn).

    start() blocks until the model is loaded; connect_info() is a picklable tuple that other ranks
    of the node pass to WorkerClient. Every wait is bounded; a dead worker raises WorkerDiedError.
    threads: CPU threads of the worker process (None: torch's default); on a CPU shared with
    training ranks, 1 avoids oversubscribing the cores."""

    def __init__(
        self,
        scorer_kwargs: dict,
        *,
        reward: str = "whisper",
        start_timeout=600.0,
        request_timeout=600.0,
        threads=None,
    ):
        self.scorer_kwargs = dict(scorer_kwargs)
        self.reward = reward
        self.threads = threads
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self.authkey = os.urandom(32)
        self.address = None
        self._process = None
        self._client = None

    def start(self):
        if self._process is not None:
            raise RuntimeError("WhisperWorker.start() was already called")
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or locks from the parent
        self._folder = tempfile.mkdtemp(prefix="whisper_worker_")
        self._pipe, child_end = ctx.Pipe()
        self._process = ctx.Process(
            target=serve,
            name="whisper-worker",
            daemon=True,
            args=(
                self.scorer_kwargs,
                self.reward,
                self.authkey,
                self._folder,
                child_end,
                self.threads,
            ),
        )
        self._process.start()
        child_end.close()  # so that the worker's death reads as EOF here
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self._monitor.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._pipe.poll(0.1):
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(
                    f"Whisper worker did not load within start_timeout={self.start_timeout:g} s"
                )
        try:
            kind, payload = self._pipe.recv()
        except EOFError:  # it died before it could say why (a native crash, or killed)
            report = _death_report(self._process.pid, self._folder)
            self.close()
            raise WorkerDiedError(report) from None
        if kind == "error":
            self.close()
            raise WorkerError(
                f"Whisper worker failed to start (reward={self.reward!r}, "
                f"scorer_kwargs={self.scorer_kwargs}):\n{payload}"
            )
        self.address = payload
        self._client = WorkerClient(self.connect_info(), request_timeout=self.request_timeout)
        return self

    def _watch(self):
        wait([self._process.sentinel])  # ready when the worker ends, however it ends
        self._process.join()
        if self._process.exitcode is not None:
            write_file(self._folder, "exitcode", str(self._process.exitcode))

    def connect_info(self) -> tuple:
        return (self.address, self.authkey, self._folder, self._process.pid)

    def score(self, audios, texts, languages=None, prompts=None) -> list[Score]:
        if self._client is None:
            raise RuntimeError("call WhisperWorker.start() first")
        return self._client.score(audios, texts, languages, prompts)

    def close(self):
        """Stop the worker: ask, then terminate, then kill; each step waits 5 s at most."""
        if self._process is None:
            return
        if self._client is not None:
            self._client.close()
        with contextlib.suppress(OSError):
            self._pipe.send("stop")
        for stop in (lambda: None, self._process.terminate, self._process.kill):
            if self._monitor.is_alive():
                stop()
                self._monitor.join(5.0)
        self._pipe.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        self._process = None
        self._client = None

    def __enter__(self):
        return self if self._process is not None else self.start()

    def __exit__(self, *exc):
        self.close()


class WorkerClient:
    """A connection to a running WhisperWorker, from any process on its node."""

    def __init__(self, info: tuple, request_timeout=600.0):
        self.address, authkey, self.folder, self.pid = info
        self.request_timeout = request_timeout
        self._next_id = 0
        self._lock = threading.Lock()
        try:
            self._conn = Client(self.address, authkey=authkey)
        except OSError as e:
            raise WorkerDiedError(
                f"cannot reach the Whisper worker at {self.address} ({e}); "
                + _death_report(self.pid, self.folder, wait_s=1.0)
            ) from None

    def score(self, audios, texts, languages=None, prompts=None) -> list[Score]:
        """As the worker's scorer.score; prompts: None or one voice prompt (or None) per clip."""
        with self._lock:  # one request at a time per connection
            self._next_id += 1
            request_id = self._next_id
            languages = check_lengths(audios, texts, languages)
            shared = _share(prompts, len(audios))
            try:
                self._conn.send(("score", request_id, list(audios), list(texts), languages, shared))
            except OSError:
                raise WorkerDiedError(_death_report(self.pid, self.folder)) from None
            deadline = time.monotonic() + self.request_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"Whisper worker at {self.address} did not answer {len(audios)} "
                        f"clips within request_timeout={self.request_timeout:g} s"
                    )
                # Short slices: a dead worker shows as EOF on the socket or its exit code on disk.
                try:
                    if not self._conn.poll(min(0.5, left)):
                        if os.path.exists(os.path.join(self.folder, "exitcode")):
                            raise EOFError
                        continue
                    kind, reply_id, payload = self._conn.recv()
                except (EOFError, OSError):
                    raise WorkerDiedError(_death_report(self.pid, self.folder)) from None
                if kind == "died":
                    raise WorkerDiedError(_death_report(self.pid, self.folder, payload))
                if reply_id == request_id:  # other ids answer requests that timed out earlier
                    if kind == "error":
                        raise WorkerError(f"Whisper worker failed on this request:\n{payload}")
                    return payload

    def close(self):
        self._conn.close()


def _share(prompts, n):
    """(distinct prompts, index per clip or -1): each prompt object is sent once, however many
    clips use it. ValueError when prompts and clips differ in number."""
    if prompts is None:
        return None
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} audios and {len(prompts)} prompts; they must match one to one")
    distinct = {}  # id(prompt) -> (its place among the distinct prompts, the prompt)
    index = []  # per clip: its prompt's place, or -1 for none
    for p in prompts:
        if p is None:
            index.append(-1)
            continue
        place, _ = distinct.setdefault(id(p), (len(distinct), p))
        index.append(place)
    return [p for _, p in distinct.values()], index


class WorkerError(RuntimeError):
    """The worker could not start, or failed on a request (its traceback is in the message)."""


class WorkerDiedError(WorkerError):
    """The worker process ended while a client needed it."""


def _death_report(pid, folder, tb=None, wait_s=5.0) -> str:
    """What is known of a dead worker: its exit code (written by its parent) and traceback, if
    any. Waits up to wait_s seconds for the exit code."""
    deadline = time.monotonic() + wait_s
    code = None
    while code is None and time.monotonic() < deadline:
        try:
            with open(os.path.join(folder, "exitcode")) as f:
                code = int(f.read())
        except (OSError, ValueError):
            time.sleep(0.05)
    if code is None:
        how = "exit code unknown (the process that started it is gone, or it was closed)"
    elif code < 0:
        how = f"exit code {code} (killed by {signal.Signals(-code).name})"
    else:
        how = f"exit code {code}"
    if tb is None and os.path.exists(os.path.join(folder, "traceback")):
        with open(os.path.join(folder, "traceback")) as f:
            tb = f.read()
    if tb:
        last_words = f"its traceback:\n{tb}"
    else:
        last_words = "no traceback (killed by a signal, e.g. out of memory, or a native crash)"
    return f"Whisper worker (pid {pid}) died: {how}; {last_words}"


# ---- command line --------------------------------------------------------------------------------


def read_wav(path: str) -> np.ndarray:
    """A wav file as float32 mono [S] at 16 kHz (stereo is averaged); other rates are an error."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)  # [S, channels]
    if rate != SAMPLE_RATE:
        raise ValueError(
            f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} Hz (resample it first, "
            f"e.g. ffmpeg -i in.wav -ar {SAMPLE_RATE} out.wav)"
        )
    return audio.mean(axis=1)


def main(argv=None):
    """The CLI: one JSON line per clip on stdout (wav, text, prompt_wav when given, and the
    clip's reward.Score fields)."""
    parser = argparse.ArgumentParser(
        description="Score wavs against their texts with Whisper: one JSON "
        "line per clip: wav, text and the clip's reward.Score."
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Whisper name (tiny.en, large-v3, ...), checkpoint path or random-tiny",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--language",
        default=None,
        help="language code or name, e.g. en or korean (default: detected)",
    )
    parser.add_argument(
        "--wav", action="append", default=[], help="16 kHz wav; repeat, paired with --text"
    )
    parser.add_argument(
        "--text", action="append", default=[], help="what the matching --wav should say"
    )
    parser.add_argument(
        "--jsonl",
        help='{"wav", "text"[, "language", "prompt_wav"]} rows, wav and '
        "prompt_wav relative to the file; rows with prompt_wav get sim",
    )
    parser.add_argument(
        "--speaker-model",
        default=None,
        help="speaker model for the sim of rows with prompt_wav (speaker.py): wavlm-sv "
        "(default), wavlm-sv:PATH, a Seed-TTS-eval .pth or module:function",
    )
    parser.add_argument(
        "--quality",
        choices=("dnsmos",),
        default=None,
        help="speech quality per clip: dnsmos (DNSMOS P.835 + P.808: dnsmos_sig, dnsmos_bak, "
        "dnsmos_ovrl, dnsmos_p808; pip install speechmos onnxruntime)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-transcript-tokens",
        type=int,
        default=None,
        help="cap on each greedy transcript (default: bounded by each text's length only)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=WINDOW_S,
        help="seconds Whisper hears (default 30; less is faster for short clips: windowed)",
    )
    for name, default in vars(RewardConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=default)
    args = parser.parse_args(argv)
    if len(args.wav) != len(args.text):
        parser.error(f"got {len(args.wav)} --wav and {len(args.text)} --text; give them in pairs")
    rows = [(wav, text, None, None) for wav, text in zip(args.wav, args.text)]
    if args.jsonl:
        rows += _read_rows(args.jsonl)
    if not rows:
        parser.error("nothing to score: give --wav/--text pairs or --jsonl")
    if args.quality == "dnsmos":
        try:
            dnsmos.model_dir()  # the packages, before any model loads
        except ImportError as e:
            parser.error(f"--quality dnsmos: {e}")
    config = RewardConfig(**{name: getattr(args, name) for name in vars(RewardConfig())})
    prompted = any(prompt for *_, prompt in rows)
    speaker_model = None  # sim only for rows with a voice prompt
    if prompted:
        speaker_model = args.speaker_model or "wavlm-sv"
    scorer = WhisperScorer(
        args.model,
        args.device,
        args.language,
        batch_size=args.batch_size,
        max_transcript_tokens=args.max_transcript_tokens,
        reward_config=config,
        window_s=args.window,
        speaker_model=speaker_model,
        quality=args.quality,
    )
    prompt_audio = {path: read_wav(path) for *_, path in rows if path}  # each file read once
    prompts = None
    if prompted:
        prompts = [prompt_audio.get(path) for *_, path in rows]
    results = scorer.score(
        [read_wav(wav) for wav, *_ in rows],
        [text for _, text, *_ in rows],
        [language for _, _, language, _ in rows],
        prompts,
    )
    for (wav, text, _, prompt), result in zip(rows, results):
        row = {"wav": wav, "text": text}
        if prompt:
            row["prompt_wav"] = prompt
        row.update(dataclasses.asdict(result))
        print(json.dumps(row, ensure_ascii=False), flush=True)


def _read_rows(path: str) -> list[tuple]:
    """(wav path, text, language or None, prompt_wav path or None) per row of a JSONL file; wav and
    prompt_wav paths are relative to it, and a prompt_wav file must exist."""
    rows = []
    for lineno, row in data.read_jsonl(path):
        if not isinstance(row.get("wav"), str) or not isinstance(row.get("text"), str):
            raise ValueError(
                f"{path}:{lineno}: expected string fields 'wav' and 'text', got {str(row)[:80]!r}"
            )
        if not isinstance(row.get("language", ""), str):
            raise ValueError(
                f"{path}:{lineno}: field 'language' must be a string, got {row['language']!r}"
            )
        prompt = row.get("prompt_wav")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(
                    f"{path}:{lineno}: field 'prompt_wav' must be a path, got {prompt!r}"
                )
            prompt = os.path.join(os.path.dirname(path), prompt)
            if not os.path.isfile(prompt):
                raise FileNotFoundError(f"{path}:{lineno}: prompt_wav {prompt} not found")
        wav = os.path.join(os.path.dirname(path), row["wav"])
        rows.append((wav, row["text"], row.get("language"), prompt))
    return rows


if __name__ == "__main__":
    main()
