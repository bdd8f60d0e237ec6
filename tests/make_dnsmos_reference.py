"""Writes tests/dnsmos_reference.json and tests/dnsmos_mel_reference.npz, the reference answers that
tests/test_dnsmos.py checks dnsmos.py against. Not a test, and not run by the test suite: it needs
librosa, which the project does not install (dnsmos.py computes the mel spectrogram in numpy).

The reference is the `speechmos` package's own DNSMOS (speechmos/dnsmos.py: `run(audio, 16000)`,
model_type "dnsmos" and "dnsmos_personalized"), itself Microsoft's dnsmos_local.py: librosa's
mel spectrogram, onnxruntime, the models that speechmos ships. Each clip of the shared assets
(speech/clips.jsonl: clean, noisy at 0 dB SNR, silence) is read as float32 with soundfile and
scored whole.

It stores, in the json: `made_with` (the versions), and per clip file name, `plain` and
`personalized`, each {"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"} (speechmos's
sig_mos, bak_mos, ovrl_mos, p808_mos; P.808 does not depend on the personalized flag); and
`long`: `clips` (file names) and `plain`, the scores of those clips concatenated (19.75 s, long
enough to reach the windows that the reference skips, see dnsmos._windows). In the
npz: `pcm` (0.5 s of clean_00.wav from 1.0 s on, int16; the audio is pcm / 32768) and `mel`
(speechmos's DNSMOS.audio_melspec of that audio: the P.808 model's input features, [50, 120]
float32).

Usage (a Python with speechmos, onnxruntime, librosa, soundfile, e.g. a scratch venv):
    python tests/make_dnsmos_reference.py [--assets DIR]
Made with speechmos 0.0.1.1, onnxruntime 1.32.0, librosa 0.11.0, numpy 2.4.6.
"""

import argparse
import json
import os
from importlib import metadata

import librosa
import numpy as np
import onnxruntime
import soundfile as sf
import speechmos
from speechmos import dnsmos

TESTS = os.path.dirname(os.path.abspath(__file__))
KEYS = {
    "sig_mos": "dnsmos_sig",
    "bak_mos": "dnsmos_bak",
    "ovrl_mos": "dnsmos_ovrl",
    "p808_mos": "dnsmos_p808",
}
LONG = ("clean_00.wav", "clean_02.wav", "clean_03.wav", "clean_05.wav", "noisy_00.wav")  # 19.75 s


def score(audio, model_type):
    """speechmos's scores of one clip, under this project's names, as plain floats."""
    got = dnsmos.run(audio, 16000, model_type=model_type)
    return {ours: float(got[theirs]) for theirs, ours in KEYS.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", default=os.path.join(TESTS, "..", "..", "shared", "assets"))
    args = parser.parse_args()
    speech = os.path.join(args.assets, "speech")
    with open(os.path.join(speech, "clips.jsonl")) as f:
        names = [json.loads(line)["wav"] for line in f if line.strip()]
    versions = {
        "speechmos": metadata.version("speechmos"),
        "onnxruntime": onnxruntime.__version__,
        "librosa": librosa.__version__,
        "numpy": np.__version__,
    }
    assert os.path.isdir(os.path.join(os.path.dirname(speechmos.__file__), "dnsmos_models"))
    out = {
        "made_with": f"tests/make_dnsmos_reference.py: speechmos.dnsmos.run, {versions}",
        "clips": {},
    }
    for name in names:
        audio, sr = sf.read(os.path.join(speech, name), dtype="float32")
        assert sr == 16000, (name, sr)
        out["clips"][name] = {
            "plain": score(audio, "dnsmos"),
            "personalized": score(audio, "dnsmos_personalized"),
        }
        print(name, out["clips"][name]["plain"])
    # Over 17 s: windows starting at 7 s and later, which the reference's rounding skips.
    audio = np.concatenate(
        [sf.read(os.path.join(speech, name), dtype="float32")[0] for name in LONG]
    )
    out["long"] = {"clips": list(LONG), "plain": score(audio, "dnsmos")}
    print("long", out["long"]["plain"])
    with open(os.path.join(TESTS, "dnsmos_reference.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    pcm, _ = sf.read(os.path.join(speech, "clean_00.wav"), dtype="int16")
    pcm = pcm[16000:24000]  # 0.5 s of speech, exact as int16 (the file is 16-bit PCM)
    mel = dnsmos.DNSMOS.audio_melspec(None, pcm.astype(np.float32) / 32768)  # uses no state of self
    np.savez_compressed(
        os.path.join(TESTS, "dnsmos_mel_reference.npz"), pcm=pcm, mel=mel.astype(np.float32)
    )


if __name__ == "__main__":
    main()
