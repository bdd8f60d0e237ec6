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
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener, wait

import numpy as np
import soundfile as sf
import torch

import data
from reward import RewardConfig, Score
from scorer import SAMPLE_RATE, WINDOW_S, CustomRewardScorer, WhisperScorer, check_lengths


# ---- the worker process ------------------------------------------------------------------------------
# Parent --Pipe--> worker: "ready" + address (or "error" + traceback) at start; any message or EOF = stop.
# Clients --socket--> worker: ("score", request_id, audios, texts, languages, prompts), prompts None or
# (distinct prompt arrays, one index per clip, -1 for none): a prompt shared by a group is sent once.
# Replies ("ok", id, results),
# ("error", id, traceback) or ("died", None, traceback). The parent writes the exit code into the
# worker's folder, so that every client can name it.

class WhisperWorker:
    """WhisperScorer(**scorer_kwargs) (or reward="module:function", with scorer_kwargs' speaker_model
    and device only) in its own process (spawn).

    start() blocks until the model is loaded; connect_info() is a picklable tuple that other ranks of
    the node pass to WorkerClient. Every wait is bounded; a dead worker raises WorkerDiedError.
    threads: CPU threads of the worker process (None: torch's default); on a CPU shared with
    training ranks, 1 avoids oversubscribing the cores."""

    def __init__(self, scorer_kwargs: dict, *, reward: str = "whisper", start_timeout=600.0,
                 request_timeout=600.0, threads=None):
        self.scorer_kwargs, self.reward, self.threads = dict(scorer_kwargs), reward, threads
        self.start_timeout, self.request_timeout = start_timeout, request_timeout
        self.authkey, self.address = os.urandom(32), None
        self._process = self._client = None

    def start(self):
        if self._process is not None:
            raise RuntimeError("WhisperWorker.start() was already called")
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or locks from the parent
        self._folder = tempfile.mkdtemp(prefix="whisper_worker_")
        self._pipe, child_end = ctx.Pipe()
        self._process = ctx.Process(target=_serve, name="whisper-worker", daemon=True,
                                    args=(self.scorer_kwargs, self.reward, self.authkey, self._folder,
                                          child_end, self.threads))
        self._process.start()
        child_end.close()  # so that the worker's death reads as EOF here
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self._monitor.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._pipe.poll(0.1):
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"Whisper worker did not load within "
                                   f"start_timeout={self.start_timeout:g} s")
        try:
            kind, payload = self._pipe.recv()
        except EOFError:  # it died before it could say why (a native crash, or killed)
            report = _death_report(self._process.pid, self._folder)
            self.close()
            raise WorkerDiedError(report) from None
        if kind == "error":
            self.close()
            raise WorkerError(f"Whisper worker failed to start (reward={self.reward!r}, "
                              f"scorer_kwargs={self.scorer_kwargs}):\n{payload}")
        self.address = payload
        self._client = WorkerClient(self.connect_info(), request_timeout=self.request_timeout)
        return self

    def _watch(self):
        wait([self._process.sentinel])  # ready when the worker ends, however it ends
        self._process.join()
        if self._process.exitcode is not None:
            _write(self._folder, "exitcode", str(self._process.exitcode))

    def connect_info(self) -> tuple:
        return (self.address, self.authkey, self._folder, self._process.pid)

    def score(self, audios, texts, languages=None, prompts=None) -> list[Score]:
        if self._client is None:
            raise RuntimeError("call WhisperWorker.start() first")
        return self._client.score(audios, texts, languages, prompts)

    def close(self):
        """Stop the worker: ask, then terminate, then kill; each step waits a few seconds at most."""
        if self._process is None:
            return
        if self._client is not None:
            self._client.close()
        try:
            self._pipe.send("stop")
        except OSError:
            pass
        for stop in (lambda: None, self._process.terminate, self._process.kill):
            if self._monitor.is_alive():
                stop()
                self._monitor.join(5.0)
        self._pipe.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        self._process = self._client = None

    def __enter__(self):
        return self if self._process is not None else self.start()

    def __exit__(self, *exc):
        self.close()


class WorkerClient:
    """A connection to a running WhisperWorker, from any process on its node."""

    def __init__(self, info: tuple, request_timeout=600.0):
        self.address, authkey, self.folder, self.pid = info
        self.request_timeout, self._next_id, self._lock = request_timeout, 0, threading.Lock()
        try:
            self._conn = Client(self.address, authkey=authkey)
        except OSError as e:
            raise WorkerDiedError(f"cannot reach the Whisper worker at {self.address} ({e}); "
                                  + _death_report(self.pid, self.folder, wait_s=1.0)) from None

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
                    raise TimeoutError(f"Whisper worker at {self.address} did not answer {len(audios)} "
                                       f"clips within request_timeout={self.request_timeout:g} s")
                # Short slices: a dead worker shows as EOF on the socket, or as its exit code on disk.
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
    """(distinct prompts, index per clip or -1): each prompt object sent once however many clips use it."""
    if prompts is None:
        return None
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} audios and {len(prompts)} prompts; they must match one to one")
    distinct, index = {}, []
    for p in prompts:
        index.append(-1 if p is None else distinct.setdefault(id(p), (len(distinct), p))[0])
    return [p for _, p in distinct.values()], index


class WorkerError(RuntimeError):
    """The worker could not start, or failed on a request (its traceback is in the message)."""


class WorkerDiedError(WorkerError):
    """The worker process ended while a client needed it."""


def _serve(scorer_kwargs, reward, authkey, folder, parent, threads):
    try:
        if threads:
            torch.set_num_threads(threads)
        if reward == "whisper":
            scorer = WhisperScorer(**scorer_kwargs)
        else:
            scorer = CustomRewardScorer(reward, speaker_model=scorer_kwargs.get("speaker_model"),
                                        device=scorer_kwargs.get("device", "cpu"))
        listener = Listener(("127.0.0.1", 0), authkey=authkey)  # port 0: any free port
    except BaseException:
        parent.send(("error", traceback.format_exc()))  # start() raises it
        return
    clients, lock = [], threading.Lock()

    def accept():
        while True:
            try:
                conn = listener.accept()  # runs the auth-key handshake
            except (mp.AuthenticationError, EOFError, ConnectionError):  # a bad key, or a caller that left
                continue
            except OSError:  # the listener was closed
                return
            with lock:
                clients.append(conn)

    def drop(conn):
        with lock:
            clients.remove(conn)
        conn.close()

    threading.Thread(target=accept, daemon=True).start()
    parent.send(("ready", listener.address))
    try:
        while not parent.poll():
            with lock:
                conns = list(clients)
            if not conns:
                time.sleep(0.05)
            requests = []
            for conn in wait(conns, timeout=0.05) if conns else []:
                try:
                    requests.append((conn, conn.recv()))
                except (EOFError, OSError):  # that client went away; the others carry on
                    drop(conn)
            if requests:
                _answer(scorer, requests, drop)
    except BaseException:
        tb = traceback.format_exc()
        _write(folder, "traceback", tb)
        for conn in clients:
            try:
                conn.send(("died", None, tb))
            except OSError:
                pass
        raise
    finally:
        listener.close()


def _answer(scorer, requests, drop):
    """Score every pending request in one scorer call (batching across ranks), then reply to each."""
    audios = [a for _, (_, _, clips, *_) in requests for a in clips]
    texts = [t for _, (_, _, _, clip_texts, *_) in requests for t in clip_texts]
    languages = [lang for _, (_, _, _, _, clip_languages, _) in requests for lang in clip_languages]
    prompts = None
    if any(shared is not None for _, (*_, shared) in requests):
        prompts = [None if shared is None or shared[1][k] < 0 else shared[0][shared[1][k]]
                   for _, (_, _, clips, _, _, shared) in requests for k in range(len(clips))]
    try:
        results, replies = scorer.score(audios, texts, languages, prompts=prompts), []
        for conn, (_, request_id, clips, *_) in requests:
            replies.append((conn, ("ok", request_id, results[:len(clips)])))
            results = results[len(clips):]
    except Exception:  # e.g. a custom reward that raised: the request fails, the worker lives on
        tb = traceback.format_exc()
        replies = [(conn, ("error", request_id, tb)) for conn, (_, request_id, *_) in requests]
    for conn, reply in replies:
        try:
            conn.send(reply)
        except OSError:  # the client left mid-request
            drop(conn)


def _write(folder, name, text):
    try:
        with open(os.path.join(folder, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))  # readers never see half
    except OSError:  # the folder is gone: the worker was closed
        pass


def _death_report(pid, folder, tb=None, wait_s=5.0) -> str:
    """What is known of a dead worker: its exit code (written by its parent) and traceback, if any."""
    deadline, code = time.monotonic() + wait_s, None
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
    return (f"Whisper worker (pid {pid}) died: {how}; " + (f"its traceback:\n{tb}" if tb else
            "no traceback (killed by a signal, e.g. out of memory, or a native crash)"))


# ---- command line ------------------------------------------------------------------------------------

def read_wav(path: str) -> np.ndarray:
    """A wav file as float32 mono [S] at 16 kHz (stereo is averaged); other rates are an error."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)  # [S, channels]
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} Hz (resample it first, "
                         f"e.g. ffmpeg -i in.wav -ar {SAMPLE_RATE} out.wav)")
    return audio.mean(axis=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score wavs against their texts with Whisper: one JSON "
                                                 "line per clip: wav, text and the clip's reward.Score.")
    parser.add_argument("--model", required=True,
                        help="Whisper name (tiny.en, large-v3, ...), checkpoint path or random-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--language", default=None, help="language code or name, e.g. en or korean "
                                                          "(default: detected)")
    parser.add_argument("--wav", action="append", default=[], help="16 kHz wav; repeat, paired with --text")
    parser.add_argument("--text", action="append", default=[], help="what the matching --wav should say")
    parser.add_argument("--jsonl", help='{"wav", "text"[, "language", "prompt_wav"]} rows, wav and '
                                        'prompt_wav relative to the file; rows with prompt_wav get sim')
    parser.add_argument("--speaker-model", default=None,
                        help="speaker model for the sim of rows with prompt_wav (speaker.py): wavlm-sv "
                             "(default), wavlm-sv:PATH, a Seed-TTS-eval .pth or module:function")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-transcript-tokens", type=int, default=None,
                        help="cap on each greedy transcript (default: bounded by each text's length only)")
    parser.add_argument("--window", type=float, default=WINDOW_S,
                        help="seconds Whisper hears (default 30; less is faster for short clips: windowed)")
    for name, default in vars(RewardConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=default)
    args = parser.parse_args(argv)
    if len(args.wav) != len(args.text):
        parser.error(f"got {len(args.wav)} --wav and {len(args.text)} --text; give them in pairs")
    rows = [(wav, text, None, None) for wav, text in zip(args.wav, args.text)]
    rows += _read_rows(args.jsonl) if args.jsonl else []
    if not rows:
        parser.error("nothing to score: give --wav/--text pairs or --jsonl")
    config = RewardConfig(**{name: getattr(args, name) for name in vars(RewardConfig())})
    prompted = any(prompt for *_, prompt in rows)
    scorer = WhisperScorer(args.model, args.device, args.language, batch_size=args.batch_size,
                           max_transcript_tokens=args.max_transcript_tokens, reward_config=config,
                           window_s=args.window,
                           speaker_model=(args.speaker_model or "wavlm-sv") if prompted else None)
    prompt_audio = {path: read_wav(path) for *_, path in rows if path}  # each file read once
    results = scorer.score([read_wav(wav) for wav, *_ in rows], [text for _, text, *_ in rows],
                           [language for _, _, language, _ in rows],
                           [prompt_audio.get(path) for *_, path in rows] if prompted else None)
    for (wav, text, _, prompt), result in zip(rows, results):
        row = {"wav": wav, "text": text, **({"prompt_wav": prompt} if prompt else {}),
               **dataclasses.asdict(result)}
        print(json.dumps(row, ensure_ascii=False), flush=True)


def _read_rows(path: str) -> list[tuple]:
    """(wav path, text, language or None, prompt_wav path or None) per row of a JSONL file; wav and
    prompt_wav paths are relative to it, and a prompt_wav file must exist."""
    rows = []
    for lineno, row in data.read_jsonl(path):
        if not isinstance(row.get("wav"), str) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected string fields 'wav' and 'text', "
                             f"got {str(row)[:80]!r}")
        if not isinstance(row.get("language", ""), str):
            raise ValueError(f"{path}:{lineno}: field 'language' must be a string, got {row['language']!r}")
        prompt = row.get("prompt_wav")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{lineno}: field 'prompt_wav' must be a path, got {prompt!r}")
            prompt = os.path.join(os.path.dirname(path), prompt)
            if not os.path.isfile(prompt):
                raise FileNotFoundError(f"{path}:{lineno}: prompt_wav {prompt} not found")
        rows.append((os.path.join(os.path.dirname(path), row["wav"]), row["text"], row.get("language"),
                     prompt))
    return rows


if __name__ == "__main__":
    main()
