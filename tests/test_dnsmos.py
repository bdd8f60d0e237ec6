"""dnsmos.py: the mel features against librosa's, the scores against speechmos's own DNSMOS on the
shared spoken clips (tests/dnsmos_reference.json, made by tests/make_dnsmos_reference.py), clean
above noisy, the reference's windows, and the one-line error without the packages."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf

import dnsmos
from helpers import ASSETS, TESTS

SPEECH = os.path.join(ASSETS, "speech")
with open(os.path.join(TESTS, "dnsmos_reference.json")) as _f:
    REFERENCE = json.load(_f)
TOLERANCE = {"dnsmos_sig": 0.02, "dnsmos_bak": 0.02, "dnsmos_ovrl": 0.02, "dnsmos_p808": 0.05}


def clip(name):
    """A shared spoken clip as float32 [S] at 16 kHz; skips the test where the assets are absent."""
    path = os.path.join(SPEECH, name)
    if not os.path.exists(path):
        pytest.skip(f"no spoken clip at {path} (set TEST_ASSETS to the shared assets folder)")
    audio, sr = sf.read(path, dtype="float32")
    assert sr == dnsmos.SAMPLE_RATE
    return audio


@pytest.fixture(scope="module")
def scorer():
    for name in ("speechmos", "onnxruntime"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"DNSMOS needs {name}: {dnsmos.INSTALL}")
    return dnsmos.DNSMOS(threads=1)  # the tests' one-thread rule (helpers.one_thread)


def assert_close(got, want):
    assert set(got) == set(dnsmos.KEYS), got
    assert all(type(v) is float for v in got.values()), got
    off = {
        k: round(got[k] - want[k], 4) for k in dnsmos.KEYS if abs(got[k] - want[k]) > TOLERANCE[k]
    }
    assert not off, f"off the reference by {off}"


def test_mel_features_equal_librosa():
    # librosa's melspectrogram + power_to_db(ref=max) + (x + 40) / 40, as speechmos computes the
    # P.808 model's input, on 0.5 s of speech (measured: within 3e-7; a wrong window, filterbank
    # or dB floor is off by far more).
    stored = np.load(os.path.join(TESTS, "dnsmos_mel_reference.npz"))
    mel = dnsmos.mel_features(stored["pcm"].astype(np.float32) / 32768)
    assert mel.shape == stored["mel"].shape == (50, 120)
    np.testing.assert_allclose(mel, stored["mel"], atol=1e-4)
    # librosa's answer for silence: every bin at the 1e-10 floor, 0 dB below the peak: 40 / 40.
    assert np.array_equal(dnsmos.mel_features(np.zeros(1000)), np.ones((7, 120)))
    assert dnsmos.mel_features(np.zeros(dnsmos.WINDOW - dnsmos.MEL_HOP)).shape == (900, 120)


def test_scores_equal_speechmos_and_clean_beats_noisy(scorer):
    # One sentence (4.7 s, doubled to one 9.01 s window: the cheapest), clean and at 0 dB SNR.
    # Measured: within 1e-6 of speechmos on every clip of the reference file.
    clean, noisy = ("clean_02.wav", "noisy_02.wav")
    got = {name: scorer.score(clip(name)) for name in (clean, noisy)}
    for name in (clean, noisy):
        assert_close(got[name], REFERENCE["clips"][name]["plain"])
    for key in dnsmos.KEYS:
        assert got[clean][key] > got[noisy][key], key
    assert got[clean]["dnsmos_ovrl"] > got[noisy]["dnsmos_ovrl"] + 1.0  # 2.9-3.0 against 1.5-1.6


def test_reference_clean_beats_noisy_on_every_sentence():
    # What speechmos says of all four pairs (the test above scores one of them here): the noisy
    # clip is worse on every scale, overall by more than a point.
    clips = REFERENCE["clips"]
    pairs = [name[len("clean_") :] for name in clips if name.startswith("clean_")]
    assert len(pairs) == 4
    for pair in pairs:
        clean, noisy = clips[f"clean_{pair}"]["plain"], clips[f"noisy_{pair}"]["plain"]
        assert all(clean[k] > noisy[k] for k in dnsmos.KEYS), pair
        assert clean["dnsmos_ovrl"] > noisy["dnsmos_ovrl"] + 1.0, pair


def test_long_clip_skips_the_windows_the_reference_skips(scorer):
    # 19.75 s: windows start at 0..9 s, but the reference's float end index int((i + 9.01) * 16000)
    # is one sample short for i = 7, 8, 9 and it drops them; averaging all ten instead is off by
    # 0.14 BAK, 0.06 OVRL, 0.10 P.808.
    long = REFERENCE["long"]
    audio = np.concatenate([clip(name) for name in long["clips"]])
    assert len(list(dnsmos._windows(audio))) == 7
    assert_close(scorer.score(audio), long["plain"])


def test_personalized_model(scorer):  # scorer: skips without the packages
    personalized = dnsmos.DNSMOS(personalized=True, threads=1)
    audio = clip("clean_02.wav")
    want = REFERENCE["clips"]["clean_02.wav"]
    assert_close(personalized.score(audio), want["personalized"])
    # Another model: its BAK differs by a point, so the wrong one cannot pass.
    assert abs(want["personalized"]["dnsmos_bak"] - want["plain"]["dnsmos_bak"]) > 0.5


def test_windows_tile_a_short_clip():
    # 1 s doubles to 2, 4, 8, 16 s: seven windows starting at 0-6 s, all kept (7 s would not be).
    sr = dnsmos.SAMPLE_RATE
    audio = np.random.default_rng(0).uniform(-1, 1, sr).astype(np.float32)
    windows = list(dnsmos._windows(audio))
    assert len(windows) == 7
    tiled = np.tile(audio, 16)
    for i, window in enumerate(windows):
        np.testing.assert_array_equal(window, tiled[i * sr : i * sr + dnsmos.WINDOW])
    assert len(list(dnsmos._windows(audio[: sr // 2]))) == 7  # 0.5 s doubles to the same 16 s


def test_bad_clip_is_a_value_error(scorer):
    for audio in (np.zeros(0, np.float32), np.zeros((2, 16000), np.float32)):
        with pytest.raises(ValueError, match="one non-empty 1-D clip"):
            scorer.score(audio)


@pytest.mark.parametrize("package", ["speechmos", "onnxruntime"])
def test_missing_package_is_one_line_naming_pip(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: import, find_spec fail
    with pytest.raises(ImportError) as caught:
        dnsmos.DNSMOS()
    message = str(caught.value)
    assert "\n" not in message
    assert package in message
    assert "pip install speechmos onnxruntime" in message
