"""loss.py's parts, each alone: the ratios, the dual clip, TIS, k3 and the aggregations.

(The whole objective is tested against verl's code and by hand in test_grpo.py.)
"""

import math

import pytest
import torch

import loss


def test_token_ratio_is_exp_of_the_log_ratio_clamped():
    logp = torch.tensor([[0.5, 30.0, -30.0]])
    old = torch.zeros(1, 3)
    ratio = loss.token_ratio(logp, old)
    expected = torch.tensor([[math.exp(0.5), math.exp(20.0), math.exp(-20.0)]])
    assert torch.allclose(ratio, expected)


def test_sequence_ratio_value_and_gradient():
    # Sequence 0: log-ratios 0.2 and 0.4 over 2 tokens (the third masked): s = exp(0.3).
    logp = torch.tensor([[0.2, 0.4, 9.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    ratio = loss.sequence_ratio(logp, old, mask)
    assert torch.allclose(ratio, torch.full((1, 3), math.exp(0.3)))
    ratio[0, 0].backward()  # the value s, the gradient s * d logp[0, 0] only
    assert logp.grad[0].tolist() == pytest.approx([math.exp(0.3), 0.0, 0.0])


def test_sequence_ratio_cap_stops_a_stale_sequence():
    logp = torch.tensor([[15.0]], requires_grad=True)
    ratio = loss.sequence_ratio(logp, torch.zeros(1, 1), torch.ones(1, 1))
    assert ratio.item() == pytest.approx(math.exp(10.0))
    ratio.sum().backward()
    assert logp.grad.item() == 0.0


def test_dual_clip_bounds_negative_advantages_only():
    pg = torch.tensor([[5.0], [5.0], [1.0]])
    adv = torch.tensor([[-1.0], [1.0], [-1.0]])
    out = loss.dual_clip(pg, adv, clip_ratio_c=3.0)
    assert out.flatten().tolist() == [3.0, 5.0, 1.0]


def test_tis_weights_capped_and_one_off_mask():
    old = torch.tensor([[math.log(4.0), math.log(0.5), 7.0]])
    rollout = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weights, capped = loss.tis_weights(old, rollout, mask, cap=2.0)
    assert weights[0].tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert capped.tolist() == [[True, False, False]]


def test_k3_kl_known_value_and_zero_at_equality():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-0.7, -2.0]])
    kl = loss.k3_kl(logp, ref)
    assert kl[0, 0].item() == pytest.approx(math.exp(0.3) - 0.3 - 1, rel=1e-5)
    assert kl[0, 1].item() == 0.0


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", (1 + 2 + 3) / 3),
        ("seq-mean-token-mean", ((1 + 2) / 2 + 3) / 2),
        ("seq-mean-token-sum-norm", ((1 + 2) / 4 + 3 / 4) / 2),
    ],
)
def test_aggregate_by_hand(agg, expected):
    per_token = torch.tensor([[1.0, 2.0, 0.0, 9.0], [3.0, 0.0, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert loss.aggregate(per_token, mask, agg).item() == pytest.approx(expected)


def test_aggregate_denom_and_norm_len():
    per_token = torch.tensor([[1.0, 2.0]])
    mask = torch.ones(1, 2)
    assert loss.aggregate(per_token, mask, "token-mean", denom=6.0).item() == pytest.approx(0.5)
    value = loss.aggregate(per_token, mask, "seq-mean-token-sum-norm", norm_len=3)
    assert value.item() == pytest.approx(1.0)


def test_masked_mean_of_an_empty_mask_is_zero():
    assert loss.masked_mean(torch.ones(2, 2), torch.zeros(2, 2)).item() == 0.0


def test_unknown_options_refused():
    with pytest.raises(ValueError, match="aggregation"):
        loss.check_loss_options("mean", "token")
    with pytest.raises(ValueError, match="importance level"):
        loss.check_loss_options("token-mean", "seq")
