"""A step's batch: scored rollouts, the rewards they train on, dynamic sampling's choice of groups.

A `Round` is one rollout round of a rank: G samples of each of its prompts, their audio and scores,
the rewards (truncated samples 0, guards applied) and the speaker similarities. Without
--dynamic-sampling a step has one round. With it (DAPO), a group whose samples all scored alike
(equal rewards, and equal SIM when --sim-weight counts it) has advantage 0 everywhere: it costs an
update and teaches nothing. Such groups are dropped and replaced by the informative groups of
further rounds (`pick_groups`, `merge_rounds`); when the refill rounds run out, the batch keeps its
shape with dropped groups that the update masks out (`Round.keep`): it trains on what there is.

`Skips` counts the steps whose update was skipped for a non-finite gradient norm or loss, and
stops the run after --max-skipped-steps of them in a row.
"""

import math
import sys
from dataclasses import dataclass

import torch

from sample import Rollout, cat_rollouts


@dataclass
class Round:
    """One rank's scored rollouts, N = groups * G rows, group by group."""

    items: list  # N data.Examples (each prompt G times)
    roll: Rollout  # tokens [N, T], lengths [N], logprobs [N, T], finished [N]
    audios: list  # N float32 16 kHz clips
    scores: list  # N reward.Score
    seconds: dict  # {phase: seconds} over rollout.PHASES
    rewards: torch.Tensor  # [N] float32, the rewards trained on (`step_rewards`)
    guard: list | None  # N guard factors, or None without guards
    sims: torch.Tensor | None  # [N] speaker similarities (`step_sims`); None without --sim-weight
    keep: torch.Tensor | None = None  # [N] bool: rows the update trains on (None: all)


def step_rewards(
    scores: list, finished: torch.Tensor, guard: list | None, where: str
) -> torch.Tensor:
    """The rewards [N] a step trains on: each Score's reward, 0 where the sample was truncated
    (finished [N] bool False), times the prosody guard's factor when given. A non-finite reward,
    or a step where no clip could be scored, stops the run before it steers the policy."""
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)  # [N]
    if not torch.isfinite(rewards).all():
        bad = [scores[i] for i in torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()]
        raise FloatingPointError(f"{where}: non-finite reward for {bad[:3]}")
    failed = [s.error for s in scores if s.error is not None and not s.too_long]
    if len(failed) == len(scores):  # a broken scorer or codec, not a policy to correct
        raise RuntimeError(f"{where}: not one of {len(scores)} clips could be scored: {failed[0]}")
    rewards[~finished] = 0.0
    if guard is not None:
        rewards = rewards * torch.tensor(guard)
    return rewards


def step_sims(scores: list, finished: torch.Tensor, group_size: int) -> torch.Tensor:
    """Speaker similarities [N] for --sim-weight: each clip's sim; a clip without one (no prompt,
    an error) or truncated gets its group's mean, so it adds no advantage either way."""
    values = [s.sim if s.sim is not None else math.nan for s in scores]  # NaN: no similarity
    sims = torch.tensor(values, dtype=torch.float32)  # [N]
    sims[~finished] = math.nan
    groups = sims.view(-1, group_size)  # [groups, G]
    mean = groups.nanmean(dim=1, keepdim=True).nan_to_num(0.0)
    return torch.where(groups.isnan(), mean, groups).view(-1)


def informative(rnd: Round, group_size: int) -> torch.Tensor:
    """[groups] bool: groups whose samples did not all score alike (rewards, and SIM when counted),
    the ones with a non-zero advantage somewhere."""

    def varies(values):
        """[groups] bool: groups whose `values` ([N]) are not all equal."""
        groups = values.view(-1, group_size)  # [groups, G]
        return (groups != groups[:, :1]).any(dim=1)

    flags = varies(rnd.rewards)
    if rnd.sims is not None:
        flags = flags | varies(rnd.sims)
    return flags


def pick_groups(flags: list, want: int) -> tuple[list, int]:
    """Which groups a step trains on, from each round's `informative` flags ([groups] bool each, in
    round order): the first `want` informative groups, then, if there are fewer, the first dropped
    ones to keep the batch's shape. Returns ([(round, group, trained)] of length `want` in that
    order, the number of informative groups kept)."""
    groups = [(r, g) for r, f in enumerate(flags) for g in range(len(f))]  # (round, group)
    good = [(r, g, True) for r, g in groups if flags[r][g]]
    dropped = [(r, g, False) for r, g in groups if not flags[r][g]]
    good = good[:want]
    fill = dropped[: want - len(good)]
    return good + fill, len(good)


def merge_rounds(rounds: list, picks: list, group_size: int) -> Round:
    """One Round of the picked groups (`pick_groups`), rows group by group in pick order, tokens
    cut to the longest response kept; `keep` marks the rows of trained groups. Seconds add up."""
    start = [0]  # each round's first row in all rounds' rows
    for rnd in rounds:
        start.append(start[-1] + len(rnd.items))
    order = []  # (round, row in that round) of each row kept
    for r, g, _ in picks:
        order += [(r, i) for i in range(g * group_size, (g + 1) * group_size)]
    every = cat_rollouts([rnd.roll for rnd in rounds])  # all rounds' rows, padded to the longest
    index = torch.tensor([start[r] + i for r, i in order], device=every.tokens.device)
    T = max(1, int(every.lengths[index].max()))
    roll = Rollout(
        every.tokens[index, :T],
        every.lengths[index],
        every.logprobs[index, :T],
        every.finished[index],
    )

    def take(name):
        """The rows kept of the rounds' field `name`, as a list."""
        return [getattr(rounds[r], name)[i] for r, i in order]

    guard = None
    if rounds[0].guard is not None:
        guard = take("guard")
    sims = None
    if rounds[0].sims is not None:
        sims = torch.stack(take("sims"))
    keep = torch.tensor([trained for _, _, trained in picks for _ in range(group_size)])
    seconds = {phase: sum(rnd.seconds[phase] for rnd in rounds) for phase in rounds[0].seconds}
    return Round(
        items=take("items"),
        roll=roll,
        audios=take("audios"),
        scores=take("scores"),
        seconds=seconds,
        rewards=torch.stack(take("rewards")),
        guard=guard,
        sims=sims,
        keep=keep,
    )


def refill(first: Round, cfg, d, more) -> tuple[Round, dict]:
    """Dynamic sampling (DAPO) after a step's first round: while some rank has fewer informative
    groups than prompts, every rank runs another round, more(r) for r = 1, 2, ... (the trainer's
    round on data.refill_examples' prompts), at most cfg.max_refill_rounds; every rank runs each
    round, as FSDP's rollouts are collectives. The step then trains on the first informative
    groups, padded with dropped ones that the update masks out (and says so on stderr).
    Returns (the merged round, dyn_ metrics over all ranks: rounds run, groups kept, rollouts
    generated per kept group)."""
    G = cfg.group_size
    want = cfg.prompts_per_step // d.world  # groups this rank trains on
    rounds = [first]

    def missing():
        """Groups still wanted on the rank that wants the most (a collective, outside any
        together block)."""
        have = sum(int(informative(r, G).sum()) for r in rounds)
        wanted = torch.tensor([float(max(want - have, 0))], device=d.device)
        return d.all_reduce(wanted, op="max").item()

    while len(rounds) <= cfg.max_refill_rounds and missing() > 0:
        rounds.append(more(len(rounds)))
    picks, kept = pick_groups([informative(r, G) for r in rounds], want)
    generated = sum(len(r.items) for r in rounds)  # this rank's rollouts over all rounds
    counts = torch.tensor([float(kept), float(generated)], device=d.device)
    kept_all, rollouts = d.all_reduce(counts).tolist()
    if kept_all < cfg.prompts_per_step and d.rank == 0:
        print(
            f"--dynamic-sampling: {kept_all:.0f} of {cfg.prompts_per_step} groups informative "
            f"after {len(rounds) - 1} refill rounds (--max-refill-rounds "
            f"{cfg.max_refill_rounds}); the step trains on those",
            file=sys.stderr,
            flush=True,
        )
    metrics = {
        "dyn_rounds": len(rounds),
        "dyn_groups_kept": kept_all,
        "dyn_rollouts_per_kept_group": rollouts / max(kept_all, 1),
    }
    return merge_rounds(rounds, picks, G), metrics


class TooManySkipped(FloatingPointError):
    """--max-skipped-steps steps in a row had a non-finite gradient norm or loss: the run stops."""


@dataclass
class Skips:
    """Steps skipped for a non-finite gradient norm or loss (update.update_policy's `skipped`, alike
    on every rank), in all and in a row: trainer state, so a resumed run counts on exactly."""

    total: int = 0
    in_row: int = 0

    def count(self, step: int, stats: dict, rank: int):
        """Count step `step` (0-based) from its update's stats; a skipped one is said on stderr."""
        if not stats["skipped"]:
            self.in_row = 0
            return
        self.total += 1
        self.in_row += 1
        if rank == 0:
            print(
                f"grpo.py: step {step + 1} skipped: non-finite gradient norm "
                f"({stats['grad_norm']}) or loss ({stats['loss']}); no optimizer step, gradients "
                f"dropped ({self.in_row} in a row, {self.total} in all)",
                file=sys.stderr,
                flush=True,
            )

    def check(self, step: int, limit: int):
        """TooManySkipped once `limit` steps in a row were skipped, step `step` (0-based) the last
        (0: never)."""
        if limit and self.in_row >= limit:
            raise TooManySkipped(
                f"step {step + 1}: {self.in_row} steps in a row skipped for a non-finite gradient "
                f"norm or loss (--max-skipped-steps {limit}); the run stops, its last checkpoint "
                "is whole. Try a lower --lr, a smaller --grad-clip or more --warmup-steps, and "
                "check these steps' data (metrics.jsonl, samples/); bf16 autocast (CUDA) may "
                "overflow"
            )
