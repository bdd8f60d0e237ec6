"""measures.py: the registry, --guard's parsing, and the guard factor in each direction."""

import itertools
import math

import pytest

import measures
from reward import Score


def test_every_measure_is_a_score_field():
    fields = set(Score.__dataclass_fields__)
    assert set(measures.MEASURES) <= fields


def test_parse_guards_default_and_given_bands():
    guards = measures.parse_guards(["chars_per_s", "f0_median_hz:15", "sim:0.1"])
    assert guards == {
        "chars_per_s": measures.MEASURES["chars_per_s"].band,
        "f0_median_hz": 15.0,
        "sim": 0.1,
    }
    assert list(guards) == ["chars_per_s", "f0_median_hz", "sim"]  # the order given


@pytest.mark.parametrize(
    "spec, message",
    [
        ("loudness", "--guard loudness: unknown measure"),
        ("sim:0", "--guard sim:0: the band must be a positive number"),
        ("sim:-1", "the band must be a positive number"),
        ("sim:x", "the band must be a positive number"),
        ("sim:nan", "the band must be a positive number"),
    ],
)
def test_parse_guards_refuses_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        measures.parse_guards([spec])


def test_parse_guards_refuses_a_name_twice():
    with pytest.raises(ValueError, match="guarded twice"):
        measures.parse_guards(["sim", "sim:0.1"])


@pytest.mark.parametrize("value", [10.0, 12.9, 7.1])
def test_two_sided_factor_is_one_inside_the_band(value):
    assert measures.guard_factor(value, 10.0, 3.0, measures.BOTH) == 1.0


@pytest.mark.parametrize("value", [16.0, 4.0])  # one band-width beyond either edge
def test_two_sided_factor_falls_on_both_sides(value):
    factor = measures.guard_factor(value, 10.0, 3.0, measures.BOTH)
    assert factor == pytest.approx(math.exp(-1.0))


def test_one_sided_factor_holds_only_a_fall():
    assert measures.guard_factor(4.5, 3.0, 0.3, measures.BELOW) == 1.0  # quality rose: no penalty
    assert measures.guard_factor(2.75, 3.0, 0.3, measures.BELOW) == 1.0  # within the band
    fallen = measures.guard_factor(2.4, 3.0, 0.3, measures.BELOW)  # 0.3 below the edge at 2.7
    assert fallen == pytest.approx(math.exp(-1.0))


def test_factor_falls_smoothly_and_monotonically():
    values = [10.0 + 0.5 * k for k in range(20)]
    factors = [measures.guard_factor(v, 10.0, 3.0, measures.BOTH) for v in values]
    assert all(a >= b for a, b in itertools.pairwise(factors))
    assert factors[-1] < 0.01


def test_unmeasured_clip_keeps_one_and_no_speech_gives_zero():
    assert measures.guard_factor(None, 10.0, 3.0, measures.BOTH, needs_speech=True) == 1.0
    assert measures.guard_factor(0.0, 10.0, 3.0, measures.BOTH, needs_speech=True) == 0.0
    assert measures.guard_factor(0.0, 0.2, 0.05, measures.BELOW) == pytest.approx(
        math.exp(-9.0)
    )  # sim 0 (silence) is a value: three band-widths below the edge


def test_clip_guard_factor_multiplies_the_guards():
    score = Score(reward=1.0, chars_per_s=16.0, sim=0.5)
    guards = {"chars_per_s": 3.0, "sim": 0.05}
    reference = {"chars_per_s": 10.0, "sim": 0.6}
    factor = measures.clip_guard_factor(score, guards, reference)
    assert factor == pytest.approx(math.exp(-1.0) * math.exp(-1.0))
    assert measures.clip_guard_factor(score, {}, {}) == 1.0


def test_sim_guard_holds_only_a_falling_similarity():
    def factor(sim):
        return measures.guard_factor(sim, 0.8, 0.05, measures.BELOW)

    assert factor(None) == 1.0  # no prompt or an error: untouched
    assert factor(0.9) == 1.0  # risen
    assert factor(0.75) == 1.0  # within the band
    assert factor(0.70) == pytest.approx(math.exp(-1))  # one band-width below the edge
    assert factor(0.65) == pytest.approx(math.exp(-4))


def test_a_clip_that_could_not_be_heard_keeps_factor_one():
    guards = {"chars_per_s": 3.0, "f0_std_semitones": 1.5, "sim": 0.05}
    reference = {"chars_per_s": 15.0, "f0_std_semitones": 2.0, "sim": 0.8}
    unheard = Score(reward=0.0, error="bad")
    assert measures.clip_guard_factor(unheard, guards, reference) == 1.0
