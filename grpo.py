"""GRPO for LLASA text-to-speech, rewarded by Whisper. Run with

    torchrun --nproc_per_node=2 grpo.py --preset llasa-1b --whisper-device cuda:2
    python grpo.py --preset tiny                    # offline smoke run on a CPU

One training step (`Trainer.train_step`): prompts -> G rollouts each (sample.generate) -> audio
(codec) -> rewards (Whisper worker process) -> group-normalized advantages -> clipped policy loss
with KL to a frozen reference -> gradients summed over ranks -> AdamW step. Each rank owns whole
prompt groups; the gradient is that of the global token-mean loss, so 2 ranks step exactly like 1.

To read the algorithm: loss.py (advantages and the loss) -> update.py (the policy update, the
paper's inner loop) -> grpo.py (the step, the run loop, main). Beside them: config.py holds the
flags, rollout.py the rollout stage (generation, codec, scorer), batch.py a step's scored rounds
(and --dynamic-sampling's refill), policy.py the model trained (full fine-tuning or LoRA, lora.py)
and its reference, llama.py the log-prob formula, parallel.py the collectives, outputs.py what a
run writes.
"""

import dataclasses
import os
import sys
import time

import torch

import batch
import data
import demo
import outputs
import parallel
import report
from codec import load_codec
from config import Config, parse_config

# Re-exported: tests and DESIGN.md call grpo.update_policy, grpo.TrainBatch, grpo.policy_loss, ...
from loss import group_advantages, policy_loss, tis_weights  # noqa: F401 (re-exported)
from measures import clip_guard_factor, parse_guards
from metrics import clip_means, step_metrics, table_metrics
from models import load_model
from parallel import Dist, setup_distributed
from policy import build_policy, checkpoint_state
from rollout import Sampler
from update import TrainBatch, update_policy

# ----------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Holds what a step needs: models, optimizer, codec, reward scorer, RNG, distributed info.

    scorer: anything with .score(audios, texts, languages) -> list[reward.Score] (the Whisper
    worker's client in a run, a fake in tests). resume_from: a checkpoint directory or None.
    datasets: (training examples, validation examples); None: read from the flags' files."""

    def __init__(
        self,
        cfg: Config,
        d: Dist,
        device: torch.device,
        scorer,
        resume_from: str | None = None,
        datasets: tuple[list, list] | None = None,
    ):
        self.cfg = cfg
        self.d = d
        self.device = device
        self.examples, self.val_examples = datasets or data.load_data(cfg)
        state = None
        if resume_from:  # read and checked before any model loads
            state = outputs.read_trainer_state(resume_from, cfg, d.world)
        # The policy and its KL reference (policy.py: full fine-tuning or LoRA, sharded or not).
        self.policy, self.ref, self.tokenizer = build_policy(
            cfg, device, self.load_model, resume_from
        )
        # Rollouts: generation (the compiled decode step, built once per run), codec and scorer.
        # Every example of the run is passed to size the compiled step's KV cache.
        codec = load_codec(cfg.codec, device, cfg.codec_precision)
        self.sampler = Sampler(
            cfg,
            d,
            device,
            self.policy,
            self.tokenizer,
            codec,
            scorer,
            self.autocast,
            examples=self.examples + self.val_examples,
        )
        trained = [p for p in self.policy.parameters() if p.requires_grad]  # all, or the adapters
        self.optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(cfg.warmup_steps, 0)

        def lr_factor(step: int) -> float:
            """Linear warm-up over --warmup-steps, then the full rate."""
            if not warmup:
                return 1.0
            return min(1.0, (step + 1) / warmup)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.gen = torch.Generator(device=device)  # the rollouts' sampling RNG
        self.gen.manual_seed(cfg.seed * 1000 + d.rank)
        self.start_step = 0
        self.guards = parse_guards(cfg.guard)  # {measure: band}, in the measure's units
        self.guard_reference = None  # the initial policy's medians of the guarded measures
        self.skips = batch.Skips()  # steps skipped for a non-finite gradient norm or loss
        if resume_from:
            self.load_state(resume_from, state)

    def load_state(self, resume_from: str, state: dict):
        """Continue from checkpoint `resume_from`, whose trainer state is `state`."""
        if self.cfg.fsdp:
            folder = os.path.join(resume_from, outputs.OPTIMIZER_DIR)
            parallel.load_sharded_optimizer(folder, self.policy, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generators"][self.d.rank].cpu())
        self.start_step = state["step"]
        self.guard_reference = state.get("guard_reference", state.get("prosody_reference"))
        self.skips = batch.Skips(**state.get("skips", {}))  # (none in older checkpoints)

    def load_model(self, name: str):
        """(Hugging Face causal LM, tokenizer) of `name` in fp32 on the trainer's device."""
        # fp32 master weights (bf16 autocast on CUDA); 'tiny' is a seeded random model with 64
        # speech tokens, so that a random policy emits the stop token within 64 steps most times.
        return load_model(demo.resolve_model(name), self.device, torch.float32, seed=self.cfg.seed)

    def autocast(self):
        """The update's and the rollouts' autocast context: bf16 on CUDA, off on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # -- one GRPO step ------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[dict, dict]:
        """GRPO step `step` (0-based) on this rank's prompts. Returns (the step's metrics over
        every rank, this rank's first --n-samples clips to listen to)."""
        cfg = self.cfg
        d = self.d
        G = cfg.group_size
        examples = data.step_examples(self.examples, step, cfg, d)
        if self.guards and self.guard_reference is None:  # once per run
            self.guard_reference = self.measure_reference()

        # 1-3. Rollouts, audio and rewards of this rank's prompts; with --dynamic-sampling, groups
        # whose samples all scored alike are replaced by those of further prompts (batch.refill).
        rnd = self.scored_round(examples, step)
        dyn = {}  # dynamic sampling's metrics
        if cfg.dynamic_sampling:

            def refill_round(r: int) -> batch.Round:
                """Refill round r (1, 2, ...): the scored round of further prompts."""
                more = data.refill_examples(self.examples, step, r, cfg, d)
                return self.scored_round(more, step, r)

            rnd, dyn = batch.refill(rnd, cfg, d, refill_round)

        # 4. Advantages within each group (whole groups live on one rank); with --sim-weight,
        # plus the weighted, separately normalized advantage of speaker similarity (GLM-TTS).
        advantages = group_advantages(rnd.rewards, G, scale=cfg.scale_rewards)  # [B*G]
        if cfg.sim_weight:
            sim_advantages = group_advantages(rnd.sims, G, scale=cfg.scale_rewards)  # [B*G]
            advantages = advantages + cfg.sim_weight * sim_advantages

        # 5. Clipped policy-gradient update with KL to the reference, gradients summed over ranks.
        t0 = time.time()
        self.policy.train()
        roll = rnd.roll
        train_batch = TrainBatch(
            prompts=[self.sampler.prompt(ex) for ex in rnd.items],
            tokens=roll.tokens,
            lengths=roll.lengths,
            advantages=advantages.to(self.device),
            logprobs=roll.logprobs,
            keep=rnd.keep,
        )
        stats = update_policy(
            self.policy,
            self.ref,
            self.optimizer,
            self.scheduler,
            train_batch,
            cfg,
            d,
            self.autocast,
            self.sampler.allowed_ids,
        )
        self.skips.count(step, stats, d.rank)
        seconds = {**rnd.seconds, "train": time.time() - t0}  # per phase (rollout.PHASES + train)

        # 6. Metrics over every rank's clips.
        metrics = {"step": step + 1}
        metrics.update(step_metrics(d, rnd.scores, rnd.rewards, roll, rnd.guard, seconds, G))
        metrics.update(stats)
        metrics["skipped_total"] = self.skips.total
        metrics.update(dyn)
        for name, value in (self.guard_reference or {}).items():
            metrics[f"ref_{name}"] = value
        n = cfg.n_samples
        shown = {
            "audios": rnd.audios[:n],
            "texts": [ex.text for ex in rnd.items[:n]],
            "scores": rnd.scores[:n],
            "finished": roll.finished[:n].tolist(),
        }
        return metrics, shown

    def scored_round(self, examples: list, step: int, refill: int = 0) -> batch.Round:
        """G samples of each example from the current policy (after a voice prompt, in its voice)
        -> audio of the speech tokens before the stop token -> scores from the Whisper worker (and
        speaker similarity to the prompt), chunk by chunk, overlapped -> the rewards trained on: 0
        for a truncated sample (no stop token); with --guard, less for a sample whose guarded
        measures left their bands. Every rank runs it, failures agreed on.
        refill: the round's number under --dynamic-sampling (0: the step's own prompts)."""
        cfg = self.cfg
        G = cfg.group_size
        where = f"step {step + 1}"
        if refill:
            where += f", refill round {refill}"
        items = [ex for ex in examples for _ in range(G)]  # [B*G], group by group
        guard = None
        sims = None
        with self.d.together(f"{where}'s rollouts and rewards"):
            roll, audios, scores, seconds = self.sampler.rollout_and_score(items, self.gen)
            if not len(scores) == len(audios) == len(items) == roll.tokens.shape[0]:
                raise RuntimeError(f"{where}: {len(scores)} scores for {len(items)} rollouts")
            finished = roll.finished.cpu()  # [B*G] bool
            if self.guards:
                guard = [clip_guard_factor(s, self.guards, self.guard_reference) for s in scores]
            rewards = batch.step_rewards(scores, finished, guard, where)
            if cfg.sim_weight:
                sims = batch.step_sims(scores, finished, G)
        return batch.Round(items, roll, audios, scores, seconds, rewards, guard, sims)

    def measure_reference(self) -> dict:
        """The initial policy's medians of the guarded measures, on G samples of each validation
        text (or of the first step's prompts), at most one training batch of clips."""
        cfg = self.cfg
        examples = self.val_examples or data.step_examples(self.examples, 0, cfg, Dist())
        return self.sampler.reference(examples, tuple(self.guards), "the guards' reference")

    def validate(self) -> tuple[dict, dict]:
        """One sample per validation text with a fixed seed, so steps compare like for like: (the
        val_ metrics, this rank's first --n-samples clips to listen to)."""
        examples = self.val_examples
        scores, rewards, finished, shown = self.sampler.sample_and_score(examples, "validation")
        world = self.sampler.d.world
        metrics = clip_means(scores, rewards, finished, prefix="val_")
        metrics.update(table_metrics(scores, examples, world, self.cfg.language))
        metrics["val_clips"] = len(scores)
        return metrics, shown

    def save(self, path: str, step: int):
        """Checkpoint `path` after `step` steps (a collective): a Hugging Face directory of the
        policy (with LoRA: merged, plus the adapter in PEFT's layout) and what --resume needs."""
        cfg = self.cfg
        weights, extra = checkpoint_state(self.policy, cfg, self.d, demo.resolve_model(cfg.model))
        outputs.save_everywhere(
            path,
            self.policy,
            self.optimizer,
            self.tokenizer,
            self.trainer_state(step),
            self.d,
            cfg.fsdp,
            weights=weights,
            extra=extra,
        )

    def trainer_state(self, step: int) -> dict:
        """Everything --resume needs besides the weights (and, with FSDP, the sharded optimizer
        state, which every rank writes itself). A collective: every rank takes part."""
        optimizer = None  # FSDP: in the checkpoint's sharded optimizer folder instead
        if not self.cfg.fsdp:
            optimizer = self.optimizer.state_dict()
        return {
            "step": step,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "generators": self.d.gather(self.gen.get_state()),
            "data_position": step * self.cfg.prompts_per_step,
            "world_size": self.d.world,
            "guard_reference": self.guard_reference,
            "config": dataclasses.asdict(self.cfg),
            "skips": dataclasses.asdict(self.skips),
        }


# ----------------------------------------------------------------------------------------------
# The run


def train(cfg: Config) -> list[dict]:
    """Run (or continue) training; returns the metrics of the steps run (every rank)."""
    from tqdm import tqdm

    d, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    worker = None  # this node's Whisper worker process (local rank 0 only)
    scorer = None
    tr = None
    reporter = None
    history = []
    succeeded = False
    try:
        with d.together("start-up"):  # before anything is written or loaded: the cheap checks
            resume_from = outputs.resolve_resume(cfg.out, cfg.resume)
            datasets = data.load_data(cfg)
        if cfg.epochs > 0:  # the run's length in passes over the training data (said in the banner)
            cfg.steps = data.epoch_steps(cfg.epochs, len(datasets[0]), cfg.prompts_per_step)
        cloning = any(ex.prompt_wav for ex in datasets[0] + datasets[1])
        speaker_model = None
        if cloning:
            speaker_model = cfg.speaker_model
        worker, scorer = parallel.start_scorer(cfg, d, speaker_model)
        with d.together("loading the models"):
            tr = Trainer(cfg, d, device, scorer, resume_from, datasets)
        if tr.start_step >= cfg.steps:
            if d.rank == 0:
                print(
                    f"{cfg.out}: the run is already complete ({tr.start_step} of {cfg.steps} "
                    f"steps, {resume_from}); nothing to do. Raise --steps to train further."
                )
            succeeded = True
            return history
        metrics_path = None  # rank 0 writes metrics.jsonl and reports
        if d.rank == 0:
            metrics_path = outputs.open_metrics(cfg.out, tr.start_step)
            reporter = report.Reporter(cfg.report_to, cfg.out, dataclasses.asdict(cfg))
            # What reproduces this run: the same flags, this seed.
            print(
                f"grpo.py: {cfg.preset or 'no'} preset, seed {cfg.seed}, "
                f"steps {tr.start_step + 1}-{cfg.steps}, {d.world} rank(s); "
                f"metrics, samples and checkpoints in {cfg.out}",
                flush=True,
            )

        if tr.val_examples and tr.start_step == 0:  # the learning curve's "before" point
            t0 = time.time()
            val, val_shown = tr.validate()
            row = {"step": 0, **val, "time_step": time.time() - t0}
            outputs.write_step(d, cfg.out, metrics_path, reporter, row, {"val_step_0": val_shown})
        bar = tqdm(
            range(tr.start_step, cfg.steps),
            initial=tr.start_step,
            total=cfg.steps,
            disable=d.rank != 0,
            desc="grpo",
            dynamic_ncols=True,
        )
        for step in bar:
            t0 = time.time()
            metrics, shown = tr.train_step(step)
            done = step + 1  # steps done, and the step's number in metrics.jsonl
            last = done == cfg.steps
            samples = {}
            if done % cfg.sample_every == 0 or last:
                samples[f"step_{done}"] = shown
            if tr.val_examples and (done % cfg.val_every == 0 or last):
                val, val_shown = tr.validate()
                metrics.update(val)
                if samples:
                    samples[f"val_step_{done}"] = val_shown
            metrics["time_step"] = time.time() - t0
            history.append(metrics)
            outputs.write_step(d, cfg.out, metrics_path, reporter, metrics, samples)
            tr.skips.check(step, cfg.max_skipped_steps)  # after the step's metrics are written
            reward = f"{metrics['reward_mean']:.3f}"
            bar.set_postfix(reward=reward, s_per_step=f"{metrics['time_step']:.1f}")
            if done % cfg.save_every == 0 or last:
                tr.save(os.path.join(cfg.out, "checkpoints", f"step_{done}"), done)
        succeeded = True
        return history
    finally:
        if reporter is not None:
            reporter.close()
        if tr is not None:
            tr.sampler.close()
        if scorer is not None and scorer is not worker:
            scorer.close()
        if worker is not None:
            worker.close()
        if succeeded and d.world > 1:  # on an error, leave at once: a teardown could wait on a peer
            import torch.distributed as dist

            dist.barrier()  # every rank ends after the last checkpoint is on disk
            dist.destroy_process_group()


def main(argv=None):
    """grpo.py's command line: parse and check the flags, then train."""
    cfg = parse_config(argv, description=__doc__, inputs=True)  # a user's error: one line, exit 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        train(cfg)
    except (FileExistsError, outputs.Refused, batch.TooManySkipped) as e:  # a line, no traceback
        status = 2  # a user's error
        if isinstance(e, batch.TooManySkipped):
            status = 1
        print(f"grpo.py: {e}", file=sys.stderr, flush=True)
        if world > 1:
            os._exit(status)  # no teardown that could wait on a peer
        sys.exit(status)
    except BaseException as e:
        if world == 1:
            raise
        # Under torchrun: print this rank's error (unless Dist.together has) and leave now, without
        # interpreter or NCCL teardown (either may block on a peer); torchrun then stops the job.
        parallel.report_failure(int(os.environ.get("RANK", "0")), e)
        os._exit(1)


if __name__ == "__main__":
    main()
