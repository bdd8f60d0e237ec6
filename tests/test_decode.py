"""decode.py: the static decode step, eager and compiled, against the dynamic loop; --compile in the
trainer (one Decoder per run, the eager fallback)."""
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters

import data
import decode
import grpo
import models
import parallel
import sample
from helpers import COMPILE_TEXTS, _FakeScorer, _tiny


# Compiled graphs are costly on a CPU (inductor builds C++ kernels: ~20-30 s per graph on 2 cores,
# cold), so the compiled tests use a one-layer model, build each graph once per module and compare
# against the eager references (the dynamic loop, and the same static step uncompiled).

@pytest.fixture(scope="module")
def tok():
    return data.tiny_tokenizer(n_speech=64)


@pytest.fixture(scope="module")
def prompts(tok):
    out = [data.prompt_ids(tok, t) for t in COMPILE_TEXTS]
    assert len({len(p) for p in out}) == len(out)  # left padding differs per row
    return out


def graphs():
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    return counters["stats"]["unique_graphs"]


def assert_same(a, b, atol=1e-5):
    assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


def test_static_step_eager_equals_dynamic_loop(tok, prompts):
    """The static step run eagerly (the function that gets compiled) gives the dynamic loop's
    tokens and log-probs: greedy with and without the speech head, with stops, seeded sampling with
    every knob, a bf16 cache; one Decoder reused across calls of other batches and lengths."""
    sv = data.speech_vocab(tok)
    model = models.tiny_llama(len(tok), seed=3)
    dec = decode.Decoder(model)
    free = sample.generate(model, prompts, max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids())
    stop = int(free.tokens[2, 8])  # rows meet it at different steps (or never)
    sampled = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    cases_0_kw = dict(max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids(), stop_ids=(stop,))
    cases = [
        (prompts, cases_0_kw),
        (prompts, dict(max_new_tokens=24, temperature=0)),
        (prompts[:2], dict(max_new_tokens=30, temperature=0, stop_ids=(int(free.tokens[0, 3]),))),  # new batch
        (prompts * 2, dict(max_new_tokens=24, allowed_ids=sv.allowed_ids(), stop_ids=(sv.end_id, sv.first + 1),
                           **sampled)),
        (prompts[::-1], dict(max_new_tokens=150, temperature=1.0, top_p=0.8, stop_ids=(5, 6))),  # a longer cache
        (prompts, dict(max_new_tokens=20, temperature=0, repetition_penalty=1.5, cache_dtype=torch.bfloat16)),
        (prompts[1:] + prompts[:1], dict(cases_0_kw, max_new_tokens=150)),  # case 0's buffers, grown
    ]
    finished_some, slots = False, []
    for ps, kw in cases:
        def seeded():
            return dict(generator=torch.Generator().manual_seed(7)) if kw.get("temperature", 1) else {}
        ref = sample.generate(model, ps, **kw, **seeded())
        ours = sample.generate(model, ps, decoder=dec, **kw, **seeded())
        # A bf16 cache: bf16 attention over the whole cache vs over its filled prefix rounds differently.
        assert_same(ours, ref, atol=1e-3 if "cache_dtype" in kw else 1e-5)
        finished_some |= bool(ref.finished.any() and not ref.finished.all())
        slots.append(sorted((key[0], st.cache.length) for key, st in dec.states.items()))
    assert finished_some
    # Buffers per batch size (and knobs on or off), P + N slots rounded up to 128, grown when a call needs more.
    assert slots[0] == [(4, 128)] and slots[2] == [(2, 128), (4, 128), (4, 128)], slots
    before, after = Counter(slots[-2]), Counter(slots[-1])
    assert after - before == Counter({(4, 256): 1}) and before - after == Counter({(4, 128): 1})  # replaced
    # fp32 weights under bf16 autocast (the trainer on CUDA): the step reads bf16 copies of the
    # weights, made once per call, where eager autocast casts them at each use: the same values, so
    # the same results as the step reading the fp32 weights (and the dynamic loop's tokens).
    uncast = decode.Decoder(model)
    uncast.layer_weights = lambda dtype, f=uncast.layer_weights: f(None)  # the parameters themselves
    for kw in (cases_0_kw, dict(cases[3][1], cache_dtype=torch.bfloat16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = sample.generate(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
            ours = sample.generate(model, prompts, generator=torch.Generator().manual_seed(3), decoder=dec, **kw)
            plain = sample.generate(model, prompts, generator=torch.Generator().manual_seed(3), decoder=uncast, **kw)
        assert_same(ours, plain, atol=0)
        assert_same(ours, ref, atol=5e-3)  # attention runs in bf16 under autocast: see the bf16 cache above
    assert dec.weight_copies[0].q[0].dtype == torch.bfloat16 and uncast.weight_copies is None
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    dec.release()
    assert not dec.states and dec.weight_copies is None
    with pytest.raises(ValueError, match="another model"):
        sample.generate(models.tiny_llama(len(tok), seed=4), prompts, max_new_tokens=2, decoder=dec)


@pytest.fixture(scope="module")
def small(tok):
    """A one-layer model (fewer kernels to build) and its speech head."""
    return models.tiny_llama(len(tok), seed=3, num_layers=1), data.speech_vocab(tok)


def test_compiled_greedy_equals_eager_and_compiles_once(small, prompts):
    """Inductor-compiled step == the dynamic loop token for token, log-probs within 1e-5, with the
    speech head, prompts of different lengths and a stop id that ends rows early; later calls of the
    same batch (other prompts, other lengths, a fresh Decoder) compile nothing more."""
    model, sv = small
    free = sample.generate(model, prompts, max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids())
    kw = dict(max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids(), stop_ids=(int(free.tokens[2, 8]),))
    ref = sample.generate(model, prompts, **kw)
    assert ref.finished.any() and not ref.finished.all() and len(set(ref.lengths.tolist())) > 1

    dec = decode.Decoder(model, compile=True)
    before = graphs()
    out = sample.generate(model, prompts, decoder=dec, **kw)
    assert graphs() == before + 1  # it really compiled (not a silent fallback to eager)
    assert_same(out, ref)
    assert torch.equal(out.tokens, sample.generate(model, prompts, decoder=decode.Decoder(model), **kw).tokens)

    others = prompts[1:] + prompts[:1]  # the same batch, other rows and lengths: same shapes
    again = sample.generate(model, others, decoder=dec, **kw)
    assert_same(again, sample.generate(model, others, **kw))
    assert_same(sample.generate(model, prompts, compile=True, **kw), ref)  # a Decoder per call: no recompile either
    assert graphs() == before + 1


def test_compiled_full_vocab_greedy_equals_eager(small, prompts):
    """Without allowed_ids the step reads lm_head.weight itself (all rows)."""
    model, _ = small
    free = sample.generate(model, prompts, max_new_tokens=16, temperature=0)
    kw = dict(max_new_tokens=16, temperature=0, stop_ids=(int(free.tokens[0, 5]),))
    ref = sample.generate(model, prompts, **kw)
    assert ref.finished.any()
    before = graphs()
    assert_same(sample.generate(model, prompts, compile=True, **kw), ref)
    assert graphs() == before + 1


def test_compiled_seeded_sampling_equals_eager(small, prompts):
    """Sampling draws its uniforms from the caller's generator outside the compiled step, in the
    same order as the dynamic loop: the same seed gives the same tokens, compiled or not."""
    model, sv = small
    kw = dict(max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3,
              allowed_ids=sv.allowed_ids(), stop_ids=(sv.end_id, sv.first + 1, sv.first + 2))
    ref = sample.generate(model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    before = graphs()
    out = sample.generate(model, prompts, generator=torch.Generator().manual_seed(1), compile=True, **kw)
    assert_same(out, ref)
    assert ref.finished.any()
    other = sample.generate(model, prompts, generator=torch.Generator().manual_seed(2), compile=True, **kw)
    assert not torch.equal(other.tokens, out.tokens)
    assert_same(other, sample.generate(model, prompts, generator=torch.Generator().manual_seed(2), **kw))
    assert graphs() == before + 1


# ---- --compile in the trainer --------------------------------------------------------------------

def test_compile_flag_builds_one_decoder_per_run(tmp_path):
    """--compile gives the trainer one Decoder (compiled) for the whole run; on a CPU the default
    is the eager loop. The static step's equality with it is tested above."""
    assert grpo.Trainer(_tiny(tmp_path, "--val-data", ""), parallel.Dist(), torch.device("cpu"),
                        _FakeScorer(0.5)).sampler.decoder is None
    tr = grpo.Trainer(_tiny(tmp_path, "--val-data", "", "--compile"), parallel.Dist(), torch.device("cpu"),
                      _FakeScorer(0.5))
    assert isinstance(tr.sampler.decoder, decode.Decoder) and tr.sampler.decoder.compiled
    assert tr.sampler.decoder.model is tr.policy.lm and tr.sampler.decoder.max_len == tr.cfg.max_new_tokens + 256


def test_a_compiled_step_that_fails_falls_back_to_the_eager_loop(tmp_path, capsys):
    """A compile problem on first use is reported and the run goes on eagerly, with the samples of
    the eager loop; a later failure of a step that has worked is an error like any other."""
    cfg = _tiny(tmp_path, "--val-data", "")
    eager = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    def broken_backend(graph, example_inputs):  # what a compiler failing on this machine looks like
        raise RuntimeError("no kernels for this GPU")

    tr.sampler.decoder = decode.Decoder(tr.policy.lm, compile=True, compile_options={"backend": broken_backend})
    texts = ["Hello there.", "Speech."]
    ours = tr.sampler.rollout(texts, torch.Generator().manual_seed(0))
    padded = texts + [texts[-1]] * (tr.sampler.batch - len(texts))  # the compiled path's one batch shape
    reference = eager.sampler._generate(padded, torch.Generator().manual_seed(0)).head(len(texts))
    assert torch.equal(ours.tokens, reference.tokens)
    assert tr.sampler.decoder is None
    assert "compiled decode step failed on first use" in capsys.readouterr().err


# ---- one slot per layer in place, a read of the filled part, one shape per run -------------------

def test_spans_double_up_to_the_cache():
    assert decode.spans(1792) == [256, 512, 1024, 1792]  # the trainer's cache: 4 graphs at most
    assert decode.spans(256) == [256] and decode.spans(128) == [128]
    assert decode.spans(2304) == [256, 512, 1024, 2048, 2304]


def test_static_step_across_spans_equals_the_dynamic_loop(tok, prompts):
    """A response that outgrows the first span (256 slots) reads the next one: the same tokens and
    log-probs as the dynamic loop; one traced graph per span used, and the cache tensors (one per
    layer and K/V) are the same objects before and after, written in place."""
    sv = data.speech_vocab(tok)
    model = models.tiny_llama(len(tok), seed=5)
    kw = dict(max_new_tokens=430, temperature=1.0, allowed_ids=sv.allowed_ids(), stop_ids=())
    ref = sample.generate(model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    dec = decode.Decoder(model, compile=True, max_len=640, compile_options={"backend": "eager"})
    before = graphs()
    ours = sample.generate(model, prompts, generator=torch.Generator().manual_seed(1), decoder=dec, **kw)
    assert_same(ours, ref)
    assert ours.tokens.shape[1] == 430 and max(len(p) for p in prompts) + 430 > 512  # three spans read
    assert graphs() - before == 3  # 256, 512 and 640 slots
    (state,) = dec.states.values()
    assert len(state.cache.k) == len(state.cache.v) == model.config.num_hidden_layers
    cache = [t for t in state.cache.k + state.cache.v]
    again = sample.generate(model, prompts, generator=torch.Generator().manual_seed(1), decoder=dec, **kw)
    assert_same(again, ref)
    (state,) = dec.states.values()
    assert all(a is b for a, b in zip(cache, state.cache.k + state.cache.v))
    assert graphs() - before == 3  # replayed, not traced again


def test_trainer_decodes_one_shape_per_run_and_frees_it(tmp_path):
    """Validation chunks (and so the prosody reference, the same path) and uneven --rollout-chunks
    are padded to the sampler's batch: the decoder keeps one set of buffers for the whole run,
    freed by close()."""
    cfg = _tiny(tmp_path, "--rollout-chunks", "5")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    assert tr.sampler.batch == 4  # 16 rollouts in 5 chunks: 3, 3, 3, 3, 4 rows, each padded to 4
    tr.sampler.decoder = decode.Decoder(tr.policy.lm, max_len=cfg.max_new_tokens + 256)  # the static step, eager
    assert len(tr.val_examples) % tr.sampler.batch != 0  # a short last validation chunk
    tr.validate()
    metrics, _ = tr.train_step(0)
    assert metrics["response_len"] > 0
    assert [key[0] for key in tr.sampler.decoder.states] == [tr.sampler.batch]
    tr.sampler.close()
    assert not tr.sampler.decoder.states and tr.sampler.decoder.weight_copies is None
