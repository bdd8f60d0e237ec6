"""Rollouts and TTS inference: a hand-written batched decode loop over a Hugging Face Llama.

`generate` prefills a left-padded batch of prompts, then adds one token per step to a KV cache it
preallocates and owns, running the model's own modules (embeddings, layers, norm, rotary embedding,
lm_head) with F.scaled_dot_product_attention. No `model.generate`, no HF Cache objects: the loop
is a few small functions (llama.py: logits processing, sampling, prefill, decode_one_token) one
can read, test against transformers and time (bench.py sample).

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
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
from decode import Decoder, generate_static
from llama import (KVCache, decode_one_token, find_rows, head_rows, left_padded, prefill, process_logits,
                    sample_token, token_logprobs)


@dataclass
class Rollout:
    """Output of `generate`; B prompts, T = the longest generated length."""
    tokens: torch.Tensor  # [B, T] long, right-padded with 0
    lengths: torch.Tensor  # [B] long, generated tokens per row, the stop token included
    logprobs: torch.Tensor  # [B, T] float32, log-prob of each generated token, 0 past the length
    finished: torch.Tensor  # [B] bool, True if the row ended with a stop id (False: hit max_new_tokens)

    def head(self, n: int) -> "Rollout":
        """The first n rows, cut to their longest response (e.g. without a padded batch's extra rows)."""
        if n == self.tokens.shape[0]:
            return self
        T = int(self.lengths[:n].max())
        return Rollout(self.tokens[:n, :T], self.lengths[:n], self.logprobs[:n, :T], self.finished[:n])


def cat_rollouts(rolls: list) -> Rollout:
    """Rollouts of several chunks as one: tokens and log-probs right-padded to the longest."""
    T = max(r.tokens.shape[1] for r in rolls)
    pad = lambda x: F.pad(x, (0, T - x.shape[1]))  # noqa: E731
    return Rollout(torch.cat([pad(r.tokens) for r in rolls]), torch.cat([r.lengths for r in rolls]),
                   torch.cat([pad(r.logprobs) for r in rolls]), torch.cat([r.finished for r in rolls]))


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, stop_ids=(),
             allowed_ids=None, generator: torch.Generator | None = None,
             cache_dtype: torch.dtype | None = None, compile: bool = False,
             decoder=None) -> Rollout:
    """Sample up to `max_new_tokens` tokens after each prompt (lists of ids, lengths may differ).

    `allowed_ids` (e.g. speech tokens + stop; None: all) restricts the policy to those ids: only
    their rows of lm_head are computed and every knob acts on them (greedy picks exactly the argmax
    of the masked full logits). Knobs follow Hugging Face semantics and order: repetition_penalty
    (prompt and generated tokens; HF's left-pad tokens are not penalized here), temperature,
    top_k, top_p; `temperature=0` is greedy. A row stops after one of `stop_ids` and then no longer
    changes. `generator` (on the model's device) makes sampling reproducible. `cache_dtype`
    (default: the weights') sets the KV cache's dtype, e.g. bfloat16 for fp32 weights under autocast.

    `logprobs` (nats) are `token_logprobs` of the *unprocessed* policy at the sampled token:
    log_softmax over the allowed ids of logits / temperature (1 when greedy), with no top-k/top-p
    or penalty: what the trainer recomputes with `head_logprobs`, so importance ratios start at
    exactly 1. With no filters on, it is the distribution the token was sampled from.

    `decoder` (a `Decoder` of this model, kept by the caller across calls) runs the static-shape
    step, compiled or not as the decoder was built; `compile=True` without one builds a compiled
    `Decoder` for this call only. Neither (the default): the dynamic loop, the reference. All three
    give the same tokens and log-probs, seeded sampling included (same generator draws, same order)."""
    device = next(model.parameters()).device
    vocab = model.lm_head.out_features
    _check_args(model, prompts, vocab, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                stop_ids, allowed_ids, generator, device)
    # inference_mode skips autograd's per-op bookkeeping (~5% per step on CPU); the outputs are
    # cloned outside it so the trainer may use them in autograd (e.g. as old log-probs). Under
    # autocast, no_grad instead: autocast caches its weight casts only outside inference_mode, and
    # without that cache the eager loop would cast every fp32 weight to bf16 again at every step.
    # A Decoder's buffers, kept across calls, are written in place: never inference tensors.
    if decoder is None and compile:
        decoder = Decoder(model, compile=True)
    if decoder is not None and decoder.model is not model:
        raise ValueError("decoder was built for another model: build one Decoder per model")
    autocast = torch.is_autocast_enabled(device.type)
    plain = decoder is None and not autocast
    with torch.inference_mode() if plain else torch.no_grad(), contextlib.ExitStack() as stack:
        if decoder is not None and autocast:  # the step has its own weight copies: the eager prefill
            # casts each weight as it goes rather than cache a second copy of them all.
            stack.enter_context(torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                                               cache_enabled=False))
        if decoder is None:
            run = _generate
        else:  # the static, compilable step (decode.py)
            run = functools.partial(generate_static, decoder)
        out = run(model, prompts, device, max_new_tokens, temperature, top_p, top_k,
                  repetition_penalty, stop_ids, allowed_ids, generator, cache_dtype)
    return Rollout(*(x.clone() for x in out))



def _generate(model, prompts, device, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
              stop_ids, allowed_ids, generator, cache_dtype):
    """The decode loop of `generate`, arguments checked; returns (tokens, lengths, logprobs, finished)."""
    B, N = len(prompts), max_new_tokens
    ids, lens = left_padded(prompts, device)  # [B, P], [B]
    P = ids.shape[1]

    cache = KVCache.for_model(model, B, P + N, cache_dtype)
    # key_ok [B, P+N]: which cache slots hold a real token (prompt pads never do; generated slots
    # always do, and slots not yet written are cut off by slicing the cache to the current step).
    key_ok = torch.ones(B, P + N, dtype=torch.bool, device=device)
    key_ok[:, :P] = torch.arange(P, device=device) >= (P - lens)[:, None]
    weight, index = head_rows(model, allowed_ids)  # [A, H] rows of lm_head, index [A]: row -> vocab id
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))  # fp32 head, cast once (head_logits)
    A = index.numel()
    seen = None  # [B, A] bool: allowed tokens in the prompt or generated so far (repetition penalty)
    if repetition_penalty != 1.0:
        rows, allowed = find_rows(ids, index)  # [B, P] each
        seen = torch.zeros(B, A + 1, dtype=torch.bool, device=device)  # column A: a bin for the rest
        seen.scatter_(1, torch.where(allowed & key_ok[:, :P], rows, A), True)
        seen = seen[:, :A]
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=device)

    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, N, dtype=torch.float32, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B] emitted a stop id (the only early end)
    # Checking "all rows stopped" is a host sync; on a GPU do it every few steps so the CPU can
    # queue kernels ahead (a few wasted steps at the very end cost less than a sync per step).
    sync_every = 1 if device.type == "cpu" else 8

    logits = prefill(model, cache, ids, key_ok[:, :P], weight)  # [B, A] float32
    for t in range(N):
        processed = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, seen=seen)
        row = sample_token(processed, greedy=temperature == 0, generator=generator)  # [B] in [0, A)
        next_tok = index[row].masked_fill(done, 0)  # [B] vocab ids
        tokens[:, t] = next_tok
        logprobs[:, t] = token_logprobs(logits, row, temperature).masked_fill(done, 0.0)
        lengths += ~done
        if stop.numel():
            done |= torch.isin(next_tok, stop) & ~done
        if seen is not None:
            seen.scatter_(1, row[:, None], True)
        if t == N - 1 or ((t + 1) % sync_every == 0 and bool(done.all())):
            break
        # The token at cache slot P+t has position len_i + t: positions start at 0 after the pads.
        logits = decode_one_token(model, cache, next_tok, lens + t, P + t, key_ok, weight)

    T = int(lengths.max())
    return tokens[:, :T], lengths, logprobs[:, :T], done



def _check_args(model, prompts, vocab, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                stop_ids, allowed_ids, generator, device):
    if not hasattr(getattr(model, "model", None), "rotary_emb") or not hasattr(model, "lm_head"):
        raise TypeError(f"generate needs a Llama-family *ForCausalLM (model.model.rotary_emb, lm_head), "
                        f"got {type(model).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    max_pos = model.config.max_position_embeddings
    if longest + max_new_tokens > max_pos:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {max_pos} (max_position_embeddings); shorten the prompt or "
                         "max_new_tokens")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    # allowed_ids may hold 65,537 ids on the GPU: checked as one CPU tensor, never id by id.
    allowed = None if allowed_ids is None else torch.as_tensor(
        allowed_ids.cpu() if torch.is_tensor(allowed_ids) else list(allowed_ids), dtype=torch.long)
    for name, ids in (("stop_ids", torch.as_tensor(list(stop_ids), dtype=torch.long)), ("allowed_ids", allowed)):
        bad = [] if ids is None else ids[(ids < 0) | (ids >= vocab)].tolist()
        if bad:
            raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if allowed is not None:
        if allowed.numel() == 0:
            raise ValueError("allowed_ids is empty: no token could be generated")
        missing = [int(t) for t in stop_ids if not bool((allowed == int(t)).any())]
        if missing:
            raise ValueError(f"stop ids {missing} are not in allowed_ids, so no row could ever stop")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}")


# ----------------------------------------------------------------------------- input checks
# A user's mistake in a flag is one line naming the flag and the value, before anything loads.
# The spec checks (--model, --codec, devices) are shared with the trainer's config.check_config.

# A Hugging Face Hub id, 'org/name' or 'name': never a path with two '/' or one that starts '.'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class CLIParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `PROG: error: MESSAGE`, exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def model_problem(name: str) -> str | None:
    """Why --model `name` cannot name a model ('tiny', 'demo', a Hugging Face directory or a Hub
    id); None if it may (a Hub id is looked up only when loaded)."""
    if name in ("tiny", "demo"):
        return None
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "config.json")):
            return None
        return "a directory without config.json (not a Hugging Face model directory)"
    if os.path.exists(name):
        return "a file; expected a Hugging Face model directory or Hub id"
    if HUB_ID.fullmatch(name):
        return None
    return "no such directory (nor a Hugging Face Hub id such as HKUSTAudio/Llasa-1B)"


def codec_problem(spec: str) -> str | None:
    """Why --codec `spec` names no codec that codec.load_codec knows; None if it may (PATH, when
    given, must exist; a Hub id is looked up only when loaded)."""
    kind, _, path = spec.partition(":")
    if spec == "tone" or (kind in ("words", "xcodec2", "xcodec2-package") and not path):
        return None
    if kind not in ("words", "xcodec2", "xcodec2-package"):
        return "expected 'tone', 'words[:PATH]', 'xcodec2[:PATH]' or 'xcodec2-package[:PATH]'"
    if os.path.exists(path) or (kind != "words" and HUB_ID.fullmatch(path)):
        return None
    return f"no such file or directory: {path}"


def device_problem(name: str, check_present: bool = True) -> str | None:
    """Why `name` is not a device to run on: 'cpu', 'cuda' or 'cuda:N' (with `check_present`, a CUDA
    device this machine has); None if it is."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return "expected 'cpu', 'cuda' or 'cuda:N'"
    if not check_present or device.type == "cpu":
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "no CUDA device is visible on this machine"
    if (device.index or 0) >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def audio_problem(path: str) -> str | None:
    """Why `path` is not a sound file to read (missing, unreadable, empty); None if it is one."""
    import soundfile
    if not os.path.isfile(path):
        return "no such file"
    try:
        frames = soundfile.info(path).frames
    except Exception as e:  # noqa: BLE001 -- any reason it cannot be read, said in the line
        return f"cannot be read ({e})"
    return "empty (no audio frames)" if frames == 0 else None


def cli_problem(args) -> str | None:
    """The first of sample.py's arguments that cannot work, as one line naming the flag and value;
    None if all may. Nothing is loaded (the model's context is checked once it is)."""
    import soundfile
    if not args.text.strip():
        return f"--text {args.text!r}: nothing to say"
    folder = os.path.dirname(args.out) or "."
    if not os.path.isdir(folder):
        return f"--out {args.out}: no such directory {folder}"
    if os.path.splitext(args.out)[1][1:].upper() not in soundfile.available_formats():
        return f"--out {args.out}: expected a sound file name such as out.wav"
    if (args.prompt_wav is None) != (args.prompt_text is None):
        return "--prompt-wav and --prompt-text: voice cloning needs both"
    if args.prompt_wav is not None and (why := audio_problem(args.prompt_wav)):
        return f"--prompt-wav {args.prompt_wav}: {why}"
    if args.prompt_text is not None and not args.prompt_text.strip():
        return f"--prompt-text {args.prompt_text!r}: empty"
    numbers = (("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
               ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1 = off)"),
               ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = off)"),
               ("--repetition-penalty", args.repetition_penalty, args.repetition_penalty > 0,
                "> 0 (1 = off)"),
               ("--max-context", args.max_context, args.max_context >= 1, ">= 1"))
    if args.max_new_tokens is not None:
        ok = args.max_new_tokens >= 1
        numbers += (("--max-new-tokens", args.max_new_tokens, ok, ">= 1 (unset: the context left)"),)
    for flag, value, ok, what in numbers:
        if not math.isfinite(value):
            return f"{flag} {value}: must be a finite number"
        if not ok:
            return f"{flag} {value}: must be {what}"
    for flag, value, problem in (("--model", args.model, model_problem),
                                 ("--codec", args.codec, codec_problem),
                                 ("--device", args.device, device_problem)):
        if why := problem(value):
            return f"{flag} {value}: {why}"
    return None


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    import soundfile

    import codec
    import demo
    from models import load_model

    p = CLIParser(prog="sample.py",
                  description="LLASA text-to-speech: text -> speech tokens -> 16 kHz wav.")
    p.add_argument("--model", required=True,
                   help="Hugging Face directory or hub id of a LLASA model, 'tiny' (random, offline) or 'demo' "
                        "(the CPU demo's policy, built on first use)")
    p.add_argument("--text", required=True, help="text to speak")
    p.add_argument("--out", required=True, help="output .wav path (16 kHz mono)")
    p.add_argument("--prompt-wav", default=None,
                   help="voice cloning: a recording of the voice to speak in (any rate, resampled to 16 kHz)")
    p.add_argument("--prompt-text", default=None, help="voice cloning: what --prompt-wav says")
    # LLASA's model cards' settings as defaults: temperature 0.8, top-p 1, no repetition penalty,
    # max_length=2048 counting the prompt (the length LLASA was trained at).
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature, 0 = greedy (default: 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the k most likely tokens, 0 = off (default: 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="HF repetition penalty, 1 = off (default: 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most speech tokens to generate, 50 per second of audio "
                        "(default: --max-context minus the prompt's tokens)")
    p.add_argument("--max-context", type=int, default=2048,
                   help="prompt + response tokens the model was trained at; a --max-new-tokens "
                        "that can pass it is warned about (default: 2048, LLASA's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--codec", default="xcodec2",
                   help="'xcodec2[:PATH]' or 'tone' (test codec) (default: xcodec2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="model weights (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with the compiled static-shape step (CUDA graphs on a GPU; the first call "
                        "compiles, which takes a while) (default: on for cuda, off for cpu)")
    args = p.parse_args(argv)
    if why := cli_problem(args):  # before anything loads
        p.error(why)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer = load_model(demo.resolve_model(args.model), device, dtype)
    vocab = data.speech_vocab(tokenizer)
    speech_codec = codec.load_codec(args.codec, device)
    prompt_codes = None
    if args.prompt_wav:  # LLASA's clone prompt: the prompt's speech tokens open the assistant turn
        prompt_codes = speech_codec.encode([data.read_audio(args.prompt_wav)])[0]
    ids = data.prompt_ids(tokenizer, args.text, args.prompt_text, prompt_codes)
    positions = model.config.max_position_embeddings  # known once the model is loaded
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # the rest of the context, as the cards' max_length=2048
        context = min(args.max_context, positions)
        max_new_tokens = context - len(ids)
        if max_new_tokens < 1:
            p.error(f"--max-context {args.max_context}: the prompt alone is {len(ids)} tokens")
    elif max_new_tokens > positions - len(ids):
        p.error(f"--max-new-tokens {max_new_tokens}: the prompt takes {len(ids)} of the "
                f"model's {positions} positions, leaving {positions - len(ids)}")
    elif len(ids) + max_new_tokens > args.max_context:
        print(f"sample.py: warning: the prompt ({len(ids)} tokens) + --max-new-tokens "
              f"{max_new_tokens} can pass --max-context {args.max_context}, the length the model "
              "was trained at", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                   stop_ids=(vocab.end_id,), allowed_ids=vocab.allowed_ids(), generator=generator,
                   compile=device.type == "cuda" if args.compile is None else args.compile)
    n = int(out.lengths[0]) - int(out.finished[0])  # speech tokens, without the stop token
    codes = vocab.to_codes(out.tokens[0, :n].tolist())
    wav = speech_codec.decode([codes])[0]  # the generated speech only, after the prompt's
    soundfile.write(args.out, wav, codec.SAMPLE_RATE)
    status = "finished" if out.finished[0] else f"not finished (hit {max_new_tokens} new tokens)"
    cloned = f", in the voice of {args.prompt_wav}" if args.prompt_wav else ""
    print(f"wrote {args.out}: {len(wav) / codec.SAMPLE_RATE:.2f} s, {n} speech tokens, {status}{cloned}")
    return out


if __name__ == "__main__":
    main()
