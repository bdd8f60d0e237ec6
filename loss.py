"""The GRPO objective: group-normalized advantages and the clipped policy loss with KL.

Pure functions on tensors (no model, no config): tests call each one directly. The loss core is
`policy_loss`; every variant it supports (GSPO's sequence ratio, TIS weights, the k3 KL, the
three aggregations) is a small named helper below it.
"""

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # see `aggregate`
IMPORTANCE_LEVELS = ("token", "sequence")  # PPO's per-token ratio, or GSPO's per-sequence one
LOG_RATIO_LIMIT = 20.0  # exp() of a clamped log-ratio stays finite
GSPO_LOG_RATIO_CAP = 10.0  # verl's cap on GSPO's log s_i


def group_advantages(rewards, group_size: int, *, scale: bool = True, eps: float = 1e-6):
    """rewards [N], laid out group by group (N = groups * group_size) -> advantages [N].

    A = (r - group mean) / (group std + eps), the std unbiased as in verl and TRL; scale=False keeps
    only the centering (Dr. GRPO). A group whose rewards are all equal gets 0, never NaN.
    Raises ValueError unless group_size >= 2 divides N.
    """
    n_rewards = rewards.numel()
    if group_size < 2 or n_rewards % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide the {n_rewards} rewards, got {group_size}"
        )
    grouped = rewards.float().view(-1, group_size)  # [groups, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


def policy_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    clip_eps=0.2,
    kl_coef=0.04,
    clip_ratio_c=3.0,
    agg="token-mean",
    denom=None,
    norm_len=None,
    tensor_stats=False,
    clip_eps_high=None,
    importance_level="token",
    rollout_logp=None,
    tis_cap=0.0,
):
    """The clipped GRPO objective with dual clip and a k3 KL penalty, as a loss to minimize.

    logp, old_logp, ref_logp: [B, T] log-probs (nats) of the sampled tokens (ref_logp may be None
    when kl_coef == 0); advantages [B]; mask [B, T], 1 on response tokens. Per token, as verl:

        ratio = exp(logp - old_logp)                           GSPO: sequence_ratio
        pg    = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))
        pg    = min(pg, -A * clip_ratio_c) where A < 0         dual_clip; not with GSPO
        pg    = pg * tis_weights(old_logp, rollout_logp)       only with tis_cap > 0
        loss  = aggregate(pg + kl_coef * k3_kl(logp, ref_logp), mask, agg)

    denom: the aggregation's divisor (the trainer passes the global token or sequence count, so
    gradients summed over ranks and micro-batches are the global mean's); norm_len: Dr. GRPO's.
    Returns (loss, stats): kl, clip_frac, dual_clip_frac (+ tis_weight_mean, tis_capped_frac),
    token means over `mask`, as floats (0-dim tensors with tensor_stats: no host sync).
    Raises ValueError for an unknown agg or importance_level.
    """
    check_loss_options(agg, importance_level)
    mask = mask.float()
    adv = advantages.float()[:, None]  # [B, 1]
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    sequence_level = importance_level == "sequence"

    if sequence_level:
        ratio = sequence_ratio(logp, old_logp, mask)  # [B, T]
    else:
        ratio = token_ratio(logp, old_logp)  # [B, T]
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    pg_ppo = torch.maximum(pg_unclipped, pg_clipped)  # [B, T], PPO's clipped surrogate
    pg = pg_ppo
    if not sequence_level:
        pg = dual_clip(pg_ppo, adv, clip_ratio_c)
    use_tis = tis_cap > 0 and rollout_logp is not None
    if use_tis:
        tis, tis_capped = tis_weights(old_logp, rollout_logp, mask, tis_cap)
        pg = pg * tis  # the policy-gradient term only, not the KL
    kl = torch.zeros_like(logp)
    if kl_coef and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
    per_token = pg + kl_coef * kl  # [B, T]
    loss = aggregate(per_token, mask, agg, denom=denom, norm_len=norm_len)

    with torch.no_grad():
        took_clip = pg_clipped > pg_unclipped  # the clipped branch set the loss
        took_dual = (adv < 0) & (pg_ppo > -adv * clip_ratio_c)  # the dual clip set the loss
        if sequence_level:
            took_dual = torch.zeros_like(took_dual)
        stats = {
            "kl": masked_mean(kl, mask),
            "clip_frac": masked_mean(took_clip.float(), mask),
            "dual_clip_frac": masked_mean(took_dual.float(), mask),
        }
        if use_tis:
            stats["tis_weight_mean"] = masked_mean(tis, mask)
            stats["tis_capped_frac"] = tis_capped.float().sum() / mask.sum().clamp(min=1)
    if not tensor_stats:
        stats = {name: value.item() for name, value in stats.items()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# The variants and parts of the loss, each alone


def check_loss_options(agg: str, importance_level: str):
    """Raises ValueError for an aggregation or importance level the loss does not know."""
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGS}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(
            f"unknown importance level {importance_level!r}; expected one of {IMPORTANCE_LEVELS}"
        )


def token_ratio(logp, old_logp):
    """PPO's per-token importance ratio [B, T] = exp(logp - old_logp), the log clamped to +-20."""
    return torch.exp((logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def sequence_ratio(logp, old_logp, mask):
    """GSPO's ratio [B, T] (verl's compute_policy_loss_gspo): every token of sequence i takes the
    value s_i = exp(mean over its tokens of logp - old_logp), with the gradient s_i * grad logp
    (exp(logp - sg[logp] + sg[log s_i])). log s_i is capped at 10: a stale sequence pushes no
    gradient."""
    log_ratio_sum = ((logp - old_logp).detach() * mask).sum(dim=1)  # [B]
    log_s = log_ratio_sum / mask.sum(dim=1).clamp(min=1)  # [B]
    return torch.exp((logp - logp.detach() + log_s[:, None]).clamp(max=GSPO_LOG_RATIO_CAP))


def dual_clip(pg, adv, clip_ratio_c: float):
    """Dual clip [B, T]: where A < 0, the loss is at most -A * clip_ratio_c, so a token that the
    policy now finds very unlikely cannot push the loss without bound."""
    return torch.where(adv < 0, torch.minimum(pg, -adv * clip_ratio_c), pg)


def tis_weights(old_logp, rollout_logp, mask, cap: float):
    """Truncated importance sampling (verl, TRL): per-token weights [B, T] = min(exp(old_logp -
    rollout_logp), cap), detached, 1 off `mask`; and where the cap bound them ([B, T] bool)."""
    log_w = (old_logp - rollout_logp).detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    weights = torch.exp(log_w)
    on = mask > 0
    capped = on & (weights > cap)
    return torch.where(on, weights.clamp(max=cap), torch.ones_like(weights)), capped


def k3_kl(logp, ref_logp):
    """The k3 estimator of KL(policy || ref) per token [B, T], >= 0: e^x - x - 1, x = ref - logp
    (clamped to +-20 so that exp() stays finite where the two disagree wildly)."""
    log_r = (ref_logp - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(log_r) - log_r - 1


def aggregate(per_token, mask, agg: str, *, denom=None, norm_len=None):
    """The loss over `mask` (float [B, T]) from per-token values [B, T]:
    token-mean               sum over all tokens / number of tokens
    seq-mean-token-mean      mean over sequences of each sequence's token mean
    seq-mean-token-sum-norm  mean over sequences of token sums / norm_len (Dr. GRPO; default T)
    denom overrides the divisor: tokens for token-mean, sequences for the seq-* modes."""
    masked = per_token * mask
    if agg == "token-mean":
        if denom is None:
            denom = mask.sum().clamp(min=1)
        return masked.sum() / denom
    seq_sum = masked.sum(dim=1)  # [B]
    if agg == "seq-mean-token-mean":
        seq_value = seq_sum / mask.sum(dim=1).clamp(min=1)
    else:
        if norm_len is None:
            norm_len = mask.shape[1]
        seq_value = seq_sum / norm_len
    if denom is None:
        denom = mask.shape[0]
    return seq_value.sum() / denom


def masked_mean(values, mask):
    """The mean of values [B, T] over mask [B, T] (float; 0 where the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)
