"""prosody.py: pitch, voicing, speaking rate, and the guard's factor; the scorers' prosody fields.
(The guard's toy experiment in training is in test_grpo.py.)"""

import os

import numpy as np
import pytest
import soundfile as sf

import prosody
import scorer as scoring
from helpers import ASSETS, read_jsonl

SR = prosody.SAMPLE_RATE


def harmonic_tone(freq_hz, amplitude=0.3):
    """A voice-like tone with 4 harmonics (1/k amplitudes) following the instantaneous frequency
    freq_hz [S] (Hz per sample): phase = 2 pi cumsum(f) / sr, so glides and vibrato are exact."""
    phase = 2 * np.pi * np.cumsum(np.asarray(freq_hz, dtype=np.float64)) / SR
    return (amplitude * sum(np.sin(k * phase) / k for k in (1, 2, 3, 4))).astype(np.float32)


@pytest.mark.parametrize("f0", [120.0, 220.0])
def test_f0_track_steady_tone(f0):
    f0s, voiced = prosody.f0_track(harmonic_tone(np.full(2 * SR, f0)))
    assert f0s.shape == voiced.shape == (200,)  # one frame per 10 ms hop
    # 0.1%, tighter than integer lags allow (220 Hz is a period of 72.7 samples; lag 73 reads 219.2
    # Hz): this holds only with the parabolic interpolation between lags.
    assert abs(np.median(f0s[voiced]) - f0) < 0.001 * f0
    assert prosody.f0_std_semitones(f0s, voiced) < 0.1
    assert prosody.voiced_frac(voiced) > 0.9
    assert np.all(f0s[~voiced] == 0.0)


@pytest.mark.parametrize("f0", [120.0, 220.0])
def test_f0_median_hz_of_tones(f0):
    f0s, voiced = prosody.f0_track(harmonic_tone(np.full(2 * SR, f0)))
    assert abs(prosody.f0_median_hz(f0s, voiced) - f0) < 0.01 * f0
    # An octave jump over a fifth of the clip (as YIN's octave errors, or a squeak) leaves the
    # median where the voice sits; the mean would move 20% (to 1.2 f0).
    jump = np.concatenate([np.full(8 * SR // 5, f0), np.full(2 * SR // 5, 2 * f0)])
    f0s, voiced = prosody.f0_track(harmonic_tone(jump))
    assert abs(prosody.f0_median_hz(f0s, voiced) - f0) < 0.01 * f0
    assert prosody.f0_median_hz(f0s, np.zeros_like(voiced)) == 0.0  # no voiced frame: no pitch
    assert type(prosody.f0_median_hz(f0s, voiced)) is float


def test_f0_std_vibrato():
    # 150 Hz +/- 1 semitone, sinusoidal at 5 Hz over 2 s (10 whole cycles): pitch in semitones is
    # c + sin(2 pi 5 t), whose standard deviation is 1/sqrt(2) = 0.707 semitones.
    t = np.arange(2 * SR) / SR
    f0s, voiced = prosody.f0_track(harmonic_tone(150.0 * 2 ** (np.sin(2 * np.pi * 5 * t) / 12)))
    assert prosody.voiced_frac(voiced) > 0.9
    assert abs(prosody.f0_std_semitones(f0s, voiced) - 1 / np.sqrt(2)) < 0.3


def test_f0_std_glide():
    # 110 Hz to 220 Hz over 2 s, linear in semitones: pitch uniform over a 12-semitone range, whose
    # standard deviation is 12 / sqrt(12) = 3.46 semitones.
    t = np.arange(2 * SR) / SR
    f0s, voiced = prosody.f0_track(harmonic_tone(110.0 * 2 ** (t / 2)))
    assert prosody.voiced_frac(voiced) > 0.9
    assert abs(prosody.f0_std_semitones(f0s, voiced) - 12 / np.sqrt(12)) < 0.3
    assert f0s[voiced][0] < 0.6 * f0s[voiced][-1]  # it tracks the rise, not one average pitch


def test_f0_track_noise_silence_empty_unvoiced():
    white = (0.1 * np.random.default_rng(0).standard_normal(2 * SR)).astype(np.float32)
    f0s, voiced = prosody.f0_track(white)
    assert prosody.voiced_frac(voiced) < 0.05  # aperiodic: YIN's dip never reaches the threshold
    for audio in (np.zeros(2 * SR, np.float32), np.zeros(0, np.float32)):
        f0s, voiced = prosody.f0_track(audio)
        assert f0s.shape == voiced.shape == (len(audio) // 160,)
        assert prosody.voiced_frac(voiced) == 0.0
        assert prosody.f0_std_semitones(f0s, voiced) == 0.0
        assert prosody.measure(audio, "hello") == {
            "f0_std_semitones": 0.0,
            "voiced_frac": 0.0,
            "chars_per_s": 0.0,
            "f0_median_hz": 0.0,
        }


def test_f0_track_energy_gate():
    # A tone 60 dB below the clip's loudest part is background, not voice: unvoiced though periodic.
    loud = harmonic_tone(np.full(SR, 150.0))
    quiet = harmonic_tone(np.full(SR, 150.0), amplitude=3e-4)
    _, voiced = prosody.f0_track(np.concatenate([loud, quiet]))
    assert voiced[5:95].all()
    assert not voiced[105:].any()
    _, voiced = prosody.f0_track(quiet)  # alone, the same tone is the loudest thing there: voiced
    assert prosody.voiced_frac(voiced) > 0.9


def test_speech_seconds_and_chars_per_s():
    # 0.5 s silence + 1 s tone + 0.7 s silence: 1 s of speech, the silence around it trimmed.
    audio = np.concatenate(
        [np.zeros(SR // 2), harmonic_tone(np.full(SR, 150.0)), np.zeros(7 * SR // 10)]
    ).astype(np.float32)
    assert abs(prosody.speech_seconds(audio) - 1.0) < 0.05
    assert abs(prosody.chars_per_s(12, audio) - 12.0) < 0.6
    # "Hello, world!" normalizes to "helloworld": 10 characters in 1 s.
    assert abs(prosody.measure(audio, "Hello, world!")["chars_per_s"] - 10.0) < 0.5
    # A pause inside the clip is part of the pace: it stays.
    gap = np.concatenate([audio, harmonic_tone(np.full(SR // 2, 150.0))])
    assert abs(prosody.speech_seconds(gap) - 2.2) < 0.05
    assert prosody.speech_seconds(np.zeros(SR, np.float32)) == 0.0
    assert prosody.chars_per_s(10, np.zeros(0, np.float32)) == 0.0


def test_prosody_of_real_speech():
    path = os.path.join(ASSETS, "speech", "clips.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"no spoken clips at {path} (set TEST_ASSETS to the shared assets folder)")
    rows = read_jsonl(path)
    for row in rows:
        audio, sr = sf.read(os.path.join(ASSETS, "speech", row["wav"]), dtype="float32")
        assert sr == SR
        m = prosody.measure(audio, row["text"])
        assert all(type(v) is float for v in m.values()), m
        if row["kind"] == "clean":
            # espeak en-us male voice: its pitch sits near 100 Hz (80-120 Hz seen), voiced about
            # half the time, at 11-15 normalized characters per second; a robot, but not a monotone.
            f0s, voiced = prosody.f0_track(audio)
            assert 80 < prosody.f0_median_hz(f0s, voiced) < 130, row["wav"]
            assert 0.3 < m["voiced_frac"] < 0.9, (row["wav"], m)
            assert 5 < m["chars_per_s"] < 25, (row["wav"], m)
            assert m["f0_std_semitones"] > 0.5, (row["wav"], m)
        elif row["kind"] == "silence":
            assert m == {
                "f0_std_semitones": 0.0,
                "voiced_frac": 0.0,
                "chars_per_s": 0.0,
                "f0_median_hz": 0.0,
            }, row["wav"]
    assert {"clean", "silence"} <= {row["kind"] for row in rows}


def test_scorers_measure_prosody(tmp_path):
    """Every scorer fills the prosody fields of a clip it heard; a refused clip has none."""
    # 2 s at 150 Hz
    tone = (0.3 * np.sin(2 * np.pi * 150 * np.arange(32000) / 16000)).astype(np.float32)
    scorer = scoring.WhisperScorer("random-tiny", "cpu", "en", max_transcript_tokens=4)
    heard, refused = scorer.score([tone, np.full(5, np.nan, np.float32)], ["hello there", "x"])
    expect = prosody.measure(tone, "hello there")
    for name in ("f0_std_semitones", "voiced_frac", "chars_per_s"):
        assert getattr(heard, name) == pytest.approx(expect[name])
        assert getattr(refused, name) is None
    assert heard.voiced_frac > 0.9
    assert heard.f0_std_semitones < 0.1
    assert heard.chars_per_s == pytest.approx(10 / 2.0, rel=0.05)  # "hellothere" over 2 s
    custom = scoring.CustomRewardScorer("test_grpo:short_reward").score([tone], ["hello there"])[0]
    assert custom.chars_per_s == pytest.approx(expect["chars_per_s"])
