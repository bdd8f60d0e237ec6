"""What runs inside the reward worker's process (whisper_worker.WhisperWorker starts it, spawned):
the scorer, the listener, the loop that batches the pending requests of every client into one
scorer call, and the notes a dead worker leaves in its folder.

Parent --Pipe--> worker: "ready" + address (or "error" + traceback) at start; any message or EOF =
stop. Clients --socket--> worker: ("score", request_id, audios, texts, languages, prompts), prompts
None or (distinct prompt arrays, one index per clip, -1 for none): a prompt shared by a group is
sent once. Replies ("ok", id, results), ("error", id, traceback) or ("died", None, traceback). The
parent writes the exit code into the worker's folder, so that every client can name it.
"""

import contextlib
import multiprocessing as mp
import os
import threading
import time
import traceback
from multiprocessing.connection import Listener, wait

import torch

from scorer import CustomRewardScorer, WhisperScorer


def serve(scorer_kwargs, reward, authkey, folder, parent, threads):
    """The worker process's body: build the scorer, listen on 127.0.0.1 (any free port), say
    "ready" + address (or "error" + traceback) on `parent`, then answer clients until `parent`
    sends anything or closes. threads: torch's CPU threads (None: its default)."""
    try:
        if threads:
            torch.set_num_threads(threads)
        if reward == "whisper":
            scorer = WhisperScorer(**scorer_kwargs)
        else:
            scorer = CustomRewardScorer(
                reward,
                speaker_model=scorer_kwargs.get("speaker_model"),
                device=scorer_kwargs.get("device", "cpu"),
                quality=scorer_kwargs.get("quality"),
            )
        listener = Listener(("127.0.0.1", 0), authkey=authkey)  # port 0: any free port
    except BaseException:
        parent.send(("error", traceback.format_exc()))  # start() raises it
        return
    clients = []
    lock = threading.Lock()

    def accept():
        while True:
            try:
                conn = listener.accept()  # runs the auth-key handshake
            except (mp.AuthenticationError, EOFError, ConnectionError):
                continue  # a bad key, or a caller that left
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
                continue
            requests = []
            for conn in wait(conns, timeout=0.05):
                try:
                    requests.append((conn, conn.recv()))
                except (EOFError, OSError):  # that client went away; the others carry on
                    drop(conn)
            if requests:
                _answer(scorer, requests, drop)
    except BaseException:
        tb = traceback.format_exc()
        write_file(folder, "traceback", tb)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.send(("died", None, tb))
        raise
    finally:
        listener.close()


def _answer(scorer, requests, drop):
    """Score every pending request in one scorer call (batching across ranks), then reply to
    each."""
    audios = [a for _, (_, _, clips, *_) in requests for a in clips]
    texts = [t for _, (_, _, _, clip_texts, *_) in requests for t in clip_texts]
    languages = [lang for _, (_, _, _, _, clip_languages, _) in requests for lang in clip_languages]
    prompts = None
    if any(shared is not None for _, (*_, shared) in requests):
        prompts = []
        for _, (_, _, clips, _, _, shared) in requests:
            prompts += _unshare(shared, len(clips))
    try:
        results = scorer.score(audios, texts, languages, prompts=prompts)
        replies = []
        for conn, (_, request_id, clips, *_) in requests:
            replies.append((conn, ("ok", request_id, results[: len(clips)])))
            results = results[len(clips) :]
    except Exception:  # e.g. a custom reward that raised: the request fails, the worker lives on
        tb = traceback.format_exc()
        replies = [(conn, ("error", request_id, tb)) for conn, (_, request_id, *_) in requests]
    for conn, reply in replies:
        try:
            conn.send(reply)
        except OSError:  # the client left mid-request
            drop(conn)


def write_file(folder, name, text):
    """folder/name holding text, replaced whole; nothing when the folder is gone."""
    try:
        with open(os.path.join(folder, name + ".tmp"), "w") as f:
            f.write(text)
        # Replaced whole: readers never see half.
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
    except OSError:  # the folder is gone: the worker was closed
        pass


def _unshare(shared, n: int) -> list:
    """One voice prompt (or None) per clip of a request of n clips: whisper_worker._share undone."""
    if shared is None:
        return [None] * n
    distinct, index = shared
    return [None if place < 0 else distinct[place] for place in index]
