"""batch.py: a step's rounds, the rewards trained on, and dynamic sampling's choice of groups."""

import types

import torch

import batch
import parallel
from reward import Score
from sample import Rollout


def _round(rewards, tag, sims=None, G=2):
    """A Round of len(rewards) rows whose tokens say where they came from (tag * 100 + row)."""
    n = len(rewards)
    lengths = torch.tensor([1 + (i % 3) for i in range(n)])
    tokens = torch.zeros(n, 4, dtype=torch.long)
    for i in range(n):
        tokens[i, : lengths[i]] = tag * 100 + i
    roll = Rollout(tokens, lengths, tokens.float() / 1000, torch.ones(n, dtype=torch.bool))
    return batch.Round(
        [f"{tag}:{i // G}" for i in range(n)],
        roll,
        [f"audio {tag}:{i}" for i in range(n)],
        [Score(reward=r) for r in rewards],
        {"rollout": 1.0, "codec": 2.0, "reward": 3.0},
        torch.tensor(rewards),
        None,
        None if sims is None else torch.tensor(sims),
    )


def test_informative_groups_by_hand():
    rnd = _round([0.5, 0.5, 0.1, 0.9, 0.0, 0.0], 0)
    assert batch.informative(rnd, 2).tolist() == [False, True, False]
    # with --sim-weight, a group of equal rewards but different similarities still teaches
    rnd = _round([0.5, 0.5, 0.1, 0.9, 0.0, 0.0], 0, sims=[0.2, 0.2, 0.3, 0.3, 0.1, 0.4])
    assert batch.informative(rnd, 2).tolist() == [False, True, True]


def test_pick_groups_takes_informative_groups_first_then_fills():
    flags = [torch.tensor([False, True, False]), torch.tensor([True, False, True])]
    assert batch.pick_groups(flags, 3) == ([(0, 1, True), (1, 0, True), (1, 2, True)], 3)
    assert batch.pick_groups(flags, 2) == ([(0, 1, True), (1, 0, True)], 2)
    short = [torch.tensor([False, True, False])]
    assert batch.pick_groups(short, 3) == ([(0, 1, True), (0, 0, False), (0, 2, False)], 1)


def test_merge_rounds_by_hand():
    a, b = _round([0.5, 0.5, 0.1, 0.9], 1), _round([0.3, 0.7, 0.2, 0.2], 2)
    merged = batch.merge_rounds([a, b], [(0, 1, True), (1, 0, True), (1, 1, False)], 2)
    assert merged.items == ["1:1", "1:1", "2:0", "2:0", "2:1", "2:1"]
    assert merged.roll.tokens[:, 0].tolist() == [102, 103, 200, 201, 202, 203]
    assert merged.roll.lengths.tolist() == [3, 1, 1, 2, 3, 1]
    assert merged.roll.tokens.shape[1] == 3
    assert torch.equal(merged.roll.logprobs, merged.roll.tokens.float() / 1000)
    assert torch.equal(merged.rewards, torch.tensor([0.1, 0.9, 0.3, 0.7, 0.2, 0.2]))
    assert merged.audios[2] == "audio 2:0"
    assert merged.keep.tolist() == [True, True, True, True, False, False]
    assert merged.seconds == {"rollout": 2.0, "codec": 4.0, "reward": 6.0}


def test_refill_runs_rounds_until_full_or_out_of_rounds(capsys):
    cfg = types.SimpleNamespace(group_size=2, prompts_per_step=3, max_refill_rounds=3)
    flat = [0.5, 0.5, 0.5, 0.5, 0.1, 0.9]  # one informative group of three
    asked = []

    def more(r):
        asked.append(r)
        return _round(flat, r)

    merged, dyn = batch.refill(_round(flat, 0), cfg, parallel.Dist(), more)
    assert asked == [1, 2]
    assert dyn == {
        "dyn_rounds": 3,
        "dyn_groups_kept": 3,
        "dyn_rollouts_per_kept_group": 6.0,
    }
    assert merged.keep.all()
    assert merged.roll.tokens[::2, 0].tolist() == [4, 104, 204]
    cfg.max_refill_rounds = 1  # then the step trains on what there is, and says so
    merged, dyn = batch.refill(_round(flat, 0), cfg, parallel.Dist(), more)
    assert dyn["dyn_rounds"] == 2
    assert dyn["dyn_groups_kept"] == 2
    assert merged.keep.tolist() == [True, True, True, True, False, False]
    assert "2 of 3 groups informative after 1 refill rounds" in capsys.readouterr().err
    cfg.max_refill_rounds = 0  # no refill at all: the first round as it is, its flat groups masked
    merged, dyn = batch.refill(
        _round([0.1, 0.9, 0.5, 0.5, 0.2, 0.3], 0), cfg, parallel.Dist(), more
    )
    assert dyn["dyn_rounds"] == 1
    assert merged.keep.tolist() == [True, True, True, True, False, False]
