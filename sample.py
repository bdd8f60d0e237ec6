"""Rollouts and TTS inference: a hand-written batched decode loop over a Hugging Face Llama.

`generate` prefills a left-padded batch of prompts, then adds one token per step to a KV cache it
preallocates and owns, running the model's own modules (embeddings, layers, norm, rotary embedding,
lm_head) with F.scaled_dot_product_attention. No `model.generate`, no HF Cache objects: the loop
reads as gpt-fast's, a few small functions (llama.py: `prefill`, `process_logits`, `sample_token`,
`decode_one_token`) one can read, test against transformers and time (`python -m tools.bench
sample`).

With `compile=True` or a `decode.Decoder`, the same loop runs a static-shape step instead
(decode.py, gpt-fast's design), which `torch.compile` captures once per shape (CUDA graphs on a
GPU); this dynamic loop stays the reference it is tested against.

The policy is speech-only (DESIGN.md §2): with `allowed_ids`, it is the model's distribution
restricted to those ids and renormalized (llama.py's head, shared with the trainer).

CLI (TTS inference):
    python sample.py --model DIR --text "Hello there." --out out.wav
    python sample.py --model tiny --codec tone --text "hi" --out /tmp/t.wav   # offline smoke test
    (--compile / --no-compile: the compiled static-shape step; default on for cuda, off for cpu)
"""

import argparse
import contextlib
import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
from checks import CLIParser, check_ids, check_knobs, check_model, check_prompts, cli_problem
from decode import Decoder, generate_static
from llama import (
    KVCache,
    decode_one_token,
    head_rows,
    left_padded,
    prefill,
    process_logits,
    prompt_mask,
    sample_token,
    seen_in_prompts,
    token_logprobs,
)


@dataclass
class Rollout:
    """Output of `generate`; B prompts, T = the longest generated length."""

    tokens: torch.Tensor  # [B, T] long, right-padded with 0
    lengths: torch.Tensor  # [B] long, generated tokens per row, the stop token included
    logprobs: torch.Tensor  # [B, T] float32, log-prob of each generated token, 0 past the length
    finished: torch.Tensor  # [B] bool, the row ended with a stop id (False: hit max_new_tokens)

    def head(self, n: int) -> "Rollout":
        """The first n rows, cut to their longest response (e.g. a padded batch's real rows)."""
        if n == self.tokens.shape[0]:
            return self
        T = int(self.lengths[:n].max())
        return Rollout(
            tokens=self.tokens[:n, :T],
            lengths=self.lengths[:n],
            logprobs=self.logprobs[:n, :T],
            finished=self.finished[:n],
        )


def cat_rollouts(rolls: list) -> Rollout:
    """Rollouts of several chunks as one: tokens and log-probs right-padded to the longest."""
    T = max(r.tokens.shape[1] for r in rolls)

    def pad(x):  # [b, t] -> [b, T]
        return F.pad(x, (0, T - x.shape[1]))

    return Rollout(
        tokens=torch.cat([pad(r.tokens) for r in rolls]),
        lengths=torch.cat([r.lengths for r in rolls]),
        logprobs=torch.cat([pad(r.logprobs) for r in rolls]),
        finished=torch.cat([r.finished for r in rolls]),
    )


def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop_ids=(),
    allowed_ids=None,
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | None = None,
    compile: bool = False,
    decoder=None,
) -> Rollout:
    """Sample up to `max_new_tokens` tokens after each prompt (lists of ids, lengths may differ).

    `allowed_ids` (e.g. speech tokens + stop; None: all) restricts the policy to those ids: only
    their rows of lm_head are computed and every knob acts on them (greedy picks exactly the argmax
    of the masked full logits). Knobs follow Hugging Face semantics and order: repetition_penalty
    (prompt and generated tokens; HF's left-pad tokens are not penalized here), temperature,
    top_k, top_p; `temperature=0` is greedy. A row stops after one of `stop_ids` and then no
    longer changes. `generator` (on the model's device) makes sampling reproducible. `cache_dtype`
    (default: the weights') sets the KV cache's dtype, e.g. bfloat16 for fp32 weights under
    autocast.

    `logprobs` (nats) are `token_logprobs` of the *unprocessed* policy at the sampled token:
    log_softmax over the allowed ids of logits / temperature (1 when greedy), with no top-k/top-p
    or penalty: what the trainer recomputes with `head_logprobs`, so importance ratios start at
    exactly 1. With no filters on, it is the distribution the token was sampled from.

    `decoder` (a `Decoder` of this model, kept by the caller across calls) runs the static-shape
    step, compiled or not as the decoder was built; `compile=True` without one builds a compiled
    `Decoder` for this call only. Neither (the default): the dynamic loop, the reference. All three
    give the same tokens and log-probs, seeded sampling included (same generator draws, same
    order). Bad arguments raise ValueError (TypeError for a model that is not a Llama)."""
    device = next(model.parameters()).device
    check_model(model)
    check_prompts(model, prompts, max_new_tokens)
    check_knobs(temperature, top_p, top_k, repetition_penalty)
    check_ids(model, stop_ids, allowed_ids)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}")
    if decoder is None and compile:
        decoder = Decoder(model, compile=True)
    if decoder is not None and decoder.model is not model:
        raise ValueError("decoder was built for another model: build one Decoder per model")
    if decoder is None:
        run = _generate
    else:  # the static, compilable step (decode.py)
        run = functools.partial(generate_static, decoder)
    knobs = dict(  # the sampling knobs, as `process_logits` takes them
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    with _grad_mode(decoder, device):
        out = run(
            model, prompts, max_new_tokens, knobs, stop_ids, allowed_ids, generator, cache_dtype
        )
    # Cloned outside inference_mode, so the trainer may use them in autograd (as old log-probs).
    return Rollout(*(x.clone() for x in out))


@contextlib.contextmanager
def _grad_mode(decoder, device):
    """No autograd for a `generate` call: inference_mode for the eager loop, else no_grad."""
    # Under autocast, no_grad instead of inference_mode: autocast caches its weight casts only
    # outside inference_mode, and without that cache the eager loop would cast every fp32 weight
    # to bf16 again at every step. A Decoder's buffers, kept across calls, are written in place:
    # never inference tensors.
    autocast = torch.is_autocast_enabled(device.type)
    if decoder is None and not autocast:
        with torch.inference_mode():
            yield
    elif decoder is None or not autocast:
        with torch.no_grad():
            yield
    else:
        # The step has its own weight copies: the eager prefill casts each weight as it goes
        # rather than cache a second copy of them all.
        dtype = torch.get_autocast_dtype(device.type)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            yield


# ----------------------------------------------------------------------------- the decode loop


@dataclass
class Emitted:
    """What the eager loop has emitted: B rows of up to N tokens, one column per step."""

    tokens: torch.Tensor  # [B, N] long, 0 from a row's stop on
    logprobs: torch.Tensor  # [B, N] float32, 0 from a row's stop on
    lengths: torch.Tensor  # [B] long, tokens emitted per row, the stop token included
    done: torch.Tensor  # [B] bool, emitted a stop id (the only early end)

    @staticmethod
    def zeros(B: int, N: int, device) -> "Emitted":
        return Emitted(
            tokens=torch.zeros(B, N, dtype=torch.long, device=device),
            logprobs=torch.zeros(B, N, dtype=torch.float32, device=device),
            lengths=torch.zeros(B, dtype=torch.long, device=device),
            done=torch.zeros(B, dtype=torch.bool, device=device),
        )

    def record(self, t: int, token, logp, stop):
        """Column t: token [B] long vocab ids, logp [B] float32 their log-probs. A row that has
        stopped records 0 and does not count; stop [S] long ids end a row. Returns the tokens
        recorded [B]."""
        token = token.masked_fill(self.done, 0)
        self.tokens[:, t] = token
        self.logprobs[:, t] = logp.masked_fill(self.done, 0.0)
        self.lengths += ~self.done
        if stop.numel():
            self.done |= torch.isin(token, stop) & ~self.done
        return token

    def trimmed(self) -> tuple:
        """(tokens [B, T], lengths [B], logprobs [B, T], finished [B]), T the longest row."""
        T = int(self.lengths.max())
        return self.tokens[:, :T], self.lengths, self.logprobs[:, :T], self.done


def _generate(model, prompts, max_new_tokens, knobs, stop_ids, allowed_ids, generator, cache_dtype):
    """The decode loop of `generate`, arguments checked (knobs: `process_logits`' keywords).
    Returns `Emitted.trimmed`'s four tensors."""
    device = next(model.parameters()).device
    ids, lens = left_padded(prompts, device)  # [B, P], [B]
    B, P = ids.shape
    N = max_new_tokens
    cache = KVCache.for_model(model, B, P + N, cache_dtype)
    # key_ok [B, P+N] bool: which cache slots hold a real token. Prompt pads never do; generated
    # slots always do (slots not yet written are cut off by slicing the cache to the current step).
    key_ok = torch.ones(B, P + N, dtype=torch.bool, device=device)
    key_ok[:, :P] = prompt_mask(lens, P)
    weight, index = head_rows(model, allowed_ids)  # [A, H] rows of lm_head; index [A]: their ids
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))  # fp32 head, cast once
    seen = None  # [B, A] bool: allowed tokens in the prompt or generated so far
    if knobs["repetition_penalty"] != 1.0:
        seen = seen_in_prompts(ids, index, key_ok[:, :P])
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=device)  # [S]
    out = Emitted.zeros(B, N, device)
    # Checking "all rows stopped" is a host sync; on a GPU do it every few steps so the CPU can
    # queue kernels ahead (a few wasted steps at the very end cost less than a sync per step).
    sync_every = 1 if device.type == "cpu" else 8
    temperature = knobs["temperature"]

    logits = prefill(model, cache, ids, key_ok[:, :P], weight)  # [B, A] float32
    for t in range(N):
        processed = process_logits(logits, seen=seen, **knobs)  # [B, A]
        row = sample_token(processed, greedy=temperature == 0, generator=generator)  # [B] in [0, A)
        logp = token_logprobs(logits, row, temperature)  # [B]
        token = out.record(t, index[row], logp, stop)  # [B] vocab ids
        if seen is not None:
            seen.scatter_(1, row[:, None], True)
        if t == N - 1:
            break
        if (t + 1) % sync_every == 0 and bool(out.done.all()):
            break
        # The token at cache slot P + t has position lens + t: positions start at 0 after the pads.
        logits = decode_one_token(model, cache, token, lens + t, P + t, key_ok, weight)
    return out.trimmed()


# ----------------------------------------------------------------------------- CLI


def cli_parser() -> CLIParser:
    """sample.py's flags; LLASA's model cards' settings as defaults."""
    p = CLIParser(
        prog="sample.py",
        description="LLASA text-to-speech: text -> speech tokens -> 16 kHz wav.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face directory or hub id of a LLASA model, 'tiny' (random, offline) or "
        "'demo' (the CPU demo's policy, built on first use)",
    )
    p.add_argument("--text", required=True, help="text to speak")
    p.add_argument("--out", required=True, help="output .wav path (16 kHz mono)")
    p.add_argument(
        "--prompt-wav",
        default=None,
        help="voice cloning: a recording of the voice to speak in (any rate, resampled to 16 kHz)",
    )
    p.add_argument("--prompt-text", default=None, help="voice cloning: what --prompt-wav says")
    # The cards sample at temperature 0.8, top-p 1, no repetition penalty, max_length=2048
    # counting the prompt (the length LLASA was trained at).
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="sampling temperature, 0 = greedy (default: 0.8)",
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off (default: 1.0)"
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default: 0)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="HF repetition penalty, 1 = off (default: 1.0)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="most speech tokens to generate, 50 per second of audio "
        "(default: --max-context minus the prompt's tokens)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=2048,
        help="prompt + response tokens the model was trained at; a --max-new-tokens "
        "that can pass it is warned about (default: 2048, LLASA's)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "--codec",
        default="xcodec2",
        help="'xcodec2[:PATH]' or 'tone' (test codec) (default: xcodec2)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="model weights (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode with the compiled static-shape step (CUDA graphs on a GPU; the first call "
        "compiles, which takes a while) (default: on for cuda, off for cpu)",
    )
    return p


def new_token_budget(p: CLIParser, args, prompt_len: int, positions: int) -> int:
    """--max-new-tokens, or when unset the rest of --max-context after the prompt (as the cards'
    max_length=2048); one-line error (exit 2) if the model's `positions` cannot hold it."""
    budget = args.max_new_tokens
    if budget is None:
        budget = min(args.max_context, positions) - prompt_len
        if budget < 1:
            p.error(f"--max-context {args.max_context}: the prompt alone is {prompt_len} tokens")
    elif budget > positions - prompt_len:
        p.error(
            f"--max-new-tokens {budget}: the prompt takes {prompt_len} of the "
            f"model's {positions} positions, leaving {positions - prompt_len}"
        )
    elif prompt_len + budget > args.max_context:
        print(
            f"sample.py: warning: the prompt ({prompt_len} tokens) + --max-new-tokens "
            f"{budget} can pass --max-context {args.max_context}, the length the model "
            "was trained at",
            file=sys.stderr,
        )
    return budget


def main(argv=None):
    import soundfile

    import codec
    import demo
    from models import load_model

    p = cli_parser()
    args = p.parse_args(argv)
    if why := cli_problem(args):  # before anything loads
        p.error(why)

    device = torch.device(args.device)
    dtype_name = args.dtype
    if dtype_name is None:
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    compile = args.compile
    if compile is None:
        compile = device.type == "cuda"
    model_dir = demo.resolve_model(args.model)  # "demo": its starting policy, built on first use
    model, tokenizer = load_model(model_dir, device, getattr(torch, dtype_name))
    vocab = data.speech_vocab(tokenizer)
    speech_codec = codec.load_codec(args.codec, device)
    prompt_codes = None
    if args.prompt_wav:  # LLASA's clone prompt: the prompt's speech tokens open the assistant turn
        prompt_codes = speech_codec.encode([data.read_audio(args.prompt_wav)])[0]
    ids = data.prompt_ids(tokenizer, args.text, args.prompt_text, prompt_codes)
    positions = model.config.max_position_embeddings  # known once the model is loaded
    max_new_tokens = new_token_budget(p, args, len(ids), positions)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(
        model,
        [ids],
        max_new_tokens=max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop_ids=(vocab.end_id,),
        allowed_ids=vocab.allowed_ids(),
        generator=generator,
        compile=compile,
    )
    n = int(out.lengths[0]) - int(out.finished[0])  # speech tokens, without the stop token
    codes = vocab.to_codes(out.tokens[0, :n].tolist())
    wav = speech_codec.decode([codes])[0]  # the generated speech only, after the prompt's
    soundfile.write(args.out, wav, codec.SAMPLE_RATE)
    status = "finished"
    if not out.finished[0]:
        status = f"not finished (hit {max_new_tokens} new tokens)"
    cloned = ""
    if args.prompt_wav:
        cloned = f", in the voice of {args.prompt_wav}"
    seconds = len(wav) / codec.SAMPLE_RATE
    print(f"wrote {args.out}: {seconds:.2f} s, {n} speech tokens, {status}{cloned}")
    return out


if __name__ == "__main__":
    main()
