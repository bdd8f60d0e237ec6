"""rollout.py: the compiled step's fallback takes compile errors only, a rollout's error leaves
at once (not after the chunk being scored), and the run's prompts that can pass --max-context
are said once."""

import threading
import time

import pytest
import torch

import data
import decode
import grpo
import parallel
import rollout
from helpers import _FakeScorer, _tiny
from reward import Score


def _compiled_sampler(tmp_path, backend):
    """The tiny trainer's Sampler with a compiled step whose compiler is `backend`."""
    tr = grpo.Trainer(
        _tiny(tmp_path, "--val-data", ""), parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5)
    )
    tr.sampler.decoder = decode.Decoder(
        tr.policy.lm, compile=True, compile_options={"backend": backend}
    )
    return tr.sampler


def _compile_error(raised: BaseException) -> BaseException:
    """What torch.compile raises when its backend raises `raised`."""

    def backend(graph, example_inputs):
        raise raised

    torch._dynamo.reset()
    try:
        torch.compile(lambda x: x * 2 + 1, backend=backend, fullgraph=True)(torch.ones(3))
    except Exception as e:
        return e
    raise AssertionError("the backend's error was not raised")


def test_compile_failed_tells_compile_errors_from_the_runs():
    from torch._inductor.exc import CppCompileError

    assert decode.compile_failed(_compile_error(RuntimeError("no kernels for this GPU")))
    assert decode.compile_failed(CppCompileError(["g++"], "error: ..."))
    oom = torch.OutOfMemoryError("CUDA out of memory")
    # OOM inside the compiler: the run's error
    assert not decode.compile_failed(_compile_error(oom))
    assert not decode.compile_failed(oom)
    assert not decode.compile_failed(ValueError("empty text: nothing to synthesize"))
    assert not decode.compile_failed(RuntimeError("CUDA error: an illegal memory access"))


def test_an_oom_in_the_compiler_propagates_and_keeps_the_compiled_step(tmp_path, capsys):
    """A transient out-of-memory error on the first compiled rollout (here inside the compiler) is
    the run's error: raised, and --compile stays on, instead of being blamed on the compiler."""

    def oom_backend(graph, example_inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    sampler = _compiled_sampler(tmp_path, oom_backend)
    with pytest.raises(Exception) as caught:
        sampler.rollout(["Hello there."], torch.Generator().manual_seed(0))
    assert not decode.compile_failed(caught.value)  # OOM, as raised or as dynamo wraps it
    assert sampler.decoder is not None
    assert "going on with the eager loop" not in capsys.readouterr().err


def test_a_data_error_on_the_first_rollout_is_not_blamed_on_the_compiler(
    tmp_path, monkeypatch, capsys
):
    """A bad item (its prompt cannot be built) and an ordinary error of the step: raised as they
    are, with the compiled step kept, and nothing said about the compiler."""
    sampler = _compiled_sampler(tmp_path, "eager")
    with pytest.raises(ValueError, match="empty text"):
        sampler.rollout(["  "], torch.Generator().manual_seed(0))
    monkeypatch.setattr(
        rollout, "generate", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("OOM"))
    )
    with pytest.raises(torch.OutOfMemoryError):
        sampler.rollout(["Hello there."], torch.Generator().manual_seed(0))
    assert sampler.decoder is not None
    assert not sampler.decoder_works
    assert "compiled decode step failed" not in capsys.readouterr().err


class _SlowScorer:
    """Scores once `release` is set (or after `seconds`): a chunk scored as the next rolls out."""

    def __init__(self, seconds):
        self.release = threading.Event()
        self.seconds = seconds

    def score(self, audios, texts, languages=None):
        self.release.wait(self.seconds)
        return [Score(reward=0.5) for _ in audios]


def test_a_rollout_error_is_raised_at_once_not_after_the_chunk_being_scored(tmp_path, monkeypatch):
    """--rollout-chunks 2: chunk 0 is being scored (a scorer that takes 20 s) when chunk 1's rollout
    fails; the error reaches the caller at once, not after the scoring (up to --worker-timeout)."""
    cfg = _tiny(tmp_path, "--val-data", "", "--rollout-chunks", "2")
    scorer = _SlowScorer(seconds=20)
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), scorer)
    real = tr.sampler.rollout
    calls = []

    def second_fails(texts, generator):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("chunk 1 failed")
        return real(texts, generator)

    monkeypatch.setattr(tr.sampler, "rollout", second_fails)
    items = ["Hello there.", "Speech.", "Hi.", "Again."]
    t0 = time.time()
    try:
        with pytest.raises(RuntimeError, match="chunk 1 failed"):
            tr.sampler.rollout_and_score(items, torch.Generator().manual_seed(0))
        assert time.time() - t0 < 10, time.time() - t0
    finally:
        scorer.release.set()


def test_prompts_that_can_pass_max_context_are_counted_once_at_start(tmp_path, capsys):
    """--max-context (LLASA was trained on 2,048 tokens of prompt + speech): the run's prompts
    that a --max-new-tokens response can take past it are counted over training and validation
    texts and said once, on stderr, when the sampler is built; none past it, nothing said; 0 turns
    it off."""

    def sampler(*flags):
        cfg = _tiny(tmp_path, *flags)
        return grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5)).sampler

    s = sampler()  # the tiny run: short prompts + 64 new tokens, far below 2048
    train, val = data.load_data(s.cfg)
    lengths = s.prompt_lengths(train + val)
    assert "--max-context" not in capsys.readouterr().err
    cut = sorted(lengths)[len(lengths) // 2] + s.cfg.max_new_tokens  # about half pass it
    want = sum(n + s.cfg.max_new_tokens > cut for n in lengths)
    assert 0 < want < len(lengths)
    sampler("--max-context", str(cut))
    err = capsys.readouterr().err
    assert err.count("--max-context") == 1
    assert f"rollout: {want} of {len(lengths)} prompts (training and validation)" in err, err
    sampler("--max-context", "0")
    assert "--max-context" not in capsys.readouterr().err
