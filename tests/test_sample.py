"""sample.py: batched generation against transformers' generate, seeded sampling, stops and allowed
ids, input checks, concatenated rollouts; models.py: loading models; the TTS CLI."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import codec
import data
import models
import sample
from helpers import PROMPTS, VOCAB, hf_greedy

# ---- generation against transformers' generate ---------------------------------------------------

LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)],
    ids=["untied", "tied-llama3rope"],
)
def test_greedy_equals_hf_generate(overrides):
    model = models.tiny_llama(VOCAB, seed=1, **overrides)
    if overrides:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.config.rope_scaling["rope_type"] == "llama3"
    n = 40
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0)
    ref = hf_greedy(model, PROMPTS, n)
    assert torch.equal(ours.tokens, ref)
    assert ours.lengths.tolist() == [n] * len(PROMPTS)
    assert not ours.finished.any()

    # A stop id that row 0 emits mid-way: that row ends there, the others run on (or stop too).
    stop = int(ref[0, 10])
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, stop_ids=(stop,))
    ref_stop = hf_greedy(model, PROMPTS, n, eos=stop)  # HF fills finished rows with pad_token_id 0
    assert torch.equal(ours.tokens, ref_stop)
    for i in range(len(PROMPTS)):
        hits = (ref[i] == stop).nonzero()
        expected_len = int(hits[0]) + 1 if len(hits) else n
        assert int(ours.lengths[i]) == expected_len
        assert bool(ours.finished[i]) == bool(len(hits))
    assert ours.lengths[0] <= 11
    assert ours.finished[0]


def test_greedy_repetition_penalty_equals_hf_generate():
    """The penalty covers prompt and generated ids, as HF's does. HF is run one prompt at a time:
    in a left-padded batch it would penalize the pad token too."""
    model = models.tiny_llama(VOCAB, seed=1)
    n = 30
    ours = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0, repetition_penalty=1.5)
    for i, p in enumerate(PROMPTS):
        ref = model.generate(
            input_ids=torch.tensor([p]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            repetition_penalty=1.5,
            pad_token_id=0,
        )[0, len(p) :]
        assert ours.tokens[i].tolist() == ref.tolist()
    plain = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0)
    assert not torch.equal(ours.tokens, plain.tokens)  # the penalty changed something


def test_greedy_bf16_runs_and_logprobs_are_finite():
    model = models.tiny_llama(VOCAB, seed=1).to(torch.bfloat16)
    out = sample.generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    assert out.tokens.shape == (len(PROMPTS), 12)
    assert out.logprobs.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all()
    assert (out.logprobs < 0).all()
    assert torch.equal(out.tokens, hf_greedy(model, PROMPTS, 12))


def test_logprobs_equal_teacher_forced_forward():
    """Rollout log-probs are log_softmax(logits / T) of the unfiltered policy, as the trainer
    recomputes them, even with top-k and the repetition penalty shaping what is sampled."""
    model = models.tiny_llama(VOCAB, seed=2)
    T = 0.8
    g = torch.Generator().manual_seed(0)
    out = sample.generate(
        model,
        PROMPTS,
        max_new_tokens=30,
        temperature=T,
        top_k=40,
        repetition_penalty=1.3,
        stop_ids=(7, 8, 9),
        generator=g,
    )
    assert out.finished.any()  # some rows stop early, so the zero padding is exercised too
    # Made in inference_mode, returned as plain tensors: autograd may save them (old log-probs).
    w = torch.ones((), requires_grad=True)
    (out.logprobs * w).sum().backward()
    for i, p in enumerate(PROMPTS):
        n = int(out.lengths[i])
        gen = out.tokens[i, :n]
        with torch.no_grad():
            # [n, V]
            logits = model(torch.tensor([p + gen.tolist()])).logits[0, len(p) - 1 : len(p) - 1 + n]
        expected = torch.log_softmax(logits.float() / T, dim=-1).gather(1, gen[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[i, :n], expected, atol=1e-4, rtol=0)
        assert (out.logprobs[i, n:] == 0).all()
        assert (out.tokens[i, n:] == 0).all()


def test_seeded_sampling_is_reproducible():
    model = models.tiny_llama(VOCAB, seed=3)

    def run(seed):
        return sample.generate(
            model,
            PROMPTS,
            max_new_tokens=20,
            temperature=1.0,
            top_p=0.9,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_allowed_ids_and_stops():
    model = models.tiny_llama(VOCAB, seed=4)
    stop = 299
    allowed = list(range(150, 170)) + [stop]
    # A near-uniform model over 21 tokens stops within 16 steps with p ~ 0.54 per row: among 24
    # rows, "all stopped" or "none stopped" has probability ~1e-6 whatever the random stream.
    prompts = PROMPTS * 6
    n = 16

    def run(stop_ids):
        return sample.generate(
            model,
            prompts,
            max_new_tokens=n,
            temperature=1.0,
            stop_ids=stop_ids,
            allowed_ids=allowed,
            generator=torch.Generator().manual_seed(0),
        )

    free, out = run(()), run((stop,))
    assert set(free.tokens.flatten().tolist()) <= set(allowed)
    assert out.finished.any()
    assert not out.finished.all()
    for i in range(len(prompts)):
        n_i = int(out.lengths[i])
        row = out.tokens[i, :n_i].tolist()
        assert set(row) <= set(allowed)
        if out.finished[i]:
            assert row[-1] == stop
            assert stop not in row[:-1]
        else:
            assert n_i == n
            assert stop not in row
        # Rows are independent and draw the same random numbers: up to its stop a row is exactly
        # the unstopped run's row; after it, nothing changes (zeros, log-prob 0).
        assert row == free.tokens[i, :n_i].tolist()
        assert (out.tokens[i, n_i:] == 0).all()
        assert (out.logprobs[i, n_i:] == 0).all()
        assert (out.logprobs[i, :n_i] < 0).all()


def test_bad_inputs_raise_clear_errors():
    model = models.tiny_llama(VOCAB, max_positions=64)

    def gen(prompts=PROMPTS, **kw):
        return sample.generate(model, prompts, **{"max_new_tokens": 4, **kw})

    with pytest.raises(ValueError, match="prompts is empty"):
        gen([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen([[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 has token ids outside the vocabulary"):
        gen([[1, VOCAB]])
    with pytest.raises(
        ValueError, match=r"prompt of 14 tokens \+ max_new_tokens=60 exceeds .* context of 64"
    ):
        gen(max_new_tokens=60)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        gen(max_new_tokens=0)
    for kw, msg in [
        (dict(top_p=0.0), "top_p must be in \\(0, 1\\], got 0.0"),
        (dict(top_p=1.5), "got 1.5"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(allowed_ids=[1, VOCAB + 5]), f"allowed_ids has ids outside .*{VOCAB + 5}"),
        (dict(stop_ids=[-1]), "stop_ids has ids outside"),
        (dict(allowed_ids=[1, 2], stop_ids=[3]), "stop ids \\[3\\] are not in allowed_ids"),
    ]:
        with pytest.raises(ValueError, match=msg):
            gen(**kw)
    with pytest.raises(KeyError, match="<\\|s_9999\\|>"):
        data.token_id(data.tiny_tokenizer(), "<|s_9999|>")


def test_cat_rollouts_pads_to_the_longest():
    a = sample.Rollout(
        torch.tensor([[5, 6, 7]]),
        torch.tensor([3]),
        torch.tensor([[-1.0, -2.0, -3.0]]),
        torch.tensor([True]),
    )
    b = sample.Rollout(
        torch.tensor([[8], [9]]),
        torch.tensor([1, 1]),
        torch.tensor([[-4.0], [-5.0]]),
        torch.tensor([False, True]),
    )
    r = sample.cat_rollouts([a, b])
    assert r.tokens.tolist() == [[5, 6, 7], [8, 0, 0], [9, 0, 0]]
    assert r.lengths.tolist() == [
        3,
        1,
        1,
    ]
    assert r.logprobs.tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0], [-5.0, 0.0, 0.0]]
    assert r.finished.tolist() == [True, False, True]


# ---- loading models and the CLI ------------------------------------------------------------------


def test_cli_tiny_model_writes_wav(tmp_path, capsys):
    out_path = tmp_path / "tts.wav"
    r = sample.main(
        [
            "--model",
            "tiny",
            "--codec",
            "tone",
            "--text",
            "Hello there.",
            "--out",
            str(out_path),
            "--max-new-tokens",
            "24",
            "--device",
            "cpu",
            "--seed",
            "3",
        ]
    )
    wav, sr = sf.read(out_path)
    n_speech = int(r.lengths[0]) - int(r.finished[0])
    assert sr == codec.SAMPLE_RATE
    assert n_speech > 0
    assert len(wav) == 320 * n_speech
    assert "wrote" in capsys.readouterr().out
    # the CLI's tiny model: 64 speech tokens
    vocab = data.speech_vocab(models.load_model("tiny")[1])
    assert vocab.n == 64
    assert vocab.to_codes(r.tokens[0, :n_speech].tolist())  # all speech tokens


def test_load_model_round_trip(tmp_path):
    model = models.tiny_llama(len(data.tiny_tokenizer()), seed=5)
    tok = data.tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(str(tmp_path), "cpu", torch.float32)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    a = sample.generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    b = sample.generate(loaded, PROMPTS, max_new_tokens=8, temperature=0)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(FileNotFoundError, match=r"model directory not found: .*nope"):
        models.load_model(str(tmp_path / "nope"), "cpu", torch.float32)


def test_load_model_tiny():
    """'tiny', the trainer's and the CLI's offline model: 64 speech tokens, a seeded tiny Llama."""
    model, tok = models.load_model("tiny", "cpu", torch.float32, seed=7)
    assert data.speech_vocab(tok).n == 64
    assert model.config.vocab_size == len(tok)
    assert not model.training
    assert model.config.max_position_embeddings == 4096
    ref = models.tiny_llama(len(tok), seed=7, max_positions=4096)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    other, _ = models.load_model("tiny", "cpu", torch.bfloat16, seed=8)
    assert next(other.parameters()).dtype == torch.bfloat16
    assert not torch.equal(other.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())


def test_eager_loop_under_autocast_casts_each_weight_once():
    """Under autocast the eager loop runs with no_grad, where autocast caches its bf16 casts of the
    fp32 weights: a call casts each weight once, however many tokens it decodes (under
    inference_mode it would cast every weight again at every step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = models.tiny_llama(VOCAB, seed=0)
    shapes = {
        tuple(p.shape) for name, p in model.named_parameters() if name.endswith("proj.weight")
    }

    class CountWeightCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (
                func is torch.ops.aten._to_copy.default
                and tuple(args[0].shape) in shapes
                and kwargs.get("dtype") == torch.bfloat16
            ):
                self.n += 1
            return func(*args, **kwargs)

    counts = []
    for n in (4, 16):
        with torch.autocast("cpu", dtype=torch.bfloat16), CountWeightCasts() as mode:
            out = sample.generate(model, PROMPTS, max_new_tokens=n, temperature=0)
        assert out.tokens.shape[1] == n
        counts.append(mode.n)
    assert counts[0] == counts[1], counts
    assert 0 < counts[0] <= 2 * 7 * model.config.num_hidden_layers, counts


def test_cli_clones_a_voice(tmp_path, capsys):
    """--prompt-wav/--prompt-text: the model continues after the prompt's speech tokens (the tone
    codec encodes it exactly); the wav holds only the generated speech."""
    from helpers import REPO

    prompt = f"{REPO}/data/clone/low.wav"
    out_path = tmp_path / "clone.wav"
    args = [
        "--model",
        "tiny",
        "--codec",
        "tone",
        "--text",
        "Hello there.",
        "--max-new-tokens",
        "24",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--temperature",
        "0",
    ]
    r = sample.main(
        [
            *args,
            "--out",
            str(out_path),
            "--prompt-wav",
            prompt,
            "--prompt-text",
            "A low voice says this.",
        ]
    )
    plain = sample.main([*args, "--out", str(tmp_path / "plain.wav")])
    n = int(r.lengths[0]) - int(r.finished[0])
    assert len(sf.read(out_path)[0]) == 320 * n
    assert "in the voice of" in capsys.readouterr().out
    assert not torch.equal(r.tokens, plain.tokens)  # the prompt changes what it says
    with pytest.raises(SystemExit):
        sample.main([*args, "--out", str(out_path), "--prompt-wav", prompt])


# ---- the CLI's checks: a user's error is one line naming the flag, exit 2, before loading ------

# (flags after a good command line writing TMP/out.wav, what the one line must say). TMP is the
# test's folder: TMP/e.wav has no frames, TMP/f is neither audio nor a model directory.
SAMPLE_BAD_FLAGS = [
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k -1: must be >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be > 0"),
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--codec", "bogus"], "--codec bogus: expected 'tone', 'words[:PATH]'"),
    (["--codec", "xcodec2:./nope"], "--codec xcodec2:./nope: no such file or directory"),
    (["--model", "./nope"], "--model ./nope: no such directory"),
    (["--model", "TMP/f"], "--model TMP/f: a file"),
    (["--model", "TMP"], "--model TMP: a directory without config.json"),
    (["--device", "bogus"], "--device bogus: expected 'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "cuda:0"], "--device cuda:0: no CUDA device is visible"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--prompt-wav", "TMP/x.wav", "--prompt-text", "Hi."], "--prompt-wav TMP/x.wav: no such file"),
    (["--prompt-wav", "TMP/e.wav", "--prompt-text", "Hi."], "--prompt-wav TMP/e.wav: empty"),
    (["--prompt-wav", "TMP/f", "--prompt-text", "Hi."], "--prompt-wav TMP/f: cannot be read"),
    (["--prompt-text", "Hi."], "--prompt-wav and --prompt-text: voice cloning needs both"),
    (["--text", "  "], "--text '  ': nothing to say"),
    (["--out", "TMP/no/dir.wav"], "--out TMP/no/dir.wav: no such directory TMP/no"),
    (["--out", "TMP/out.xyz"], "--out TMP/out.xyz: expected a sound file name"),
]


@pytest.mark.parametrize(
    "flags, message", SAMPLE_BAD_FLAGS, ids=[" ".join(f) for f, _ in SAMPLE_BAD_FLAGS]
)
def test_cli_bad_flag_is_one_line_exit_2_before_loading(
    tmp_path, monkeypatch, capsys, flags, message
):
    def loaded(*args, **kwargs):
        raise AssertionError("loaded a model or codec before the flags were checked")

    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.setattr(codec, "load_codec", loaded)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sf.write(tmp_path / "e.wav", np.zeros(0, dtype=np.float32), 16000)
    (tmp_path / "f").write_text("not audio, not a model\n")
    good = [
        "--model",
        "tiny",
        "--codec",
        "tone",
        "--text",
        "Hi.",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out.wav"),
    ]
    with pytest.raises(SystemExit) as stop:
        sample.main(good + [f.replace("TMP", str(tmp_path)) for f in flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith(f"sample.py: error: {message.replace('TMP', str(tmp_path))}"), err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_context_overflow_is_one_line(tmp_path, capsys):
    """--max-new-tokens past the model's context: known once the model is loaded, said before
    generating."""
    with pytest.raises(SystemExit) as stop:
        sample.main(
            [
                "--model",
                "tiny",
                "--codec",
                "tone",
                "--text",
                "Hi.",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "o.wav"),
                "--max-new-tokens",
                "5000",
            ]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith("sample.py: error: --max-new-tokens 5000: the prompt takes ")
    assert "model's 4096 positions" in err
    assert not (tmp_path / "o.wav").exists()


def test_cli_bad_flag_exits_2_in_one_line_from_the_shell(tmp_path):
    from helpers import REPO

    argv = [
        "sample.py",
        "--model",
        "tiny",
        "--codec",
        "tone",
        "--text",
        "Hi.",
        "--top-k",
        "-1",
        "--out",
        str(tmp_path / "o.wav"),
    ]
    r = subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert (r.returncode, r.stdout) == (2, ""), r.stderr[-2000:]
    assert r.stderr == "sample.py: error: --top-k -1: must be >= 0 (0 = off)\n"


def test_cli_help_explains_every_flag_with_its_default(monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        sample.main(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0
    parsers = []

    def record(self, argv=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(sample.CLIParser, "parse_args", record)
    with pytest.raises(SystemExit):
        sample.main([])
    flags = [a for a in parsers[0]._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 15
    for action in flags:
        assert action.option_strings[0] in text, action
        assert action.help, action
        if not action.required and action.default is not None:  # a default the user should know
            assert "(default:" in action.help, action.option_strings


def _cli_generate_kwargs(monkeypatch, tmp_path, *flags) -> tuple[dict, list]:
    """What the CLI passes to generate (kwargs, prompt ids), with generate stubbed out."""
    seen = {}

    def fake_generate(model, prompts, **kwargs):
        seen.update(kwargs, prompts=prompts)
        vocab = data.speech_vocab(models.load_model("tiny")[1])
        tokens = torch.tensor([[vocab.first + 5, vocab.end_id]])
        return sample.Rollout(tokens, torch.tensor([2]), torch.zeros(1, 2), torch.tensor([True]))

    monkeypatch.setattr(sample, "generate", fake_generate)
    sample.main(
        [
            "--model",
            "tiny",
            "--codec",
            "tone",
            "--text",
            "Hello there.",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "t.wav"),
            *flags,
        ]
    )
    return seen, seen.pop("prompts")


def test_cli_defaults_are_llasa_model_cards(monkeypatch, tmp_path, capsys):
    """LLASA's cards sample with temperature 0.8, top-p 1, no repetition penalty and max_length=2048
    counting the prompt (the length LLASA was trained at): the rest of the 2,048 for new tokens."""
    kwargs, prompts = _cli_generate_kwargs(monkeypatch, tmp_path)
    assert kwargs["temperature"] == 0.8
    assert kwargs["top_p"] == 1.0
    assert kwargs["top_k"] == 0
    assert kwargs["repetition_penalty"] == 1.0
    assert len(prompts[0]) + kwargs["max_new_tokens"] == 2048
    assert "warning" not in capsys.readouterr().err


def test_cli_warns_when_the_response_can_pass_max_context(monkeypatch, tmp_path, capsys):
    """A --max-new-tokens that can take prompt + response past --max-context (the length the
    model was trained at) is said once on stderr; a prompt that fills --max-context alone is a
    user's error (one line, status 2)."""
    kwargs, prompts = _cli_generate_kwargs(monkeypatch, tmp_path, "--max-new-tokens", "2048")
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert f"the prompt ({len(prompts[0])} tokens)" in err
    assert "--max-context 2048" in err
    assert kwargs["max_new_tokens"] == 2048
    _cli_generate_kwargs(monkeypatch, tmp_path, "--max-context", "100", "--max-new-tokens", "100")
    assert "can pass --max-context 100" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        _cli_generate_kwargs(monkeypatch, tmp_path, "--max-context", str(len(prompts[0])))
    assert exit_.value.code == 2
    assert "the prompt alone is" in capsys.readouterr().err


def test_a_model_without_lm_head_is_the_type_error_naming_what_generate_needs():
    """A bare LlamaModel (no lm_head) fails the model check itself (an AttributeError on
    model.lm_head before issue 27 put that check first)."""
    model = models.tiny_llama(VOCAB, seed=1)
    with pytest.raises(TypeError, match="Llama-family"):
        sample.generate(model.model, [[1, 2]], max_new_tokens=1)
