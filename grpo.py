"""GRPO for LLASA text-to-speech, rewarded by Whisper. Run with

    torchrun --nproc_per_node=2 grpo.py --preset llasa-1b --whisper-device cuda:2
    python grpo.py --preset tiny                    # offline smoke run on a CPU, about a minute

One training step (`Trainer.train_step`): prompts -> G rollouts each (sample.generate) -> audio
(codec) -> rewards (Whisper worker process) -> group-normalized advantages -> clipped policy loss
with KL to a frozen reference -> gradients summed over ranks -> AdamW step. Each rank owns whole
prompt groups; the gradient is that of the global token-mean loss, so 2 ranks step exactly like 1.
This file is the algorithm; config.py holds the flags, rollout.py the rollout stage (generation,
codec, scorer), batch.py a step's scored rounds (and --dynamic-sampling's refill), policy.py the
model trained (full fine-tuning or LoRA, lora.py) and its reference, llama.py the log-prob formula,
parallel.py the collectives, outputs.py what a run writes.
"""
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

import batch
import data
import demo
import outputs
from codec import load_codec
from config import IMPORTANCE_LEVELS, LOSS_AGGS, Config, parse_config
import parallel
import report
from plot import plot
from policy import build_policy, checkpoint_state
from parallel import Dist, is_sharded, setup_distributed, sync_gradients
from prosody import GUARDED, guard_factor, sim_factor
from models import load_model
from llama import LogProbs, to_rows
from rollout import Sampler


# ----------------------------------------------------------------------------------------------
# The math: advantages and the clipped policy loss (pure functions; tests call them directly)

def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6):
    """rewards [N] laid out group by group (N = groups * group_size) -> advantages [N].

    (r - group mean) / (group std + eps), std unbiased as in verl and TRL; scale=False keeps only the
    centering (Dr. GRPO). A group whose rewards are all equal gets advantage 0, never NaN."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the {rewards.numel()} rewards, got {group_size}")
    r = rewards.float().view(-1, group_size)  # [groups, G]
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def tis_weights(old_logp, rollout_logp, mask, cap: float):
    """Truncated importance sampling (verl, TRL): per-token weights [B, T] = min(exp(old_logp -
    rollout_logp), cap), detached, 1 off `mask`; and where the cap bound them ([B, T] bool)."""
    w, on = torch.exp((old_logp - rollout_logp).detach().clamp(-20.0, 20.0)), mask > 0
    return torch.where(on, w.clamp(max=cap), torch.ones_like(w)), on & (w > cap)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps=0.2, kl_coef=0.04, clip_ratio_c=3.0,
                agg="token-mean", denom=None, norm_len=None, tensor_stats=False, clip_eps_high=None,
                importance_level="token", rollout_logp=None, tis_cap=0.0):
    """Clipped GRPO objective with dual clip and a k3 KL penalty, as a loss to minimize.

    logp, old_logp, ref_logp (None when kl_coef == 0): [B, T] log-probs (nats) of the sampled
    tokens; advantages [B]; mask [B, T] float, 1 on response tokens. Per token, as in verl:
      ratio = exp(clamp(logp - old_logp, -20, 20))
      clipped = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))  (eps_high: clip-higher)
      loss = min(clipped, -A * clip_ratio_c) where A < 0, else clipped  (dual clip: a very
             unlikely-now token with a negative advantage cannot push the loss without bound)
      times tis_weights(old_logp, rollout_logp) if tis_cap > 0 and rollout_logp is given
      + kl_coef * k3,  k3 = exp(ref - logp) - (ref - logp) - 1
    importance_level "sequence" is GSPO (as verl's compute_policy_loss_gspo): sequence i's tokens
    all take ratio s_i = exp(mean of its logp - old_logp) as the value of exp(logp - sg[logp] +
    sg[log s_i]) (gradient s_i * grad logp; log s_i capped at 10 as verl does), clipped, no dual
    clip; verl's GSPO is this with agg "seq-mean-token-mean" (verl fixes that aggregation for it).
    Aggregation over `mask`:
      token-mean               sum over all tokens / number of tokens
      seq-mean-token-mean      mean over sequences of each sequence's token mean
      seq-mean-token-sum-norm  mean over sequences of token sums / norm_len (Dr. GRPO; default T)
    `denom` overrides the divisor (tokens, or sequences for the seq-* modes): the trainer passes the
    global count over all ranks and micro-batches so that summed gradients are the global mean's.
    Returns (loss, stats): kl, clip_frac, dual_clip_frac (with TIS: tis_weight_mean, tis_capped_frac),
    token means over `mask` (floats, or 0-dim tensors with tensor_stats: no host sync)."""
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGS}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance level {importance_level!r}; expected one of {IMPORTANCE_LEVELS}")
    mask = mask.float()
    adv = advantages.float()[:, None]  # [B, 1]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if importance_level == "sequence":
        seq = ((logp - old_logp).detach() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B] log s_i
        # verl's cap: above log s_i = 10 the value stays e^10 and the gradient is 0 (a stale sequence)
        ratio = torch.exp((logp - logp.detach() + seq[:, None]).clamp(max=10.0))  # [B, T], value s_i
    else:
        ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))  # [B, T]
    loss1, loss2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.minimum(clipped, -adv * clip_ratio_c)
    per_token = clipped if importance_level == "sequence" else torch.where(adv < 0, dual, clipped)  # [B, T]
    tis = tis_weights(old_logp, rollout_logp, mask, tis_cap) if tis_cap > 0 and rollout_logp is not None else None
    per_token = per_token if tis is None else per_token * tis[0]  # the policy-gradient term only
    kl = torch.zeros_like(logp)
    if kl_coef and ref_logp is not None:
        log_r = (ref_logp - logp).clamp(-20.0, 20.0)  # exp() stays finite where the two disagree wildly
        kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(policy || ref), >= 0
        per_token = per_token + kl_coef * kl
    if agg == "token-mean":
        loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    else:
        seq_sum = (per_token * mask).sum(dim=1)  # [B]
        if agg == "seq-mean-token-mean":
            seq_val = seq_sum / mask.sum(dim=1).clamp(min=1)
        else:
            seq_val = seq_sum / (mask.shape[1] if norm_len is None else norm_len)
        loss = seq_val.sum() / (mask.shape[0] if denom is None else denom)
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        took_clip = (loss2 > loss1).float()  # the clipped branch set the loss
        took_dual = ((adv < 0) & (clipped > -adv * clip_ratio_c)).float() * (importance_level == "token")
        stats = {"kl": (kl * mask).sum() / n, "clip_frac": (took_clip * mask).sum() / n,
                 "dual_clip_frac": (took_dual * mask).sum() / n}
        if tis is not None:
            stats.update(tis_weight_mean=(tis[0] * mask).sum() / n, tis_capped_frac=tis[1].float().sum() / n)
    return loss, (stats if tensor_stats else {k: v.item() for k, v in stats.items()})


# ----------------------------------------------------------------------------------------------
# Log-probs of responses under a model, and the policy update

@dataclass
class Rollouts:
    """One rank's rollout batch, the input of the update. B = groups on this rank * G."""
    prompts: list  # B token-id lists
    tokens: torch.Tensor  # [B, T] response ids, right-padded
    lengths: torch.Tensor  # [B] response lengths, stop token included
    advantages: torch.Tensor  # [B]
    logprobs: torch.Tensor | None = None  # [B, T] float32, the rollout's own log-probs (sample.generate)
    keep: torch.Tensor | None = None  # [B] bool, rows to train on (None: all; --dynamic-sampling's fill: False)


def update_policy(policy, ref, optimizer, scheduler, ro: Rollouts, cfg: Config, d: Dist, autocast,
                  allowed_ids=None) -> dict:
    """`cfg.updates_per_rollout` AdamW steps on the clipped GRPO loss over this rank's rollouts.

    Every micro-batch's loss is divided by the global token (or sequence) count, and gradients are
    summed over ranks: the step is exactly that of the global mean loss, whatever the world size.
    policy and ref: causal LMs or LogProbs (sharded or not). Returns loss, kl, clip fractions,
    entropy (nats), grad_norm, the lr the step was taken with and, when the rollout's log-probs are
    given, logp_mismatch / logp_mismatch_max: mean and max |rollout - training| log-prob (nats) over
    response tokens (the same policy computed twice: 0 up to float rounding on a CPU, the bf16
    noise of the decode path on a GPU); with --tis-cap, tis_weight_mean / tis_capped_frac (token
    means). A handful of host syncs per step, none per micro-batch."""
    policy, ref = (LogProbs(m) if hasattr(m, "lm_head") else m for m in (policy, ref))  # HF models wrapped
    sharded = is_sharded(policy)
    device = ro.tokens.device
    B, T = ro.tokens.shape
    keep = torch.ones(B, dtype=torch.bool, device=device) if ro.keep is None else ro.keep.to(device)  # [B]
    mask = ((torch.arange(T, device=device)[None, :] < ro.lengths[:, None]) & keep[:, None]).float()  # [B, T]
    count = mask.sum() if cfg.loss_agg == "token-mean" else keep.sum().float()
    # FSDP averages gradients over ranks where the replicated path sums them: divide by world less.
    # A step where no row is trained anywhere (--dynamic-sampling found nothing) runs its passes
    # (the same collectives on every rank) with zero loss, and takes no optimizer step.
    total = d.all_reduce(count.clone()).item()
    denom = max(total, 1.0) / (d.world if sharded else 1)
    # Micro-batches of similar lengths, each cut to its longest response: one long sample must not
    # pad every micro-batch to --max-new-tokens (rows not trained count as length 1, and go last).
    # Decided on the host, from one copy of the lengths.
    lengths = (ro.lengths * keep).clamp(min=1).tolist()
    order = sorted(range(B), key=lambda i: -lengths[i])  # longest first (stable: ties keep their order)
    mbs = [order[i:i + cfg.micro_batch] for i in range(0, B, cfg.micro_batch)]
    cut = [max(lengths[i] for i in mb) for mb in mbs]
    order_dev = torch.tensor(order, device=device)
    rows_of = [order_dev[i:i + cfg.micro_batch] for i in range(0, B, cfg.micro_batch)]  # [mb] each, on device
    # The head's sorted ids and every response token's row in it, once for all passes (`to_rows`
    # checks the tokens: one sync here instead of one per micro-batch and pass).
    if allowed_ids is None:
        index, rows = None, ro.tokens.masked_fill(mask == 0, 0)
    else:
        ids = allowed_ids if torch.is_tensor(allowed_ids) else torch.tensor(list(allowed_ids))
        index = torch.unique(ids.to(device=device, dtype=torch.long))
        rows = to_rows(ro.tokens, index, mask.bool())

    def forward(model, j, **kw):
        r = rows_of[j]
        with autocast():
            return model([ro.prompts[i] for i in mbs[j]], ro.tokens[r, :cut[j]], cfg.temperature,
                         allowed_ids=allowed_ids, index=index, rows=rows[r, :cut[j]], **kw)

    lr = scheduler.get_last_lr()[0]  # the rate of this step (the scheduler moves on after it)
    params = [p for p in policy.parameters() if p.requires_grad]
    # loss, kl*n, clip*n, dual clip*n, entropy sum, tokens, |rollout - training| log-prob sum, TIS w*n, capped*n
    sums = torch.zeros(9, device=device)
    mismatch_max = torch.zeros((), device=device)
    with d.together("the reference and old log-prob passes"), torch.no_grad():  # fixed for all updates
        ref_logp = [forward(ref, j) for j in range(len(mbs))] if ref is not None and cfg.kl_coef else None
        old_logp = [forward(policy, j) for j in range(len(mbs))] if cfg.updates_per_rollout > 1 else None
    for update in range(cfg.updates_per_rollout):
        with d.together("the update's forward and backward passes"):
            for j, r in enumerate(rows_of):
                out = forward(policy, j, with_entropy=update == 0)
                logp, entropy = out if update == 0 else (out, None)
                old = logp.detach() if old_logp is None else old_logp[j]  # one update: ratio = 1, on-policy
                m, roll_lp = mask[r, :cut[j]], None if ro.logprobs is None else ro.logprobs[r, :cut[j]]
                loss, st = policy_loss(logp, old, ref_logp[j] if ref_logp else None, ro.advantages[r], m,
                                       clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, kl_coef=cfg.kl_coef,
                                       clip_ratio_c=cfg.clip_ratio_c, agg=cfg.loss_agg, denom=denom, tensor_stats=True,
                                       norm_len=cfg.max_new_tokens, importance_level=cfg.importance_level,
                                       rollout_logp=roll_lp, tis_cap=cfg.tis_cap)
                loss.backward()
                if update == 0:
                    n = m.sum()
                    gap = torch.zeros_like(m)
                    if ro.logprobs is not None:  # the rollout's log-probs against this pass's
                        gap = (logp.detach() - roll_lp).abs() * m
                        mismatch_max = torch.maximum(mismatch_max, gap.max())
                    sums += torch.stack([loss.detach(), st["kl"] * n, st["clip_frac"] * n,
                                         st["dual_clip_frac"] * n, (entropy * m).sum(), n, gap.sum(),
                                         st.get("tis_weight_mean", n * 0) * n, st.get("tis_capped_frac", n * 0) * n])
        if not sharded:  # FSDP reduced them in backward
            sync_gradients(params, d)  # sum the ranks' shares of the global mean loss
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # a DTensor under FSDP
        if not torch.isfinite(gnorm):  # identical on every rank (same summed gradients): all stop together
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient norm ({gnorm.item()}) in update {update}; "
                                     "the optimizer step was skipped and no checkpoint was written")
        if total > 0:  # (AdamW's momentum and weight decay would move the weights on zero gradients)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients before the next rollout
    scheduler.step()  # the schedule counts rollout steps, whatever --updates-per-rollout
    sums = d.all_reduce(sums)
    n = sums[5].clamp(min=1)
    stats = {"loss": sums[0].item() / (d.world if sharded else 1),  # FSDP: each share was scaled by world
             "kl": (sums[1] / n).item(), "clip_frac": (sums[2] / n).item(), "dual_clip_frac": (sums[3] / n).item(),
             "entropy": (sums[4] / n).item(), "grad_norm": gnorm.item(), "lr": lr}
    if ro.logprobs is not None:
        stats["logp_mismatch"] = (sums[6] / n).item()
        stats["logp_mismatch_max"] = d.all_reduce(mismatch_max, op="max").item()
    if cfg.tis_cap > 0 and ro.logprobs is not None:  # TIS: token mean weight, fraction capped
        stats.update(tis_weight_mean=(sums[7] / n).item(), tis_capped_frac=(sums[8] / n).item())
    return stats


# ----------------------------------------------------------------------------------------------
# The trainer

class Trainer:
    """Holds what a step needs: models, optimizer, codec, reward scorer, RNG, distributed info.

    scorer: anything with .score(audios, texts, languages) -> list[reward.Score] (the Whisper
    worker's client in a run, a fake in tests). resume_from: a checkpoint directory or None."""

    def __init__(self, cfg: Config, d: Dist, device: torch.device, scorer, resume_from: str | None = None,
                 datasets: tuple[list, list] | None = None):
        self.cfg, self.d, self.device = cfg, d, device
        self.examples, self.val_examples = datasets or data.load_data(cfg)
        state = outputs.read_trainer_state(resume_from, cfg, d.world) if resume_from else None  # checked first
        # The policy and the KL reference (policy.py: full fine-tuning or LoRA, FSDP2-sharded or not).
        self.policy, self.ref, self.tokenizer = build_policy(cfg, device, self.load_model, resume_from)
        # Rollouts: generation (the compiled decode step, built once per run), codec and scorer.
        codec = load_codec(cfg.codec, device, cfg.codec_precision)
        self.sampler = Sampler(cfg, d, device, self.policy, self.tokenizer, codec, scorer, self.autocast,
                               examples=self.examples + self.val_examples)  # sizes the compiled step's cache
        trained = [p for p in self.policy.parameters() if p.requires_grad]  # all, or LoRA's adapters
        self.optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + d.rank)  # sampling RNG
        self.start_step = 0
        self.prosody_reference = None  # the initial policy's median chars_per_s and f0_std_semitones
        if resume_from:
            if cfg.fsdp:
                parallel.load_sharded_optimizer(os.path.join(resume_from, outputs.OPTIMIZER_DIR), self.policy,
                                                self.optimizer)
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.gen.set_state(state["generators"][d.rank].cpu())
            self.start_step = state["step"]
            self.prosody_reference = state.get("prosody_reference")

    def load_model(self, name: str):
        # fp32 master weights (bf16 autocast on CUDA); 'tiny' is a seeded random model with 64 speech
        # tokens, so that a random policy emits the stop token within 64 steps most of the time.
        return load_model(demo.resolve_model(name), self.device, torch.float32, seed=self.cfg.seed)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # -- one GRPO step ------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[dict, dict]:
        cfg, d, G = self.cfg, self.d, self.cfg.group_size
        examples = data.step_examples(self.examples, step, cfg, d)
        if (cfg.prosody_guard or cfg.sim_guard) and self.prosody_reference is None:  # once per run
            self.prosody_reference = self.measure_reference()
        # 1-3. Rollouts, audio and rewards of this rank's prompts; with --dynamic-sampling, groups
        # whose samples all scored alike are replaced by those of further prompts (batch.refill).
        rnd, dyn = self.scored_round(examples, step), {}
        if cfg.dynamic_sampling:
            rnd, dyn = batch.refill(rnd, cfg, d, lambda r: self.scored_round(
                data.refill_examples(self.examples, step, r, cfg, d), step, r))
        # 4. Advantages within each group (whole groups live on one rank); with --sim-weight,
        # plus the weighted, separately normalized advantage of speaker similarity (GLM-TTS).
        advantages = group_advantages(rnd.rewards, G, scale=cfg.scale_rewards)  # [B*G]
        if cfg.sim_weight:
            advantages = advantages + cfg.sim_weight * group_advantages(rnd.sims, G, scale=cfg.scale_rewards)

        # 5. Clipped policy-gradient update with KL to the reference, gradients summed over ranks.
        t0 = time.time()
        self.policy.train()
        roll = rnd.roll
        ro = Rollouts([self.sampler.prompt(ex) for ex in rnd.items], roll.tokens, roll.lengths,
                      advantages.to(self.device), roll.logprobs, rnd.keep)
        stats = update_policy(self.policy, self.ref, self.optimizer, self.scheduler, ro, cfg, d,
                              self.autocast, self.sampler.allowed_ids)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"step {step + 1}: non-finite loss {stats['loss']}")
        seconds = rnd.seconds + [time.time() - t0]

        # 6. Metrics over every rank's clips.
        metrics = {"step": step + 1, **outputs.step_metrics(d, rnd.scores, rnd.rewards, roll, rnd.guard, seconds, G),
                   **stats, **dyn, **{f"ref_{k}": v for k, v in (self.prosody_reference or {}).items()}}
        n = cfg.n_samples
        shown = {"audios": rnd.audios[:n], "texts": [ex.text for ex in rnd.items[:n]], "scores": rnd.scores[:n],
                 "finished": roll.finished[:n].tolist()}
        return metrics, shown

    def scored_round(self, examples: list, step: int, refill: int = 0) -> batch.Round:
        """G samples of each example from the current policy (after a voice prompt, in its voice)
        -> audio of the speech tokens before the stop token -> scores from the Whisper worker (and
        speaker similarity to the prompt), chunk by chunk, overlapped -> the rewards trained on: 0
        for a truncated sample (no stop token); with the guards, less for rushed or monotone
        speech or a voice drifting from the prompt's. Every rank runs it, failures agreed on.
        refill: the round's number under --dynamic-sampling (0: the step's own prompts)."""
        cfg, G = self.cfg, self.cfg.group_size
        where = f"step {step + 1}" + (f", refill round {refill}" if refill else "")
        stage = f"{where}'s rollouts and rewards"
        items = [ex for ex in examples for _ in range(G)]  # [B*G], group by group
        with self.d.together(stage):
            roll, audios, scores, seconds = self.sampler.rollout_and_score(items, self.gen)
            if not len(scores) == len(audios) == len(items) == roll.tokens.shape[0]:
                raise RuntimeError(f"{where}: {len(scores)} scores for {len(items)} rollouts")
            guard = [self.guard(s) for s in scores] if cfg.prosody_guard or cfg.sim_guard else None
            rewards = batch.step_rewards(scores, roll.finished.cpu(), guard, where)
            sims = batch.step_sims(scores, roll.finished.cpu(), G) if cfg.sim_weight else None
        return batch.Round(items, roll, audios, scores, seconds, rewards, guard, sims)

    def guard(self, score) -> float:
        """The guards' factor on a clip's reward (1 where no guard is on)."""
        cfg, ref = self.cfg, self.prosody_reference
        prosody = guard_factor(score, ref, rate_band=cfg.guard_rate_band,
                               pitch_band=cfg.guard_pitch_band) if cfg.prosody_guard else 1.0
        return prosody * (sim_factor(score.sim, ref["sim"], cfg.sim_guard_band) if cfg.sim_guard else 1.0)

    def measure_reference(self) -> dict:
        """The initial policy's medians of what the guards hold (--prosody-guard: speaking rate and
        pitch spread; --sim-guard: speaker similarity), on G samples of each validation text (or
        of the first step's prompts), at most one training batch of clips."""
        cfg = self.cfg
        names = (GUARDED if cfg.prosody_guard else ()) + (("sim",) if cfg.sim_guard else ())
        examples = self.val_examples or data.step_examples(self.examples, 0, cfg, Dist())
        return self.sampler.reference(examples, names, "the guards' reference")

    def validate(self) -> tuple[dict, dict]:
        """One sample per validation text with a fixed seed, so steps compare like for like: (the
        val_ metrics, this rank's first --n-samples clips to listen to)."""
        scores, rewards, finished, shown = self.sampler.sample_and_score(self.val_examples, "validation")
        table = outputs.table_metrics(scores, self.val_examples, self.sampler.d.world, self.cfg.language)
        return {**outputs.clip_means(scores, rewards, finished, prefix="val_"), **table, "val_clips": len(scores)}, shown

    def save(self, path: str, step: int):
        """Checkpoint `path` after `step` steps (a collective): a Hugging Face directory of the policy
        (with LoRA: merged, plus the adapter in PEFT's layout) and what --resume needs."""
        cfg = self.cfg
        weights, extra = checkpoint_state(self.policy, cfg, self.d, demo.resolve_model(cfg.model))
        outputs.save_everywhere(path, self.policy, self.optimizer, self.tokenizer, self.trainer_state(step), self.d,
                                cfg.fsdp, weights=weights, extra=extra)

    def trainer_state(self, step: int) -> dict:
        """Everything --resume needs besides the weights (and, with FSDP, the sharded optimizer
        state, which every rank writes itself). A collective: every rank takes part."""
        return {"step": step, "optimizer": None if self.cfg.fsdp else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generators": self.d.gather(self.gen.get_state()),
                "data_position": step * self.cfg.prompts_per_step, "world_size": self.d.world,
                "prosody_reference": self.prosody_reference, "config": dataclasses.asdict(self.cfg)}


def train(cfg: Config) -> list[dict]:
    """Run (or continue) training; returns the metrics of the steps run (every rank)."""
    from tqdm import tqdm
    d, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    worker = scorer = tr = reporter = None
    history, succeeded = [], False
    try:
        with d.together("start-up"):  # before anything is written or loaded: the cheap checks
            resume_from = outputs.resolve_resume(cfg.out, cfg.resume)
            datasets = data.load_data(cfg)
        if cfg.epochs > 0:  # the run's length in passes over the training data (said in the banner)
            cfg.steps = data.epoch_steps(cfg.epochs, len(datasets[0]), cfg.prompts_per_step)
        cloning = any(ex.prompt_wav for ex in datasets[0] + datasets[1])
        worker, scorer = parallel.start_scorer(cfg, d, cfg.speaker_model if cloning else None)
        with d.together("loading the models"):
            tr = Trainer(cfg, d, device, scorer, resume_from, datasets)
        if tr.start_step >= cfg.steps:
            if d.rank == 0:
                print(f"{cfg.out}: the run is already complete ({tr.start_step} of {cfg.steps} steps, "
                      f"{resume_from}); nothing to do. Raise --steps to train further.")
            succeeded = True
            return history
        metrics_path = outputs.open_metrics(cfg.out, tr.start_step) if d.rank == 0 else None
        reporter = report.Reporter(cfg.report_to, cfg.out, dataclasses.asdict(cfg)) if d.rank == 0 else None
        if d.rank == 0:  # what reproduces this run: the same flags, this seed
            print(f"grpo.py: {cfg.preset or 'no'} preset, seed {cfg.seed}, steps {tr.start_step + 1}-{cfg.steps}, "
                  f"{d.world} rank(s); metrics, samples and checkpoints in {cfg.out}", flush=True)

        def write(done: int, metrics: dict, samples: dict):
            """metrics.jsonl, metrics.png and samples/<name> for each name: clips of rank 0."""
            with d.together(f"writing step {done}'s metrics and samples"):
                if d.rank == 0:
                    outputs.append_metrics(metrics_path, metrics)
                    reporter.log(metrics, samples)  # and the first validation clips
                    plot(metrics_path)
                    for name, shown in samples.items():
                        outputs.save_samples(os.path.join(cfg.out, "samples", name), **shown)

        if tr.val_examples and tr.start_step == 0:  # the learning curve's "before" point
            t0 = time.time()
            val, val_shown = tr.validate()
            write(0, {"step": 0, **val, "time_step": time.time() - t0}, {"val_step_0": val_shown})
        bar = tqdm(range(tr.start_step, cfg.steps), initial=tr.start_step, total=cfg.steps,
                   disable=d.rank != 0, desc="grpo", dynamic_ncols=True)
        for step in bar:
            t0 = time.time()
            metrics, shown = tr.train_step(step)
            done, last = step + 1, step + 1 == cfg.steps
            samples = {f"step_{done}": shown} if done % cfg.sample_every == 0 or last else {}
            if tr.val_examples and (done % cfg.val_every == 0 or last):
                val, val_shown = tr.validate()
                metrics.update(val)
                if samples:
                    samples[f"val_step_{done}"] = val_shown
            metrics["time_step"] = time.time() - t0
            history.append(metrics)
            write(done, metrics, samples)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", s_per_step=f"{metrics['time_step']:.1f}")
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
    cfg = parse_config(argv, description=__doc__)
    try:
        train(cfg)
    except FileExistsError as e:  # --out holds another run: a message, not a traceback
        print(f"grpo.py: {e}", file=sys.stderr, flush=True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            os._exit(1)  # no teardown that could wait on a peer
        sys.exit(1)
    except BaseException as e:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        # Under torchrun: print this rank's error (unless Dist.together has) and leave now, without
        # interpreter or NCCL teardown (either may block on a peer); torchrun then stops the job.
        parallel.report_failure(int(os.environ.get("RANK", "0")), e)
        os._exit(1)


if __name__ == "__main__":
    main()
