"""The per-clip measures beside the reward, and the one guard that can hold any of them.

RL on an ASR reward buys intelligibility with something else: a flattened pitch, rushed speech, a
voice drifting away from its prompt or towards what the recognizer prefers, artefacts. Each such
measure is computed per clip by the scorer (a field of reward.Score), averaged per step into
metrics.jsonl, written per clip to samples.jsonl and per row by eval.py. `--guard NAME[:BAND]`
multiplies a clip's reward by a factor that is 1 while the measure stays within BAND of the initial
policy's median and falls smoothly outside (`guard_factor`).

    MEASURES["chars_per_s"].band     # the default band, in the measure's own units
    parse_guards(["f0_median_hz:15", "sim"]) -> {"f0_median_hz": 15.0, "sim": 0.05}
    guard_factor(value, reference, band, MEASURES[name].sides)
"""

import math
from dataclasses import dataclass

BOTH = "both"  # a move either way is penalized
BELOW = "below"  # only a fall is penalized: more is never worse


@dataclass(frozen=True)
class Measure:
    """One per-clip measure: what it is, its unit, and how the guard holds it."""

    unit: str
    band: float  # the guard's default band, in `unit`
    sides: str  # BOTH or BELOW
    needs_speech: bool  # 0 means no speech (no voiced frame, no duration): the guard gives 0
    source: str  # what computes it, and the flag it needs
    answers: str  # the known failure its guard answers


MEASURES = {
    "chars_per_s": Measure(
        unit="characters per second",
        band=3.0,
        sides=BOTH,
        needs_speech=True,
        source="prosody.py, always",
        answers="speech rushed until words blur (or dragged)",
    ),
    "f0_std_semitones": Measure(
        unit="semitones",
        band=1.5,
        sides=BOTH,
        needs_speech=True,
        source="prosody.py, always",
        answers="prosody flattened to a monotone",
    ),
    "f0_median_hz": Measure(
        unit="Hz",
        band=20.0,
        sides=BOTH,
        needs_speech=True,
        source="prosody.py, always",
        answers="a voice drifting higher (or lower) because the recognizer prefers it",
    ),
    "voiced_frac": Measure(
        unit="fraction of 10 ms frames",
        band=0.1,
        sides=BOTH,
        needs_speech=False,
        source="prosody.py, always",
        answers="whispered or breathy speech (fewer voiced frames)",
    ),
    "sim": Measure(
        unit="cosine",
        band=0.05,
        sides=BELOW,
        needs_speech=False,
        source="speaker.py, with voice prompts and --speaker-model",
        answers="a cloned voice drifting away from its prompt",
    ),
    "dnsmos_sig": Measure(
        unit="MOS (1-5)",
        band=0.3,
        sides=BELOW,
        needs_speech=False,
        source="dnsmos.py, with --quality dnsmos",
        answers="a distorted voice",
    ),
    "dnsmos_bak": Measure(
        unit="MOS (1-5)",
        band=0.3,
        sides=BELOW,
        needs_speech=False,
        source="dnsmos.py, with --quality dnsmos",
        answers="background noise and hiss",
    ),
    "dnsmos_ovrl": Measure(
        unit="MOS (1-5)",
        band=0.3,
        sides=BELOW,
        needs_speech=False,
        source="dnsmos.py, with --quality dnsmos",
        answers="acoustic artefacts of any kind",
    ),
    "dnsmos_p808": Measure(
        unit="MOS (1-5)",
        band=0.3,
        sides=BELOW,
        needs_speech=False,
        source="dnsmos.py, with --quality dnsmos",
        answers="acoustic artefacts (P.808's overall rating)",
    ),
}
DNSMOS_MEASURES = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")


def parse_guards(specs) -> dict:
    """`--guard` values (NAME or NAME:BAND) -> {name: band}, in the order given.
    Raises ValueError naming the spec for an unknown name, a band that is not a positive number,
    or a name given twice."""
    guards = {}
    for spec in specs:
        name, _, band_text = spec.partition(":")
        if name not in MEASURES:
            raise ValueError(
                f"--guard {spec}: unknown measure; expected one of {', '.join(MEASURES)}"
            )
        if name in guards:
            raise ValueError(f"--guard {spec}: {name} is guarded twice")
        band = MEASURES[name].band
        if band_text:
            try:
                band = float(band_text)
            except ValueError:
                band = math.nan
            if not (math.isfinite(band) and band > 0):
                raise ValueError(f"--guard {spec}: the band must be a positive number")
        guards[name] = band
    return guards


def guard_factor(value, reference: float, band: float, sides: str, needs_speech: bool = False):
    """The factor a guard multiplies a clip's reward by: 1 while `value` lies within `band` of
    `reference` (for sides BELOW: above reference - band), then exp(-(x / band)^2), x = how far
    beyond the band's edge (0.37 one band-width beyond it). value None (not measured: a clip that
    could not be heard, a clip without a prompt) keeps 1; with needs_speech, a value <= 0 (no
    speech, no pitch) gives 0."""
    if value is None:
        return 1.0
    if needs_speech and value <= 0:
        return 0.0
    if sides == BELOW:
        beyond = reference - band - value
    else:
        beyond = abs(value - reference) - band
    x = max(0.0, beyond)
    return math.exp(-((x / band) ** 2))


def clip_guard_factor(score, guards: dict, reference: dict) -> float:
    """The product of every guard's factor for one clip (a reward.Score); 1 with no guard."""
    factor = 1.0
    for name, band in guards.items():
        measure = MEASURES[name]
        value = getattr(score, name)
        factor *= guard_factor(value, reference[name], band, measure.sides, measure.needs_speech)
    return factor
