"""The rollout stage of GRPO: samples of the current policy for a list of texts, their audio and
their scores, with every rank in step.

`Sampler` owns what generation needs besides the weights (the speech-only ids, the prompt cache,
the compiled decode step, the codec, the reward scorer). The trainer calls `rollout_and_score` for
a step's batch and `sample_and_score` for validation and the prosody reference. Under --fsdp every
rollout is a collective (the weights are gathered), so every rank runs the same rollouts.
"""
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import data
from decode import Decoder
from parallel import Dist, gathered
from sample import Rollout, cat_rollouts, generate


class Sampler:
    """Rollouts of `policy` (llama.LogProbs, sharded or not; `.lm` the Hugging Face model), decoded
    to audio by `codec` and scored by `scorer` (.score(audios, texts, languages) -> list[Score]).
    autocast: a function returning the trainer's autocast context."""

    def __init__(self, cfg, d: Dist, device: torch.device, policy, tokenizer, codec, scorer, autocast):
        self.cfg, self.d, self.device, self.policy = cfg, d, device, policy
        self.tokenizer, self.codec, self.scorer, self.autocast = tokenizer, codec, scorer, autocast
        self.speech = data.speech_vocab(tokenizer)
        self.allowed_ids = torch.tensor(self.speech.allowed_ids(), device=device)  # speech tokens + stop
        self._prompts = {}
        # The static, compiled decode step: built once, reused by every rollout of the run.
        compiled = cfg.compile if cfg.compile is not None else device.type == "cuda" and not cfg.fsdp
        self.decoder = Decoder(policy.lm, compile=True, max_len=cfg.max_new_tokens + 256) if compiled else None
        self.decoder_works = False  # until its first rollout succeeds
        # Rows per generate call: a training chunk (this rank's samples / --rollout-chunks, rounded
        # up). With the compiled step every call is padded to it: one shape, one set of buffers.
        per_rank = cfg.prompts_per_step * cfg.group_size // d.world
        self.batch = -(-per_rank // cfg.rollout_chunks)

    def close(self):
        """Free the compiled step's buffers (KV cache, weight copies) at the end of a run."""
        if self.decoder is not None:
            self.decoder.release()

    def prompt(self, text: str) -> list[int]:
        if text not in self._prompts:
            self._prompts[text] = data.prompt_ids(self.tokenizer, text)
        return self._prompts[text]

    def rollout_and_score(self, texts: list[str], langs: list, generator, overlap: bool = True):
        """Rollouts, audio and scores for `texts`, generated in --rollout-chunks chunks: each chunk's
        audio goes to the scorer (in a thread) as soon as it is decoded, so scoring of chunk k runs
        while chunk k+1 is generated. overlap=False waits for each chunk's scores (the same samples
        and scores: `generator` is used only here, in order). Returns (rollout, audios, scores,
        seconds [rollout, codec, the reward wait that was not hidden])."""
        n, k = len(texts), self.cfg.rollout_chunks
        bounds = sorted({n * i // k for i in range(k + 1)})
        rolls, audios, pending, seconds = [], [], [], [0.0, 0.0, 0.0]
        with ThreadPoolExecutor(max_workers=1) as pool:
            for a, b in zip(bounds, bounds[1:]):
                t0 = time.time()
                rolls.append(self.rollout(texts[a:b], generator))
                t1 = time.time()
                audios += self.decode_audio(rolls[-1])
                seconds[0], seconds[1] = seconds[0] + t1 - t0, seconds[1] + time.time() - t1
                pending.append(pool.submit(self.scorer.score, audios[a:b], texts[a:b], langs[a:b]))
                if not overlap:
                    t0 = time.time()
                    pending[-1].result()
                    seconds[2] += time.time() - t0
            t0 = time.time()
            scores = [s for job in pending for s in job.result()]
            seconds[2] += time.time() - t0
        return cat_rollouts(rolls), audios, scores, seconds

    def rollout(self, texts: list[str], generator) -> Rollout:
        """One sample per text (at most `self.batch` texts) from the current policy (speech tokens
        + stop only). With the compiled step the batch is padded to `self.batch` rows with copies of
        the last text, whose samples are dropped: every call of a run has the decoder's one shape
        (no graph and no KV cache per odd batch size). If the compiled step fails on its first use
        (a torch.compile or CUDA-graph problem on this machine), the run says so and goes on with
        the eager loop rather than losing the job."""
        if not 0 < len(texts) <= self.batch:
            raise ValueError(f"rollout of {len(texts)} texts: expected 1 to {self.batch}")
        n = len(texts)
        if self.decoder is not None:
            texts = texts + [texts[-1]] * (self.batch - n)
        return self._generate(texts, generator).head(n)

    def _generate(self, texts: list[str], generator) -> Rollout:
        self.policy.eval()
        cuda = self.device.type == "cuda"
        with torch.no_grad(), self.autocast(), gathered(self.policy):  # whole weights, freed after (FSDP)
            def run(decoder):
                return generate(self.policy.lm, [self.prompt(t) for t in texts],
                                max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                                repetition_penalty=self.cfg.repetition_penalty,
                                stop_ids=(self.speech.end_id,),
                                allowed_ids=self.allowed_ids, generator=generator, decoder=decoder,
                                cache_dtype=torch.bfloat16 if cuda else None)  # bf16 cache under autocast
            if self.decoder is None or self.decoder_works:
                return run(self.decoder)
            rng = generator.get_state()  # the eager retry draws what the failed attempt drew
            try:
                out = run(self.decoder)
            except Exception as e:  # noqa: BLE001 -- reported, and the eager loop is the reference
                print(f"[rank {self.d.rank}] --compile: the compiled decode step failed on first use "
                      f"({type(e).__name__}: {str(e)[:300]}); going on with the eager loop", file=sys.stderr)
                self.decoder = None
                generator.set_state(rng)
                return run(None)
            self.decoder_works = True
            return out

    def decode_audio(self, roll) -> list[np.ndarray]:
        codes = [self.speech.to_codes(roll.tokens[i, :n - int(fin)].tolist())
                 for i, (n, fin) in enumerate(zip(roll.lengths.tolist(), roll.finished.tolist()))]
        return self.codec.decode(codes)

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
                roll = self.rollout([ex.text for ex in part] or [examples[0].text], gen)
                if not part:
                    continue
                roll = roll.head(len(part))
                part_audios = self.decode_audio(roll)
                part_scores = self.scorer.score(part_audios, [ex.text for ex in part],
                                                [ex.language or cfg.language or None for ex in part])
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
