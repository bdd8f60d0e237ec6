"""Whisper scoring of TTS clips: transcript, CER, NLL and reward, in-process or as a worker process.

WhisperScorer batches clips (sorted by length), runs the Whisper encoder once per clip, and uses those
features twice: for the greedy transcript (whisper.decode, the batched layer) and for the
teacher-forced NLL of the intended text (DESIGN.md §2). WhisperWorker serves the same `.score` from
a separate process on its own device to every rank of a node, over an authenticated local socket.

CLI: python whisper_worker.py --model tiny.en --device cpu --language en --wav a.wav --text "Hello."
"""
import argparse
import importlib
import json
import math
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
import torch.nn.functional as F
import whisper
from whisper.audio import N_SAMPLES, SAMPLE_RATE  # 480000 samples = the 30 s window, 16000 Hz
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, get_tokenizer

from reward import RewardConfig, char_error_rate, normalize_text, tts_reward


class WhisperScorer:
    """Scores clips against their intended texts with one Whisper model on one device.

    model: an openai-whisper name ("large-v3", "tiny.en", ...), a checkpoint path, "random-tiny"
    (seeded random multilingual weights, for offline smoke runs) or a whisper.model.Whisper.
    language: default language code (None: detected per clip; English-only models use "en").
    fp16: None = half precision on CUDA (the model's weights are converted, LayerNorms kept float32),
    float32 on CPU. max_transcript_tokens bounds the greedy transcript (random-weight Whisper never
    stops on its own)."""

    def __init__(self, model, device="cpu", language=None, *, batch_size=16, max_transcript_tokens=128,
                 fp16=None, reward_config=None, download_root=None):
        self.device = torch.device(device)
        self.model = load_whisper(model, self.device, download_root).eval()
        self.fp16 = self.device.type == "cuda" if fp16 is None else bool(fp16)
        if self.fp16 and self.device.type != "cuda":
            raise ValueError(f"fp16=True needs a CUDA device, got device={device!r}")
        if self.fp16:
            _half_except_layernorm(self.model)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= max_transcript_tokens <= self.model.dims.n_text_ctx // 2:
            raise ValueError(f"max_transcript_tokens must be in [1, {self.model.dims.n_text_ctx // 2}], "
                             f"got {max_transcript_tokens}")
        self.batch_size, self.max_transcript_tokens = batch_size, max_transcript_tokens
        self.reward_config = reward_config if isinstance(reward_config, RewardConfig) else RewardConfig(**(reward_config or {}))
        self.language = self._language_code(language)
        self._eot = self._tokenizer(self.language).eot

    def score(self, audios, texts, languages=None) -> list[dict]:
        """One dict per clip: transcript, cer, nll (nats/token), reward in [0, 1], error, truncated.

        audios: float32 arrays [S] at 16 kHz; languages: None or one code per clip (None entries use
        the default). A bad clip gets reward 0.0 and `error` set; the others are scored normally."""
        languages = _check_lengths(audios, texts, languages)
        results, groups, clips = [None] * len(audios), {}, {}
        for i, (audio, text, language) in enumerate(zip(audios, texts, languages)):
            try:
                language = self._language_code(self.language if language is None else language)
                audio, text = check_audio(audio), check_text(text)
                tokenizer = self._tokenizer(language)
                target = tokenizer.encode(" " + text)
                if len(tokenizer.sot_sequence_including_notimestamps) + len(target) + 1 > self.model.dims.n_text_ctx:
                    raise _BadInput(f"text is {len(target)} tokens, too long for Whisper's "
                                    f"{self.model.dims.n_text_ctx}-token context")
            except _BadInput as e:
                results[i] = _failed(str(e))
                continue
            clips[i] = (audio[:N_SAMPLES], text, target, len(audio) > N_SAMPLES)
            groups.setdefault(language, []).append(i)
        for language, indices in groups.items():  # whisper.decode pins one language per call
            indices.sort(key=lambda i: len(clips[i][0]))  # similar lengths decode for similar numbers of steps
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                for i, result in zip(batch, self._score_batch([clips[i] for i in batch], language)):
                    results[i] = result
        return results

    @torch.inference_mode()
    def _score_batch(self, clips, language) -> list[dict]:
        dtype = torch.float16 if self.fp16 else torch.float32
        # Per clip: log_mel_spectrogram clamps to (max - 8) over its whole input, so a batched call
        # would let one clip's loudness change another's features.
        mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), self.model.dims.n_mels,
                                                       device=self.device) for audio, *_ in clips])
        features = self.model.encoder(mel.to(dtype))  # [B, n_audio_ctx, n_audio_state], the one encoder pass
        options = whisper.DecodingOptions(language=language, without_timestamps=True, fp16=self.fp16,
                                          sample_len=self.max_transcript_tokens, temperature=0.0)
        decoded = whisper.decode(self.model, features, options)  # accepts encoded features as they are
        sequences, n_prefix = [], []
        for (_, _, target, _), d in zip(clips, decoded):  # d.language: the pinned or the detected one
            tokenizer = self._tokenizer(d.language)
            prefix = list(tokenizer.sot_sequence_including_notimestamps)
            sequences.append(prefix + target + [tokenizer.eot])
            n_prefix.append(len(prefix))
        nlls = teacher_forced_nll(self.model, features, sequences, n_prefix)
        results = []
        for (_, text, _, truncated), d, nll in zip(clips, decoded, nlls):
            # Text tokens only: a weak model may emit special tokens, which decode() would spell out.
            transcript = self._tokenizer(d.language).decode([t for t in d.tokens if t < self._eot]).strip()
            cer = char_error_rate(text, transcript)
            results.append({"transcript": transcript, "cer": cer, "nll": nll, "error": None, "truncated": truncated,
                            "reward": tts_reward(cer, nll, **vars(self.reward_config))})
        return results

    def _tokenizer(self, language):
        return get_tokenizer(self.model.is_multilingual, num_languages=self.model.num_languages,
                             language=language, task="transcribe")

    def _language_code(self, language):
        """Whisper language code for a code or name; None stays None (detect) on multilingual models."""
        if language is None:
            return None if self.model.is_multilingual else "en"
        code = TO_LANGUAGE_CODE.get(str(language).lower(), str(language).lower())
        if code not in LANGUAGES or list(LANGUAGES).index(code) >= self.model.num_languages:
            raise _BadInput(f"unknown language {language!r} for this Whisper model "
                            f"(use a code such as 'en' or 'ko', or a name such as 'korean')")
        if not self.model.is_multilingual and code != "en":
            raise _BadInput(f"language {language!r}: this Whisper model is English-only")
        return code


def teacher_forced_nll(model, features, sequences, n_prefix) -> list[float]:
    """Mean cross-entropy (nats/token) of each sequence's tokens after its prefix, in one decoder pass.

    features [B, n_audio_ctx, n_audio_state]; sequences: B token lists (SOT prefix + text + eot) of
    different lengths, right-padded here to [B, L + 1]; n_prefix[b]: prefix length of sequence b."""
    batch, length = len(sequences), max(map(len, sequences)) - 1
    tokens = torch.zeros(batch, length + 1, dtype=torch.long)
    scored = torch.zeros(batch, length, dtype=torch.bool)  # [B, L]: True where the next token is text or eot
    for b, sequence in enumerate(sequences):
        tokens[b, :len(sequence)] = torch.tensor(sequence)
        scored[b, n_prefix[b] - 1:len(sequence) - 1] = True
    tokens, scored = tokens.to(features.device), scored.to(features.device)
    logits = model.decoder(tokens[:, :-1], features)  # [B, L, n_vocab], float32; causal, so padding is inert
    ce = torch.zeros(batch, length, device=features.device)
    ce[scored] = F.cross_entropy(logits[scored], tokens[:, 1:][scored], reduction="none")
    return (ce.sum(1) / scored.sum(1)).tolist()


def load_whisper(model, device, download_root=None) -> Whisper:
    if isinstance(model, Whisper):
        return model.to(device)
    if model == "random-tiny":
        return random_tiny_whisper().to(device)
    if model not in whisper.available_models() and not os.path.isfile(model):
        raise FileNotFoundError(f"Whisper model {model!r} is neither a checkpoint file nor one of "
                                f"{whisper.available_models()} nor 'random-tiny'")
    return whisper.load_model(model, device=device, download_root=download_root)


def random_tiny_whisper(seed: int = 0) -> Whisper:
    """A small multilingual Whisper with seeded random weights: same model for the same seed, and the
    caller's random state is left untouched."""
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Whisper(dims)
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)  # Whisper leaves it torch.empty
    return model


def _half_except_layernorm(model):
    # Whisper's LayerNorm computes in float32 (it upcasts its input); its Linear and Conv1d cast their
    # weights to the input's dtype on every call, which half-precision weights make free.
    model.half()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()


class _BadInput(ValueError):
    """One clip cannot be scored; the scorer answers it with reward 0 and this reason."""


def check_audio(audio) -> np.ndarray:
    """The clip as float32 [S], or _BadInput saying why it cannot be scored."""
    try:
        audio = np.asarray(audio)
    except (TypeError, ValueError) as e:  # a ragged list, a CUDA tensor, ...
        raise _BadInput(f"audio is not an array of samples ({type(audio).__name__}: {e})") from None
    if audio.dtype.kind != "f":
        raise _BadInput(f"audio dtype {audio.dtype} is not floating point (expected float32 samples at 16 kHz)")
    if audio.ndim != 1:
        raise _BadInput(f"audio must be 1-D (mono samples), got shape {audio.shape}")
    if audio.size == 0:
        raise _BadInput("audio is empty")
    if not np.isfinite(audio).all():
        raise _BadInput(f"audio has {int((~np.isfinite(audio)).sum())} NaN or inf samples")
    if not audio.any():
        raise _BadInput(f"audio is all zeros ({audio.size / SAMPLE_RATE:.2f} s of silence)")
    return audio.astype(np.float32, copy=False)


def check_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise _BadInput(f"text is empty ({text!r})")
    if not normalize_text(text):
        raise _BadInput(f"text {text!r} has no characters left after normalization (punctuation, symbols removed)")
    return text.strip()


def _check_lengths(audios, texts, languages) -> list:
    languages = [None] * len(audios) if languages is None else list(languages)
    if not len(audios) == len(texts) == len(languages):
        raise ValueError(f"got {len(audios)} audios, {len(texts)} texts and {len(languages)} languages; "
                         "they must match one to one")
    return languages


def _failed(reason: str) -> dict:
    return {"transcript": "", "cer": None, "nll": None, "reward": 0.0, "error": reason, "truncated": False}


class CustomRewardScorer:
    """A user's reward instead of Whisper: spec "module:function", function(audio float32 [S] at
    16 kHz, text) -> float in [0, 1]. Bad clips and non-finite or out-of-range values get reward 0."""

    def __init__(self, spec: str):
        module_name, _, function_name = spec.partition(":")
        if not module_name or not function_name:
            raise ValueError(f"reward {spec!r} must be 'whisper' or 'module:function'")
        module = importlib.import_module(module_name)
        self.function, self.spec = getattr(module, function_name, None), spec
        if not callable(self.function):
            raise AttributeError(f"reward {spec!r}: module {module_name!r} ({module.__file__}) "
                                 f"has no function {function_name!r}")

    def score(self, audios, texts, languages=None) -> list[dict]:
        _check_lengths(audios, texts, languages)
        return [self._score_one(audio, text) for audio, text in zip(audios, texts)]

    def _score_one(self, audio, text) -> dict:
        try:
            audio, text = check_audio(audio), check_text(text)
        except _BadInput as e:
            return _failed(str(e))
        returned = self.function(audio, text)
        try:
            value = float(returned)
        except (TypeError, ValueError):
            value = math.nan
        if not 0.0 <= value <= 1.0:  # NaN fails too
            return _failed(f"reward {self.spec} returned {returned!r}, not a number in [0, 1]")
        return {"transcript": "", "cer": None, "nll": None, "reward": value, "error": None, "truncated": False}


# ---- the worker process ------------------------------------------------------------------------------
# Parent --Pipe--> worker: "ready" + address (or "error" + traceback) at start; any message or EOF = stop.
# Clients --socket--> worker: ("score", request_id, audios, texts, languages); replies ("ok", id, results),
# ("error", id, traceback) or ("died", None, traceback). The parent writes the exit code into the
# worker's folder, so that every client can name it.

class WorkerError(RuntimeError):
    """The worker could not start, or failed on a request (its traceback is in the message)."""


class WorkerDiedError(WorkerError):
    """The worker process ended while a client needed it."""


def _serve(scorer_kwargs, reward, authkey, folder, parent, threads):
    try:
        if threads:
            torch.set_num_threads(threads)
        scorer = WhisperScorer(**scorer_kwargs) if reward == "whisper" else CustomRewardScorer(reward)
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
    audios = [a for _, (_, _, clips, _, _) in requests for a in clips]
    texts = [t for _, (_, _, _, clip_texts, _) in requests for t in clip_texts]
    languages = [lang for _, (_, _, _, _, clip_languages) in requests for lang in clip_languages]
    try:
        results, replies = scorer.score(audios, texts, languages), []
        for conn, (_, request_id, clips, _, _) in requests:
            replies.append((conn, ("ok", request_id, results[:len(clips)])))
            results = results[len(clips):]
    except Exception:  # e.g. a custom reward that raised: the request fails, the worker lives on
        replies = [(conn, ("error", request_id, traceback.format_exc())) for conn, (_, request_id, *_) in requests]
    for conn, reply in replies:
        try:
            conn.send(reply)
        except OSError:  # the client left mid-request
            drop(conn)


class WhisperWorker:
    """WhisperScorer(**scorer_kwargs) (or reward="module:function") in its own process (spawn).

    start() blocks until the model is loaded; connect_info() is a picklable tuple that other ranks of
    the node pass to WorkerClient. Every wait is bounded; a dead worker raises WorkerDiedError.
    threads: CPU threads of the worker process (None: torch's default); on a CPU shared with
    training ranks, 1 avoids oversubscribing the cores."""

    def __init__(self, scorer_kwargs: dict, *, reward: str = "whisper", start_timeout=600.0, request_timeout=600.0,
                 threads=None):
        self.scorer_kwargs, self.reward, self.threads = dict(scorer_kwargs), reward, threads
        self.start_timeout, self.request_timeout = start_timeout, request_timeout
        self.authkey, self.address = os.urandom(32), None
        self._process = self._client = None

    def start(self):
        if self._process is not None:
            raise RuntimeError("WhisperWorker.start() was already called")
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or locks inherited from the parent
        self._folder = tempfile.mkdtemp(prefix="whisper_worker_")
        self._pipe, child_end = ctx.Pipe()
        self._process = ctx.Process(target=_serve, name="whisper-worker", daemon=True,
                                    args=(self.scorer_kwargs, self.reward, self.authkey, self._folder, child_end, self.threads))
        self._process.start()
        child_end.close()  # so that the worker's death reads as EOF here
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self._monitor.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._pipe.poll(0.1):
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"Whisper worker did not load within start_timeout={self.start_timeout:g} s")
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

    def score(self, audios, texts, languages=None) -> list[dict]:
        if self._client is None:
            raise RuntimeError("call WhisperWorker.start() first")
        return self._client.score(audios, texts, languages)

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

    def score(self, audios, texts, languages=None) -> list[dict]:
        with self._lock:  # one request at a time per connection
            self._next_id += 1
            request_id = self._next_id
            languages = _check_lengths(audios, texts, languages)
            try:
                self._conn.send(("score", request_id, list(audios), list(texts), languages))
            except OSError:
                raise WorkerDiedError(_death_report(self.pid, self.folder)) from None
            deadline = time.monotonic() + self.request_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"Whisper worker at {self.address} did not answer {len(audios)} clips "
                                       f"within request_timeout={self.request_timeout:g} s")
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
    return (f"Whisper worker (pid {pid}) died: {how}; "
            + (f"its traceback:\n{tb}" if tb else "no traceback (killed by a signal, e.g. out of memory, or a native crash)"))


def read_wav(path: str) -> np.ndarray:
    """A wav file as float32 mono [S] at 16 kHz (stereo is averaged); other rates are an error."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)  # [S, channels]
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} Hz (resample it first, "
                         f"e.g. ffmpeg -i in.wav -ar {SAMPLE_RATE} out.wav)")
    return audio.mean(axis=1)


def _read_jsonl(path: str) -> list[tuple]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("wav"), str) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with string fields 'wav' and 'text'")
            rows.append((os.path.join(os.path.dirname(path), row["wav"]), row["text"], row.get("language")))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score wavs against their texts with Whisper: one JSON line per clip "
                                                 "with wav, text, transcript, cer, nll (nats/token), reward.")
    parser.add_argument("--model", required=True, help="Whisper name (tiny.en, large-v3, ...), checkpoint path or random-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--language", default=None, help="language code, e.g. en or ko (default: detected)")
    parser.add_argument("--wav", action="append", default=[], help="16 kHz wav; repeat, paired with --text")
    parser.add_argument("--text", action="append", default=[], help="what the matching --wav should say")
    parser.add_argument("--jsonl", help='file of {"wav", "text"[, "language"]} rows, wav relative to the file')
    parser.add_argument("--batch-size", type=int, default=16)
    for name, default in vars(RewardConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=default)
    args = parser.parse_args(argv)
    if len(args.wav) != len(args.text):
        parser.error(f"got {len(args.wav)} --wav and {len(args.text)} --text; give them in pairs")
    rows = [(wav, text, None) for wav, text in zip(args.wav, args.text)] + (_read_jsonl(args.jsonl) if args.jsonl else [])
    if not rows:
        parser.error("nothing to score: give --wav/--text pairs or --jsonl")
    config = RewardConfig(**{name: getattr(args, name) for name in vars(RewardConfig())})
    scorer = WhisperScorer(args.model, args.device, args.language, batch_size=args.batch_size, reward_config=config)
    results = scorer.score([read_wav(wav) for wav, _, _ in rows], [text for _, text, _ in rows],
                           [language for *_, language in rows])
    for (wav, text, _), result in zip(rows, results):
        print(json.dumps({"wav": wav, "text": text, **result}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
