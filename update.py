"""The policy update: the paper's inner loop (DeepSeekMath's Algorithm 1, "for GRPO iteration =
1, ..., mu"), `cfg.updates_per_rollout` AdamW steps on the clipped GRPO loss (loss.py) over one
rank's rollouts, with gradients summed over ranks.

`update_policy` is the loop; below it, its parts: the micro-batch plan, the head's token rows, the
loss's options from the flags, the named totals, gradient clipping and the skip rule.
"""

from dataclasses import dataclass

import torch

from config import Config
from llama import LogProbs, to_rows
from loss import policy_loss
from parallel import Dist, is_sharded, sync_gradients


@dataclass
class TrainBatch:
    """One rank's rollouts as the update reads them. B = groups on this rank * G."""

    prompts: list  # [B] prompt token-id lists
    tokens: torch.Tensor  # [B, T] response ids, right-padded
    lengths: torch.Tensor  # [B] response lengths, stop token included
    advantages: torch.Tensor  # [B]
    logprobs: torch.Tensor | None = None  # [B, T] float32: the rollout's own log-probs
    keep: torch.Tensor | None = None  # [B] bool: rows to train on (None: all)


# What the first update sums over this rank's tokens, all-reduced once at the end.
TOTALS = (
    "loss",
    "tokens",
    "entropy",
    "kl",
    "clip_frac",
    "dual_clip_frac",
    "logp_gap",  # |rollout - training| log-prob
    "tis_weight_mean",
    "tis_capped_frac",
)


def update_policy(
    policy,
    ref,
    optimizer,
    scheduler,
    train_batch: TrainBatch,
    cfg: Config,
    d: Dist,
    autocast,
    allowed_ids=None,
) -> dict:
    """`cfg.updates_per_rollout` AdamW steps on the clipped GRPO loss over this rank's rollouts.

    Each micro-batch's loss is divided by the global token (or sequence) count and gradients are
    summed over ranks: the step is that of the global mean loss, whatever the world size.
    policy, ref: causal LMs or llama.LogProbs, sharded or not (ref None: no KL).
    Returns loss, kl, clip_frac, dual_clip_frac, entropy (nats), grad_norm, lr, skipped; with the
    rollout's log-probs logp_mismatch(_max), their mean and max gap to the update's (nats); with
    --tis-cap tis_weight_mean, tis_capped_frac. A non-finite gradient norm or loss on any rank
    skips the step on every rank: no optimizer step, gradients dropped, `skipped` 1.
    """
    policy = as_logprobs(policy)
    ref = as_logprobs(ref)
    sharded = is_sharded(policy)
    device = train_batch.tokens.device
    n_rows, n_positions = train_batch.tokens.shape
    keep = torch.ones(n_rows, dtype=torch.bool, device=device)  # [B]
    if train_batch.keep is not None:
        keep = train_batch.keep.to(device)
    positions = torch.arange(n_positions, device=device)
    in_response = positions[None, :] < train_batch.lengths[:, None]  # [B, T] bool
    mask = (in_response & keep[:, None]).float()  # [B, T] float: tokens trained on

    # The loss's divisor: the global count of trained tokens (or sequences) over ranks. FSDP
    # averages gradients over ranks where the replicated path sums them: divide by world less.
    # A step that trains no row anywhere runs its passes (the same collectives on every rank)
    # with zero loss, and takes no optimizer step.
    if cfg.loss_agg == "token-mean":
        count = mask.sum()
    else:
        count = keep.sum().float()
    total = d.all_reduce(count.clone()).item()
    denom = max(total, 1.0)
    if sharded:
        denom = denom / d.world

    lengths = (train_batch.lengths * keep).clamp(min=1).tolist()  # rows not trained: length 1
    micro_batches = plan_micro_batches(lengths, cfg.micro_batch, device)
    head_ids, head_rows = head_positions(train_batch.tokens, mask, allowed_ids)

    def logprobs_of(model, mb, with_entropy=False):
        """log-probs [mb, length] of the micro-batch's responses under `model`."""
        prompts = [train_batch.prompts[i] for i in mb.rows]
        tokens = train_batch.tokens[mb.rows_dev, : mb.length]
        token_rows = head_rows[mb.rows_dev, : mb.length]  # each token's row in the head
        with autocast():
            return model(
                prompts,
                tokens,
                cfg.temperature,
                allowed_ids=allowed_ids,
                index=head_ids,
                rows=token_rows,
                with_entropy=with_entropy,
            )

    lr = scheduler.get_last_lr()[0]  # the rate of this step (the scheduler moves on after it)
    params = [p for p in policy.parameters() if p.requires_grad]
    totals = {name: torch.zeros((), device=device) for name in TOTALS}
    mismatch_max = torch.zeros((), device=device)
    # Fixed for all updates: the reference's log-probs, and the policy's before the first update.
    ref_logp = None
    old_logp = None
    with d.together("the reference and old log-prob passes"), torch.no_grad():
        if ref is not None and cfg.kl_coef:
            ref_logp = [logprobs_of(ref, mb) for mb in micro_batches]
        if cfg.updates_per_rollout > 1:
            old_logp = [logprobs_of(policy, mb) for mb in micro_batches]

    skipped = False
    for update in range(cfg.updates_per_rollout):
        first = update == 0
        update_loss = torch.zeros((), device=device)  # this rank's share of this update's loss
        with d.together("the update's forward and backward passes"):
            for j, mb in enumerate(micro_batches):
                entropy = None
                if first:
                    logp, entropy = logprobs_of(policy, mb, with_entropy=True)
                else:
                    logp = logprobs_of(policy, mb)
                old = logp.detach()  # one update: on-policy, the ratio is 1
                if old_logp is not None:
                    old = old_logp[j]
                ref_j = None
                if ref_logp is not None:
                    ref_j = ref_logp[j]
                mb_mask = mask[mb.rows_dev, : mb.length]  # [mb, length]
                rollout_logp = None
                if train_batch.logprobs is not None:
                    rollout_logp = train_batch.logprobs[mb.rows_dev, : mb.length]
                loss, stats = policy_loss(
                    logp,
                    old,
                    ref_j,
                    train_batch.advantages[mb.rows_dev],
                    mb_mask,
                    denom=denom,
                    rollout_logp=rollout_logp,
                    tensor_stats=True,
                    **loss_options(cfg),
                )
                loss.backward()
                update_loss += loss.detach()
                if first:
                    gap = torch.zeros_like(mb_mask)  # the rollout's log-probs against this pass's
                    if rollout_logp is not None:
                        gap = (logp.detach() - rollout_logp).abs() * mb_mask
                        mismatch_max = torch.maximum(mismatch_max, gap.max())
                    add_totals(totals, loss, stats, entropy, gap, mb_mask)

        if not sharded:  # FSDP reduced them in backward
            sync_gradients(params, d)  # sum the ranks' shares of the global mean loss
        grad_norm = clip_gradients(params, cfg.grad_clip)
        # A non-finite norm or loss on any rank (a bf16 overflow, a bad sample) skips this update
        # and the rollout's later ones. The flag's max over ranks makes every rank skip alike.
        if non_finite_anywhere(grad_norm, update_loss, d):
            optimizer.zero_grad(set_to_none=True)
            skipped = True
            break
        # No row trained anywhere: no step (AdamW's momentum and weight decay would move the
        # weights on zero gradients).
        if total > 0:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients before the next rollout
    scheduler.step()  # the schedule counts rollout steps, whatever --updates-per-rollout

    summed = d.all_reduce(torch.stack([totals[name] for name in TOTALS]))  # one all-reduce
    totals = dict(zip(TOTALS, summed))
    tokens = totals["tokens"].clamp(min=1)
    loss_sum = totals["loss"].item()
    if sharded:
        loss_sum = loss_sum / d.world  # FSDP: each share was scaled by world
    result = {
        "loss": loss_sum,
        "kl": (totals["kl"] / tokens).item(),
        "clip_frac": (totals["clip_frac"] / tokens).item(),
        "dual_clip_frac": (totals["dual_clip_frac"] / tokens).item(),
        "entropy": (totals["entropy"] / tokens).item(),
        "grad_norm": grad_norm.item(),
        "lr": lr,
        "skipped": int(skipped),
    }
    if train_batch.logprobs is not None:
        result["logp_mismatch"] = (totals["logp_gap"] / tokens).item()
        result["logp_mismatch_max"] = d.all_reduce(mismatch_max, op="max").item()
        if cfg.tis_cap > 0:
            result["tis_weight_mean"] = (totals["tis_weight_mean"] / tokens).item()
            result["tis_capped_frac"] = (totals["tis_capped_frac"] / tokens).item()
    return result


@dataclass
class MicroBatch:
    """Rows of the batch trained together, cut to their longest response."""

    rows: list  # [mb] row indices into the batch, on the host
    rows_dev: torch.Tensor  # [mb] the same, on the device
    length: int  # response positions kept: the longest response among these rows


def plan_micro_batches(lengths: list, micro_batch: int, device) -> list:
    """Micro-batches of similar lengths: rows sorted longest first (stable), `micro_batch` at a
    time, each cut to its longest response, so that one long sample does not pad every
    micro-batch to --max-new-tokens. Decided on the host from one copy of the lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    order_dev = torch.tensor(order, device=device)  # one copy to the device for all micro-batches
    plan = []
    for start in range(0, len(order), micro_batch):
        rows = order[start : start + micro_batch]
        rows_dev = order_dev[start : start + micro_batch]
        plan.append(MicroBatch(rows, rows_dev, max(lengths[i] for i in rows)))
    return plan


def head_positions(tokens, mask, allowed_ids):
    """The head's sorted token ids (None: the full vocabulary) and every response token's row in
    that head [B, T], computed once for all passes (`to_rows` checks the tokens: one host sync
    here instead of one per micro-batch and pass). Positions off `mask` get row 0."""
    if allowed_ids is None:
        return None, tokens.masked_fill(mask == 0, 0)
    ids = allowed_ids
    if not torch.is_tensor(ids):
        ids = torch.tensor(list(ids))
    head_ids = torch.unique(ids.to(device=tokens.device, dtype=torch.long))
    return head_ids, to_rows(tokens, head_ids, mask.bool())


def loss_options(cfg: Config) -> dict:
    """policy_loss's keyword arguments from the run's flags."""
    return {
        "clip_eps": cfg.clip_eps,
        "clip_eps_high": cfg.clip_eps_high,
        "clip_ratio_c": cfg.clip_ratio_c,
        "kl_coef": cfg.kl_coef,
        "agg": cfg.loss_agg,
        "norm_len": cfg.max_new_tokens,
        "importance_level": cfg.importance_level,
        "tis_cap": cfg.tis_cap,
    }


def add_totals(totals: dict, loss, stats: dict, entropy, gap, mask):
    """Adds one micro-batch's sums to `totals` (token means from policy_loss, back to sums)."""
    tokens = mask.sum()
    totals["loss"] += loss.detach()
    totals["tokens"] += tokens
    totals["entropy"] += (entropy * mask).sum()
    totals["logp_gap"] += gap.sum()
    for name in ("kl", "clip_frac", "dual_clip_frac", "tis_weight_mean", "tis_capped_frac"):
        if name in stats:
            totals[name] += stats[name] * tokens


def clip_gradients(params, max_norm: float):
    """Clips the gradients' global norm to max_norm (<= 0: no clipping); returns the norm before
    clipping, a plain tensor (also under FSDP, where torch returns a DTensor)."""
    if max_norm <= 0:
        max_norm = float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def non_finite_anywhere(grad_norm, loss, d: Dist) -> bool:
    """Whether the gradient norm or this rank's loss is non-finite on any rank (one all-reduce:
    the norm is already global, the loss shares are not)."""
    bad = (~(torch.isfinite(grad_norm) & torch.isfinite(loss))).float()
    return bool(d.all_reduce(bad, op="max").item())


def as_logprobs(model):
    """A Hugging Face causal LM wrapped as llama.LogProbs; LogProbs or None as they are."""
    if hasattr(model, "lm_head"):
        return LogProbs(model)
    return model
