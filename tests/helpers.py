"""Helpers shared by several test files: paths, noise, HF references, tiny trainer runs; and the
autouse `one_thread` fixture, registered by tests/conftest.py for every module under tests/ and by
test_grpo.py for itself.

Importable as `helpers`: pytest puts tests/ on sys.path (its default "prepend" import mode, no
__init__.py), and test_grpo.py adds it for a run of that file alone and for the child processes
that import test_grpo.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch._inductor.config

import config
from reward import Score

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)  # the repository root: subprocesses' cwd, train.sh, grpo.py, tools/


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two CPU cores shared by this process and a worker process (started with threads=1): one thread
    # each, or OpenMP's spinning threads oversubscribe the cores and slow every op several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Inductor (the compiled decode step's tests) builds its C++ kernels in this process, scalar:
    # vectorized C++ takes longer to build, and GPU kernels are Triton's anyway.
    with torch._inductor.config.patch({"compile_threads": 1, "cpp.vec_isa_ok": False}):
        yield
    torch.set_num_threads(threads)


# Tests that need real speech recognition read Whisper tiny.en and spoken clips from here and skip
# with a reason where they are absent.

ASSETS = os.environ.get("TEST_ASSETS", os.path.join(REPO, "..", "shared", "assets"))


def noise(seconds, seed, scale=0.1):
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(
        np.float32
    )


def read_json(path):
    """The JSON value the file at `path` holds."""
    with open(path) as f:
        return json.load(f)


def read_jsonl(path) -> list:
    """The rows of the JSON-lines file at `path`, one per line."""
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- generation against transformers' generate (test_sample.py, test_llama.py, GPU tests) --------

VOCAB = 300
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 150, 40], [17] * 3 + list(range(60, 71))]


def left_padded(prompts, pad=0):
    """HF's batched-generate input: left-padded ids [B, P] and attention mask [B, P]."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    return ids, mask


def hf_greedy(model, prompts, n, eos=None):
    ids, mask = left_padded(prompts)
    # min_new_tokens: no stop
    kw = dict(eos_token_id=eos) if eos is not None else dict(min_new_tokens=n)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        **kw,
    )
    return out[:, ids.shape[1] :]


# ---- the decode tests' texts (test_decode.py, GPU tests) -----------------------------------------

COMPILE_TEXTS = [
    "Hi.",
    "Hello there, how are you today?",
    "Speech, please!",
    "A much longer sentence than the others, to pad.",
]


# ---- the trainer on the tiny preset, with stand-in scorers ---------------------------------------


def _tiny(tmp_path, *flags):
    return config.parse_config(["--preset", "tiny", "--out", str(tmp_path / "run"), *flags])


class _FakeScorer:
    def __init__(self, value):
        self.value = value

    def score(self, audios, texts, languages=None):
        return [Score(reward=self.value) for _ in audios]


class _ScriptedScorer:
    """Scores from a list, in order: a way to make errors, too-long clips and equal groups."""

    def __init__(self, make):
        self.make = make
        self.calls = 0

    def score(self, audios, texts, languages=None):
        self.calls += 1
        return [self.make(i) for i in range(len(audios))]
