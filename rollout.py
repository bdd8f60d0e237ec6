"""The rollout stage of GRPO: samples of the current policy for a list of texts, their audio and
their scores, with every rank in step.

`Sampler` owns what generation needs besides the weights (the speech-only ids, the prompt cache,
the compiled decode step, the codec, the reward scorer). The trainer calls `rollout_and_score` for
a step's batch and `sample_and_score` for validation and the prosody reference. Under --fsdp every
rollout is a collective (the weights are gathered), so every rank runs the same rollouts.
"""
import contextlib
import functools
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import data
import lora
from codec import SAMPLES_PER_CODE, PromptCodes
from decode import Decoder, compile_failed
from parallel import Dist, gathered
from sample import Rollout, cat_rollouts, generate


class Sampler:
    """Rollouts of `policy` (llama.LogProbs, sharded or not; `.lm` the Hugging Face model), decoded
    to audio by `codec` and scored by `scorer` (.score(audios, texts, languages) -> list[Score]).
    autocast: a function returning the trainer's autocast context. examples: the run's training and
    validation examples, whose longest prompt sizes the compiled step's KV cache (once per run)."""

    def __init__(self, cfg, d: Dist, device: torch.device, policy, tokenizer, codec, scorer, autocast,
                 examples: list | None = None):
        self.cfg, self.d, self.device, self.policy = cfg, d, device, policy
        self.tokenizer, self.codec, self.scorer, self.autocast = tokenizer, codec, scorer, autocast
        self.speech = data.speech_vocab(tokenizer)
        self.allowed_ids = torch.tensor(self.speech.allowed_ids(), device=device)  # speech tokens + stop
        self._prompts, self._audio = {}, {}  # prompt ids, prompt audio (by path)
        self._codes = PromptCodes(codec)  # prompt codes (by content)
        # The static, compiled decode step: built once, reused by every rollout of the run, its KV
        # cache sized once for the longest prompt of `examples` (every text or data.Example the run
        # will roll out: training and validation) + --max-new-tokens; without them, 256 prompt slots.
        # A longer prompt later grows the cache (a new cache and graphs, said on stderr).
        compiled = cfg.compile if cfg.compile is not None else device.type == "cuda" and not cfg.fsdp
        lengths = self.prompt_lengths(examples or [])
        longest = max(lengths + [256]) if compiled else 256  # >= 256: the spans README names
        self.decoder = Decoder(policy.lm, compile=True, max_len=cfg.max_new_tokens + longest) if compiled else None
        self.decoder_works = False  # until its first rollout succeeds
        # Rows per generate call: a training chunk (this rank's samples / --rollout-chunks, rounded
        # up). With the compiled step every call is padded to it: one shape, one set of buffers.
        per_rank = cfg.prompts_per_step * cfg.group_size // d.world
        self.batch = -(-per_rank // cfg.rollout_chunks)
        if d.rank == 0:
            self.say_past_context(lengths)

    def close(self):
        """Free the compiled step's buffers (KV cache, weight copies) at the end of a run."""
        if self.decoder is not None:
            self.decoder.release()

    # -- prompts: text, or LLASA's clone prompt (prompt text + speech tokens of the prompt audio) ---
    def prompt(self, item) -> list[int]:
        """The prompt ids of a text or a data.Example (with prompt_wav: LLASA's clone prompt)."""
        ex = _example(item)
        key = (ex.text, ex.prompt_wav, ex.prompt_text)
        if key not in self._prompts:
            codes = self.prompt_codes(ex.prompt_wav) if ex.prompt_wav else None
            self._prompts[key] = data.prompt_ids(self.tokenizer, ex.text, ex.prompt_text, codes)
        return self._prompts[key]

    def prompt_lengths(self, examples: list) -> list[int]:
        """An upper bound on the prompt ids of each distinct item of `examples`, without encoding a
        voice prompt: its codes are counted from its file's length (every codec here gives at most
        one code per 320 samples at 16 kHz, plus one), so a run with thousands of voices starts at
        once."""
        import soundfile as sf

        @functools.lru_cache(maxsize=None)
        def codes(path: str) -> list[int]:
            info = sf.info(path)
            return [0] * (round(info.frames * data.SAMPLE_RATE / info.samplerate) // SAMPLES_PER_CODE + 1)
        keys = {(ex.text, ex.prompt_wav, ex.prompt_text): ex for ex in map(_example, examples)}
        return [len(data.prompt_ids(self.tokenizer, ex.text, ex.prompt_text,
                                    codes(ex.prompt_wav) if ex.prompt_wav else None))
                for ex in keys.values()]

    def say_past_context(self, lengths: list[int]):
        """Say once, on stderr, how many of the run's prompts (`lengths`, prompt_lengths) a response
        of --max-new-tokens can take past --max-context, the length the model was trained at (LLASA:
        2,048 tokens in all): speech that runs that long is past what it learned."""
        cfg = self.cfg
        past = [n for n in lengths if n + cfg.max_new_tokens > cfg.max_context]
        if cfg.max_context and past:
            print(f"rollout: {len(past)} of {len(lengths)} prompts (training and validation) + "
                  f"--max-new-tokens {cfg.max_new_tokens} can pass --max-context {cfg.max_context}"
                  f", the length the model was trained at (longest prompt: {max(past)} tokens)",
                  file=sys.stderr, flush=True)

    def prompt_audio(self, path: str) -> np.ndarray:
        """A prompt recording as float32 16 kHz, read once per run."""
        if path not in self._audio:
            self._audio[path] = data.read_audio(path)
        return self._audio[path]

    def prompt_codes(self, path: str) -> list[int]:
        """The codec's codes of a prompt recording: encoded once per distinct content
        (codec.PromptCodes: two files with the same audio share one encode), never once per step."""
        audio = self.prompt_audio(path)
        codes = self._codes.encode([audio])[0]
        if not codes:
            raise ValueError(f"prompt audio {path}: the codec gave no codes ({len(audio) / data.SAMPLE_RATE:.2f} s)")
        return codes

    def score(self, audios: list, items: list) -> list:
        """The scorer's Scores of `audios`, each against its item's text and language, and where
        the item has a voice prompt, against the prompt's recording (speaker similarity)."""
        exs = [_example(x) for x in items]
        texts = [ex.text for ex in exs]
        langs = [ex.language or self.cfg.language or None for ex in exs]
        if not any(ex.prompt_wav for ex in exs):
            return self.scorer.score(audios, texts, langs)
        prompts = [self.prompt_audio(ex.prompt_wav) if ex.prompt_wav else None for ex in exs]
        return self.scorer.score(audios, texts, langs, prompts=prompts)

    def rollout_and_score(self, items: list, generator, overlap: bool = True):
        """Rollouts, audio and scores for `items` (texts or data.Examples), generated in
        --rollout-chunks chunks: each chunk's audio goes to the scorer (in a thread) as soon as it is
        decoded, so scoring of chunk k runs while chunk k+1 is generated. overlap=False waits for
        each chunk's scores (the same samples and scores: `generator` is used only here, in order).
        Returns (rollout, audios, scores, seconds [rollout, codec, the reward wait not hidden])."""
        n, k = len(items), self.cfg.rollout_chunks
        bounds = sorted({n * i // k for i in range(k + 1)})
        rolls, audios, pending, seconds = [], [], [], [0.0, 0.0, 0.0]
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            for a, b in zip(bounds, bounds[1:]):
                t0 = time.time()
                rolls.append(self.rollout(items[a:b], generator))
                t1 = time.time()
                audios += self.decode_audio(rolls[-1], items[a:b])
                seconds[0], seconds[1] = seconds[0] + t1 - t0, seconds[1] + time.time() - t1
                pending.append(pool.submit(self.score, audios[a:b], items[a:b]))
                if not overlap:
                    t0 = time.time()
                    pending[-1].result()
                    seconds[2] += time.time() - t0
            t0 = time.time()
            scores = [s for job in pending for s in job.result()]
            seconds[2] += time.time() - t0
        finally:
            # Not `with pool`, which would wait for the chunk being scored (up to
            # --worker-timeout) before raising a rollout's error: it leaves at once.
            pool.shutdown(wait=False, cancel_futures=True)
        return cat_rollouts(rolls), audios, scores, seconds

    def rollout(self, texts: list, generator) -> Rollout:
        """One sample per text or data.Example (at most `self.batch`) from the current policy
        (speech tokens + stop only; after a voice prompt, only what the policy generates). With the
        compiled step the batch is padded to `self.batch` rows with copies of the last item, whose
        samples are dropped: every call of a run has the decoder's one shape
        (no graph and no KV cache per odd batch size). If torch.compile fails on the step's first
        use (decode.compile_failed: dynamo's or inductor's errors, not an out-of-memory error), the
        run says so and goes on with the eager loop rather than losing the job."""
        if not 0 < len(texts) <= self.batch:
            raise ValueError(f"rollout of {len(texts)} texts: expected 1 to {self.batch}")
        n = len(texts)
        if self.decoder is not None:
            texts = texts + [texts[-1]] * (self.batch - n)
        return self._generate(texts, generator).head(n)

    def _generate(self, texts: list[str], generator) -> Rollout:
        prompts = [self.prompt(t) for t in texts]  # before the fallback's try: not a compile error
        self.policy.eval()
        cuda = self.device.type == "cuda"
        with torch.no_grad(), self.autocast(), gathered(self.policy):  # whole weights, freed after (FSDP)
            def run(decoder):
                # LoRA: the eager loop on merged weights (one matmul per map); the compiled step
                # copies merged weights itself (decode.Decoder.layer_weights), its eager prefill runs
                # the adapted maps unmerged (the same function up to rounding). No-ops without LoRA.
                with lora.merged(self.policy.lm) if decoder is None else contextlib.nullcontext():
                    return generate(self.policy.lm, prompts,
                                    max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                    top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                                    repetition_penalty=self.cfg.repetition_penalty, stop_ids=(self.speech.end_id,),
                                    allowed_ids=self.allowed_ids, generator=generator, decoder=decoder,
                                    cache_dtype=torch.bfloat16 if cuda else None)  # bf16 cache under autocast
            if self.decoder is None or self.decoder_works:
                return run(self.decoder)
            rng = generator.get_state()  # the eager retry draws what the failed attempt drew
            try:
                out = run(self.decoder)
            except Exception as e:
                if not compile_failed(e):  # OOM, data, CUDA: the run's errors, not the compiler's
                    raise
                print(f"[rank {self.d.rank}] --compile: the compiled decode step failed on first use "
                      f"({type(e).__name__}: {str(e)[:300]}); going on with the eager loop", file=sys.stderr)
                self.decoder = None
                generator.set_state(rng)
                return run(None)
            self.decoder_works = True
            return out

    def decode_audio(self, roll, items=None) -> list[np.ndarray]:
        """16 kHz audio of each row's speech tokens (the stop token left out). After a voice prompt,
        the generated part only: decoded alone (--prompt-decode alone), or after the prompt's codes
        as left context and cut at the seam (context: the codec's attention and convolutions see
        the voice, at the price of decoding the prompt again with every clip)."""
        codes = [self.speech.to_codes(roll.tokens[i, :n - int(fin)].tolist())
                 for i, (n, fin) in enumerate(zip(roll.lengths.tolist(), roll.finished.tolist()))]
        if items is None or self.cfg.prompt_decode == "alone":
            return self.codec.decode(codes)
        left = [self.prompt_codes(_example(x).prompt_wav) if _example(x).prompt_wav else [] for x in items]
        audios = self.codec.decode([p + c for p, c in zip(left, codes)])
        return [a[len(p) * SAMPLES_PER_CODE:] for a, p in zip(audios, left)]

    def reference(self, examples: list, names: tuple, stage: str) -> dict:
        """The current policy's medians of the Score fields `names`, on G samples of each example,
        at most one training batch of clips (medians: a few near-empty clips have huge rates)."""
        cfg = self.cfg
        repeated = [ex for ex in examples for _ in range(cfg.group_size)][:cfg.prompts_per_step * cfg.group_size]
        scores, *_ = self.sample_and_score(repeated, stage)
        reference = {}
        for name in names:
            values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
            reference[name] = float(np.median(values)) if values else 0.0
        if not all(reference[n] for n in names if n != "sim"):
            raise ValueError(f"--prosody-guard: the initial policy's {reference} cannot be a reference "
                             "(no speech or no voiced frames in its samples)")
        if "sim" in names and not any(s.sim is not None for s in scores):
            raise ValueError("--sim-guard: no sample of the initial policy has a speaker similarity (the data "
                             "needs prompt_wav/prompt_text rows, and the worker a --speaker-model)")
        return reference

    @torch.no_grad()
    def sample_and_score(self, examples: list, stage: str) -> tuple[list, list, list, dict]:
        """One sample per example (this rank's share), with a fixed seed, in rollout-sized chunks:
        every rank's (scores, rewards with truncated ones 0, finished), in rank order, and this rank's
        first --n-samples clips (audios, texts, scores, finished) for outputs.save_samples."""
        cfg, d = self.cfg, self.d
        mine = examples[d.rank::d.world]
        scores, rewards, finished, audios = [], [], [], []
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 12345 + d.rank)
        # Every rank runs as many rollouts as the largest share needs, a short or empty share too
        # (with a stand-in text, its sample dropped): under FSDP each rollout is a collective, and a
        # rank that stopped early would leave the others waiting in it.
        share = -(-len(examples) // d.world)
        with d.together(stage):
            for i in range(0, share, self.batch):
                part = mine[i:i + self.batch]
                roll = self.rollout(part or examples[:1], gen)
                if not part:
                    continue
                part_audios = self.decode_audio(roll, part)
                part_scores = self.score(part_audios, part)
                if len(part_scores) != len(part):
                    raise RuntimeError(f"{stage}: {len(part_scores)} scores for {len(part)} texts")
                scores += part_scores
                finished += roll.finished.tolist()
                rewards += [s.reward if f else 0.0 for s, f in zip(part_scores, roll.finished.tolist())]
                audios += part_audios[:cfg.n_samples - len(audios)]
        n = len(audios)
        shown = {"audios": audios, "texts": [ex.text for ex in mine[:n]], "scores": scores[:n],
                 "finished": finished[:n]}
        parts = d.gather((scores, rewards, finished))
        return (*(sum((p[k] for p in parts), []) for k in range(3)), shown)


def _example(item) -> data.Example:
    """A data.Example, or a bare text as one (no prompt, the run's language)."""
    return item if isinstance(item, data.Example) else data.Example(text=item, id=item)
