"""The rollout stage of GRPO: samples of the current policy for a list of texts, their audio and
their scores, with every rank in step.

`Sampler` owns what generation needs besides the weights (the speech-only ids, the prompt cache,
the compiled decode step, the codec, the reward scorer). The trainer calls `rollout_and_score` for
a step's batch and `sample_and_score` for validation and the prosody reference. Under --fsdp every
rollout is a collective (the weights are gathered), so every rank runs the same rollouts.
"""

import contextlib
import functools
import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import data
import lora
from codec import SAMPLES_PER_CODE, PromptCodes
from decode import Decoder, compile_failed
from measures import MEASURES
from parallel import Dist, gathered
from sample import Rollout, cat_rollouts, generate

# The rollout stage's phases, timed in seconds per step (metrics.jsonl's time_rollout, time_codec,
# time_reward): generation, audio decoding, and the wait for rewards not hidden behind generation.
PHASES = ("rollout", "codec", "reward")


class Sampler:
    """Rollouts of `policy` (llama.LogProbs, sharded or not; `.lm` the Hugging Face model), decoded
    to audio by `codec` and scored by `scorer` (.score(audios, texts, languages) -> list[Score]).
    autocast: a function returning the trainer's autocast context. examples: the run's training and
    validation examples, whose longest prompt sizes the compiled step's KV cache (once per run)."""

    def __init__(
        self,
        cfg,
        d: Dist,
        device: torch.device,
        policy,
        tokenizer,
        codec,
        scorer,
        autocast,
        examples: list | None = None,
    ):
        self.cfg = cfg
        self.d = d
        self.device = device
        self.policy = policy
        self.tokenizer = tokenizer
        self.codec = codec
        self.scorer = scorer
        self.autocast = autocast
        self.speech = data.speech_vocab(tokenizer)
        allowed_ids = self.speech.allowed_ids()  # speech tokens + stop
        self.allowed_ids = torch.tensor(allowed_ids, device=device)
        self._prompts = {}  # prompt ids (by text, prompt_wav, prompt_text)
        self._audio = {}  # prompt audio (by path)
        self._codes = PromptCodes(codec)  # prompt codes (by content)
        # The static, compiled decode step: built once, reused by every rollout of the run, its KV
        # cache sized once for the longest prompt of `examples` (every text or data.Example the
        # run will roll out: training and validation) + --max-new-tokens; without them, 256
        # prompt slots. A longer prompt later grows the cache (a new cache and graphs, said on
        # stderr).
        compiled = cfg.compile
        if compiled is None:  # the default: on CUDA without --fsdp
            compiled = device.type == "cuda" and not cfg.fsdp
        lengths = self.prompt_lengths(examples or [])
        self.decoder = None
        if compiled:
            longest = max(lengths + [256])  # >= 256: the spans README names
            max_len = cfg.max_new_tokens + longest
            self.decoder = Decoder(policy.lm, compile=True, max_len=max_len)
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

    # -- prompts: text, or LLASA's clone prompt (prompt text + speech tokens of the prompt audio) --
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

        @functools.cache
        def codes(path: str) -> list[int]:
            """Stand-in codes: as many as the codec can give for the recording at `path`."""
            info = sf.info(path)
            samples = round(info.frames * data.SAMPLE_RATE / info.samplerate)  # at 16 kHz
            return [0] * (samples // SAMPLES_PER_CODE + 1)

        distinct = {}
        for ex in map(_example, examples):
            distinct[(ex.text, ex.prompt_wav, ex.prompt_text)] = ex
        lengths = []
        for ex in distinct.values():
            prompt_codes = None
            if ex.prompt_wav:
                prompt_codes = codes(ex.prompt_wav)
            ids = data.prompt_ids(self.tokenizer, ex.text, ex.prompt_text, prompt_codes)
            lengths.append(len(ids))
        return lengths

    def say_past_context(self, lengths: list[int]):
        """Say once, on stderr, how many of the run's prompts (`lengths`, prompt_lengths) a
        response of --max-new-tokens can take past --max-context, the length the model was trained
        at (LLASA: 2,048 tokens in all): speech that runs that long is past what it learned."""
        cfg = self.cfg
        past = [n for n in lengths if n + cfg.max_new_tokens > cfg.max_context]
        if cfg.max_context and past:
            print(
                f"rollout: {len(past)} of {len(lengths)} prompts (training and validation) + "
                f"--max-new-tokens {cfg.max_new_tokens} can pass --max-context {cfg.max_context}"
                f", the length the model was trained at (longest prompt: {max(past)} tokens)",
                file=sys.stderr,
                flush=True,
            )

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
            seconds = len(audio) / data.SAMPLE_RATE
            raise ValueError(f"prompt audio {path}: the codec gave no codes ({seconds:.2f} s)")
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
        --rollout-chunks chunks: each chunk's audio goes to the scorer (in a thread) as soon as it
        is decoded, so scoring of chunk k runs while chunk k+1 is generated. overlap=False waits
        for each chunk's scores (the same samples and scores: `generator` is used only here, in
        order). Returns (rollout, audios, scores, seconds: {phase: seconds} over PHASES)."""
        n = len(items)
        chunks = self.cfg.rollout_chunks
        bounds = sorted({n * i // chunks for i in range(chunks + 1)})  # the chunks' edges
        rolls = []
        audios = []
        pending = []  # each chunk's scoring job
        seconds = dict.fromkeys(PHASES, 0.0)
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            for start, end in itertools.pairwise(bounds):
                chunk = items[start:end]
                t0 = time.time()
                rolls.append(self.rollout(chunk, generator))
                t1 = time.time()
                audios += self.decode_audio(rolls[-1], chunk)
                seconds["rollout"] += t1 - t0
                seconds["codec"] += time.time() - t1
                pending.append(pool.submit(self.score, audios[start:end], chunk))
                if not overlap:
                    t0 = time.time()
                    pending[-1].result()
                    seconds["reward"] += time.time() - t0
            t0 = time.time()
            scores = [s for job in pending for s in job.result()]
            seconds["reward"] += time.time() - t0
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
        """`rollout` without the padding: one sample per text, the compiled step's fallback here."""
        prompts = [self.prompt(t) for t in texts]  # before the fallback's try: not a compile error
        self.policy.eval()
        cache_dtype = None
        if self.device.type == "cuda":
            cache_dtype = torch.bfloat16  # the KV cache in bf16 under autocast

        def run(decoder):
            """generate() with `decoder` (None: the eager loop)."""
            # LoRA: the eager loop on merged weights (one matmul per map); the compiled step
            # copies merged weights itself (decode.Decoder.layer_weights), its eager prefill runs
            # the adapted maps unmerged (the same function up to rounding). No-ops without LoRA.
            merged = contextlib.nullcontext()
            if decoder is None:
                merged = lora.merged(self.policy.lm)
            with merged:
                return generate(
                    self.policy.lm,
                    prompts,
                    max_new_tokens=self.cfg.max_new_tokens,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    top_k=self.cfg.top_k,
                    repetition_penalty=self.cfg.repetition_penalty,
                    stop_ids=(self.speech.end_id,),
                    allowed_ids=self.allowed_ids,
                    generator=generator,
                    decoder=decoder,
                    cache_dtype=cache_dtype,
                )

        # Whole weights (FSDP gathers them), freed after.
        with torch.no_grad(), self.autocast(), gathered(self.policy):
            if self.decoder is None or self.decoder_works:
                return run(self.decoder)
            rng = generator.get_state()  # the eager retry draws what the failed attempt drew
            try:
                out = run(self.decoder)
            except Exception as e:
                if not compile_failed(e):  # OOM, data, CUDA: the run's errors, not the compiler's
                    raise
                print(
                    f"[rank {self.d.rank}] --compile: the compiled decode step failed on first use "
                    f"({type(e).__name__}: {str(e)[:300]}); going on with the eager loop",
                    file=sys.stderr,
                )
                self.decoder = None
                generator.set_state(rng)
                return run(None)
            self.decoder_works = True
            return out

    def decode_audio(self, roll, items=None) -> list[np.ndarray]:
        """16 kHz audio of each row's speech tokens (the stop token left out). After a voice
        prompt, the generated part only: decoded alone (--prompt-decode alone), or after the
        prompt's codes as left context and cut at the seam (context: the codec's attention and
        convolutions see the voice, at the price of decoding the prompt again with every clip)."""
        lengths = roll.lengths.tolist()
        finished = roll.finished.tolist()
        codes = []
        for row, (length, fin) in enumerate(zip(lengths, finished)):
            speech = roll.tokens[row, : length - int(fin)]  # the stop token left out
            codes.append(self.speech.to_codes(speech.tolist()))
        if items is None or self.cfg.prompt_decode == "alone":
            return self.codec.decode(codes)
        left = []  # each clip's left context: its voice prompt's codes ([] without one)
        for item in items:
            wav = _example(item).prompt_wav
            left.append(self.prompt_codes(wav) if wav else [])
        audios = self.codec.decode([p + c for p, c in zip(left, codes)])
        return [a[len(p) * SAMPLES_PER_CODE :] for a, p in zip(audios, left)]

    def reference(self, examples: list, names: tuple, stage: str) -> dict:
        """The current policy's medians of the Score fields `names`, on G samples of each example,
        at most one training batch of clips (medians: a few near-empty clips have huge rates)."""
        cfg = self.cfg
        batch_clips = cfg.prompts_per_step * cfg.group_size
        repeated = [ex for ex in examples for _ in range(cfg.group_size)]
        repeated = repeated[:batch_clips]
        scores, *_ = self.sample_and_score(repeated, stage)
        reference = {}
        for name in names:
            values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
            reference[name] = float(np.median(values)) if values else 0.0
        for name in names:
            measure = MEASURES[name]
            if measure.needs_speech and not reference[name]:
                raise ValueError(
                    f"--guard {name}: the initial policy's median is 0, no reference (no speech "
                    f"or no voiced frames in its samples: {reference})"
                )
            if not any(getattr(s, name) is not None for s in scores):
                raise ValueError(
                    f"--guard {name}: no sample of the initial policy has one ({measure.source})"
                )
        return reference

    @torch.no_grad()
    def sample_and_score(self, examples: list, stage: str) -> tuple[list, list, list, dict]:
        """One sample per example (this rank's share), with a fixed seed, in rollout-sized chunks.

        Returns every rank's scores, rewards (truncated ones 0) and finished flags, in rank order,
        and this rank's first --n-samples clips (audios, texts, scores, finished) to save."""
        cfg = self.cfg
        d = self.d
        mine = examples[d.rank :: d.world]
        scores = []
        rewards = []
        finished = []
        audios = []
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 12345 + d.rank)
        # Every rank runs as many rollouts as the largest share needs, a short or empty share too
        # (with a stand-in text, its sample dropped): under FSDP each rollout is a collective, and
        # a rank that stopped early would leave the others waiting in it.
        share = -(-len(examples) // d.world)
        with d.together(stage):
            for i in range(0, share, self.batch):
                part = mine[i : i + self.batch]
                roll = self.rollout(part or examples[:1], gen)
                if not part:
                    continue
                part_audios = self.decode_audio(roll, part)
                part_scores = self.score(part_audios, part)
                if len(part_scores) != len(part):
                    raise RuntimeError(f"{stage}: {len(part_scores)} scores for {len(part)} texts")
                part_finished = roll.finished.tolist()
                scores += part_scores
                finished += part_finished
                rewards += [s.reward if f else 0.0 for s, f in zip(part_scores, part_finished)]
                audios += part_audios[: cfg.n_samples - len(audios)]
        n = len(audios)
        shown = {
            "audios": audios,
            "texts": [ex.text for ex in mine[:n]],
            "scores": scores[:n],
            "finished": finished[:n],
        }
        every_scores = []
        every_rewards = []
        every_finished = []
        for rank_scores, rank_rewards, rank_finished in d.gather((scores, rewards, finished)):
            every_scores += rank_scores
            every_rewards += rank_rewards
            every_finished += rank_finished
        return every_scores, every_rewards, every_finished, shown


def _example(item) -> data.Example:
    """A data.Example, or a bare text as one (no prompt, the run's language)."""
    if isinstance(item, data.Example):
        return item
    return data.Example(text=item, id=item)
