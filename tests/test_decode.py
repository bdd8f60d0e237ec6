"""decode.py: the static decode step, eager and compiled, against the dynamic loop; --compile in the
trainer (one Decoder per run, the eager fallback)."""

import functools
import json
import math
import re
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters

import data
import decode
import grpo
import llama
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
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


def test_static_step_eager_equals_dynamic_loop(tok, prompts):
    """The static step run eagerly (the function that gets compiled) gives the dynamic loop's
    tokens and log-probs: greedy with and without the speech head, with stops, seeded sampling with
    every knob, a bf16 cache; one Decoder reused across calls of other batches and lengths."""
    sv = data.speech_vocab(tok)
    model = models.tiny_llama(len(tok), seed=3)
    dec = decode.Decoder(model)
    free = sample.generate(
        model, prompts, max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids()
    )
    stop = int(free.tokens[2, 8])  # rows meet it at different steps (or never)
    sampled = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    cases_0_kw = dict(
        max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids(), stop_ids=(stop,)
    )
    cases = [
        (prompts, cases_0_kw),
        (prompts, dict(max_new_tokens=24, temperature=0)),
        # new batch
        (
            prompts[:2],
            dict(max_new_tokens=30, temperature=0, stop_ids=(int(free.tokens[0, 3]),)),
        ),
        (
            prompts * 2,
            dict(
                max_new_tokens=24,
                allowed_ids=sv.allowed_ids(),
                stop_ids=(sv.end_id, sv.first + 1),
                **sampled,
            ),
        ),
        # a longer cache
        (
            prompts[::-1],
            dict(max_new_tokens=150, temperature=1.0, top_p=0.8, stop_ids=(5, 6)),
        ),
        (
            prompts,
            dict(
                max_new_tokens=20, temperature=0, repetition_penalty=1.5, cache_dtype=torch.bfloat16
            ),
        ),
        # case 0's buffers, grown
        (
            prompts[1:] + prompts[:1],
            dict(cases_0_kw, max_new_tokens=150),
        ),
    ]
    finished_some = False
    slots = []
    for ps, kw in cases:

        def seeded(kw=kw):
            if kw.get("temperature", 1):
                return dict(generator=torch.Generator().manual_seed(7))
            return {}

        ref = sample.generate(model, ps, **kw, **seeded())
        ours = sample.generate(model, ps, decoder=dec, **kw, **seeded())
        # A bf16 cache: bf16 attention over the whole cache vs its filled prefix rounds differently.
        assert_same(ours, ref, atol=1e-3 if "cache_dtype" in kw else 1e-5)
        finished_some |= bool(ref.finished.any() and not ref.finished.all())
        slots.append(sorted((key[0], st.cache.length) for key, st in dec.states.items()))
    assert finished_some
    # Buffers per batch size (and knobs on or off): P + N slots, rounded up to 128, grown as needed.
    assert slots[0] == [(4, 128)], slots
    assert slots[2] == [(2, 128), (4, 128), (4, 128)], slots
    before, after = Counter(slots[-2]), Counter(slots[-1])
    # replaced
    assert after - before == Counter({(4, 256): 1})
    assert before - after == Counter({(4, 128): 1})
    # fp32 weights under bf16 autocast (the trainer on CUDA): the step reads bf16 copies of the
    # weights, made once per call, where eager autocast casts them at each use: the same values, so
    # the same results as the step reading the fp32 weights (and the dynamic loop's tokens).
    uncast = decode.Decoder(model)
    # the parameters themselves
    uncast.layer_weights = lambda dtype, f=uncast.layer_weights: f(None)
    for kw in (cases_0_kw, dict(cases[3][1], cache_dtype=torch.bfloat16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = sample.generate(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
            ours = sample.generate(
                model, prompts, generator=torch.Generator().manual_seed(3), decoder=dec, **kw
            )
            plain = sample.generate(
                model, prompts, generator=torch.Generator().manual_seed(3), decoder=uncast, **kw
            )
        assert_same(ours, plain, atol=0)
        # attention runs in bf16 under autocast: see the bf16 cache above
        assert_same(ours, ref, atol=5e-3)
    assert dec.weight_copies[0].q[0].dtype == torch.bfloat16
    assert uncast.weight_copies is None
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    dec.release()
    assert not dec.states
    assert dec.weight_copies is None
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
    free = sample.generate(
        model, prompts, max_new_tokens=24, temperature=0, allowed_ids=sv.allowed_ids()
    )
    kw = dict(
        max_new_tokens=24,
        temperature=0,
        allowed_ids=sv.allowed_ids(),
        stop_ids=(int(free.tokens[2, 8]),),
    )
    ref = sample.generate(model, prompts, **kw)
    assert ref.finished.any()
    assert not ref.finished.all()
    assert len(set(ref.lengths.tolist())) > 1

    dec = decode.Decoder(model, compile=True)
    before = graphs()
    out = sample.generate(model, prompts, decoder=dec, **kw)
    assert graphs() == before + 1  # it really compiled (not a silent fallback to eager)
    assert_same(out, ref)
    assert torch.equal(
        out.tokens, sample.generate(model, prompts, decoder=decode.Decoder(model), **kw).tokens
    )

    others = prompts[1:] + prompts[:1]  # the same batch, other rows and lengths: same shapes
    again = sample.generate(model, others, decoder=dec, **kw)
    assert_same(again, sample.generate(model, others, **kw))
    # a Decoder per call: no recompile either
    assert_same(sample.generate(model, prompts, compile=True, **kw), ref)
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
    kw = dict(
        max_new_tokens=24,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        repetition_penalty=1.3,
        allowed_ids=sv.allowed_ids(),
        stop_ids=(sv.end_id, sv.first + 1, sv.first + 2),
    )
    ref = sample.generate(model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    before = graphs()
    out = sample.generate(
        model, prompts, generator=torch.Generator().manual_seed(1), compile=True, **kw
    )
    assert_same(out, ref)
    assert ref.finished.any()
    other = sample.generate(
        model, prompts, generator=torch.Generator().manual_seed(2), compile=True, **kw
    )
    assert not torch.equal(other.tokens, out.tokens)
    assert_same(
        other, sample.generate(model, prompts, generator=torch.Generator().manual_seed(2), **kw)
    )
    assert graphs() == before + 1


# ---- --compile in the trainer --------------------------------------------------------------------


def test_compile_flag_builds_one_decoder_per_run(tmp_path):
    """--compile gives the trainer one Decoder (compiled) for the whole run; on a CPU the default
    is the eager loop. The static step's equality with it is tested above."""
    assert (
        grpo.Trainer(
            _tiny(tmp_path, "--val-data", ""),
            parallel.Dist(),
            torch.device("cpu"),
            _FakeScorer(0.5),
        ).sampler.decoder
        is None
    )
    tr = grpo.Trainer(
        _tiny(tmp_path, "--val-data", "", "--compile"),
        parallel.Dist(),
        torch.device("cpu"),
        _FakeScorer(0.5),
    )
    assert isinstance(tr.sampler.decoder, decode.Decoder)
    assert tr.sampler.decoder.compiled
    longest = max(len(tr.sampler.prompt(ex)) for ex in tr.examples + tr.val_examples)
    assert tr.sampler.decoder.model is tr.policy.lm
    assert tr.sampler.decoder.max_len >= tr.cfg.max_new_tokens + longest


def test_sampler_sizes_the_cache_once_for_the_longest_clone_prompt(tmp_path, monkeypatch, capsys):
    """A voice-clone prompt longer than 256 tokens (its speech codes counted) in the run's examples:
    the compiled step's cache is sized for it from the start, so a run's rollouts (plain texts and
    the clone prompt) allocate one cache. Without the examples (256 prompt slots), the clone prompt
    grows the cache (a new cache and graphs for the compiled step), said once on stderr."""
    import soundfile as sf

    import codec
    import rollout

    codes = [k % 64 for k in range(300)]  # 6 s of the tiny model's 64 speech tokens
    sf.write(tmp_path / "voice.wav", codec.ToneCodec().decode([codes])[0], data.SAMPLE_RATE)
    rows = [
        dict(text="Hello there."),
        dict(text="A voice.", prompt_wav="voice.wav", prompt_text="Hi, my voice."),
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _tiny(tmp_path, "--compile", "--data", str(tmp_path / "train.jsonl"), "--val-data", "")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    plain, clone = tr.examples
    allocations = []
    real = decode.KVCache.for_model

    def for_model(*args, **kwargs):
        allocations.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode.KVCache, "for_model", staticmethod(for_model))
    for examples, grown in ((tr.examples + tr.val_examples, 0), (None, 1)):
        s = rollout.Sampler(
            cfg,
            tr.d,
            tr.device,
            tr.policy,
            tr.tokenizer,
            tr.sampler.codec,
            tr.sampler.scorer,
            tr.autocast,
            examples=examples,
        )
        assert len(s.prompt(clone)) > 256 + len(s.prompt(plain))
        assert (s.decoder.max_len >= cfg.max_new_tokens + len(s.prompt(clone))) == (not grown)
        # the same step and buffers, eager
        s.decoder = decode.Decoder(tr.policy.lm, max_len=s.decoder.max_len)
        allocations.clear()
        for items in ([plain], [clone, plain], [plain], [clone]):
            assert s.rollout(items, torch.Generator().manual_seed(0)).lengths.min() > 0
        assert len(allocations) == 1 + grown
        assert capsys.readouterr().err.count("decode.Decoder: a call needs") == grown


def test_a_compiled_step_that_fails_falls_back_to_the_eager_loop(tmp_path, capsys):
    """A compile problem on first use is reported and the run goes on eagerly, with the samples of
    the eager loop; a later failure of a step that has worked is an error like any other."""
    cfg = _tiny(tmp_path, "--val-data", "")
    eager = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))

    def broken_backend(graph, example_inputs):  # what a compiler failing on this machine looks like
        raise RuntimeError("no kernels for this GPU")

    tr.sampler.decoder = decode.Decoder(
        tr.policy.lm, compile=True, compile_options={"backend": broken_backend}
    )
    texts = ["Hello there.", "Speech."]
    ours = tr.sampler.rollout(texts, torch.Generator().manual_seed(0))
    # the compiled path's one batch shape
    padded = texts + [texts[-1]] * (tr.sampler.batch - len(texts))
    reference = eager.sampler._generate(padded, torch.Generator().manual_seed(0)).head(len(texts))
    assert torch.equal(ours.tokens, reference.tokens)
    assert tr.sampler.decoder is None
    assert "compiled decode step failed on first use" in capsys.readouterr().err


# ---- one slot per layer in place, a read of the filled part, one shape per run -------------------


def test_spans_double_up_to_the_cache():
    assert decode.spans(1792) == [256, 512, 1024, 1792]  # the trainer's cache: 4 graphs at most
    assert decode.spans(256) == [256]
    assert decode.spans(128) == [128]
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
    ours = sample.generate(
        model, prompts, generator=torch.Generator().manual_seed(1), decoder=dec, **kw
    )
    assert_same(ours, ref)
    # three spans read
    assert ours.tokens.shape[1] == 430
    assert max(len(p) for p in prompts) + 430 > 512
    assert graphs() - before == 3  # 256, 512 and 640 slots
    (state,) = dec.states.values()
    assert len(state.cache.k) == len(state.cache.v) == model.config.num_hidden_layers
    cache = list(state.cache.k + state.cache.v)
    again = sample.generate(
        model, prompts, generator=torch.Generator().manual_seed(1), decoder=dec, **kw
    )
    assert_same(again, ref)
    (state,) = dec.states.values()
    assert all(a is b for a, b in zip(cache, state.cache.k + state.cache.v))
    assert graphs() - before == 3  # replayed, not traced again


def loop_nests(code: str) -> list[int]:
    """Elements each loop nest of inductor's C++ kernels in `code` covers: the product of the
    extents of the loops around every innermost loop body (a kernel copying a whole tensor covers
    its numel)."""
    out = []
    stack = []
    depth = 0
    loop = re.compile(
        r"for\s*\(\s*int64_t\s+(\w+)\s*=\s*static_cast<int64_t>\((-?\d+)L?\);\s*\1\s*<\s*"
        r"static_cast<int64_t>\((-?\d+)L?\)"
    )
    for line in code.splitlines():
        if m := loop.search(line):
            stack.append([depth, int(m[3]) - int(m[2]), False])
            out.append(math.prod(e for _, e, _ in stack))
        for ch in line:
            if ch == "{":
                depth += 1
                if stack and stack[-1][0] == depth - 1:
                    stack[-1][2] = True
            elif ch == "}":
                depth -= 1
                while stack and stack[-1][2] and stack[-1][0] == depth:
                    stack.pop()
    return out


def test_compiled_step_writes_one_cache_slot_not_a_copy_of_the_cache(small, prompts):
    """Inductor's code for the decode step at the trainer's cache length (1,792 slots) holds no
    kernel that covers a whole layer's [B, kv_heads, L, head_dim] cache: the new token's K and V
    are written in place. The old design (a cache of one stacked tensor for K and one for V, a
    layer's slice written with index_copy_) gives such copies, and this check finds them."""
    from torch._inductor.utils import run_and_get_code

    model, sv = small
    kw = dict(max_new_tokens=4, temperature=0, allowed_ids=sv.allowed_ids())
    ref = sample.generate(model, prompts[:2], **kw)
    torch._dynamo.reset()  # the step's graphs of the tests above count towards dynamo's limit of 8
    real = decode.KVCache.for_model
    found = {}
    for design in ("per-layer", "stacked"):
        # the stacked design: [layers, B, kv_heads, L, head_dim] each
        def for_model(*args, _design=design, **kwargs):
            c = real(*args, **kwargs)
            if _design == "per-layer":
                return c
            return llama.KVCache(torch.stack(c.k), torch.stack(c.v))

        decode.KVCache.for_model = staticmethod(for_model)
        try:
            dec = decode.Decoder(model, compile=True, max_len=1792)
            out, codes = run_and_get_code(
                functools.partial(sample.generate, model, prompts[:2], decoder=dec, **kw)
            )
        finally:
            decode.KVCache.for_model = staticmethod(real)
        assert_same(out, ref)
        (s,) = dec.states.values()
        assert s.cache.length == 1792
        assert len(codes) == 1
        layer = s.cache.k[0].numel()  # B * kv_heads * L * head_dim
        found[design] = [n for n in loop_nests(codes[0]) if n >= layer]
        assert max(loop_nests(codes[0])) > 0
    assert found["per-layer"] == [], found  # no whole-cache kernel
    assert len(found["stacked"]) >= 2, found  # K and V copied whole at each step


def test_trainer_decodes_one_shape_per_run_and_frees_it(tmp_path):
    """Validation chunks (and so the prosody reference, the same path) and uneven --rollout-chunks
    are padded to the sampler's batch: the decoder keeps one set of buffers for the whole run,
    freed by close()."""
    cfg = _tiny(tmp_path, "--rollout-chunks", "5")
    tr = grpo.Trainer(cfg, parallel.Dist(), torch.device("cpu"), _FakeScorer(0.5))
    assert tr.sampler.batch == 4  # 16 rollouts in 5 chunks: 3, 3, 3, 3, 4 rows, each padded to 4
    # the static step, eager
    tr.sampler.decoder = decode.Decoder(tr.policy.lm, max_len=cfg.max_new_tokens + 256)
    assert len(tr.val_examples) % tr.sampler.batch != 0  # a short last validation chunk
    tr.validate()
    metrics, _ = tr.train_step(0)
    assert metrics["response_len"] > 0
    assert [key[0] for key in tr.sampler.decoder.states] == [tr.sampler.batch]
    tr.sampler.close()
    assert not tr.sampler.decoder.states
    assert tr.sampler.decoder.weight_copies is None
