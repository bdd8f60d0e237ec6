"""Writes tests/ecapa_golden.safetensors, the reference answer that tests/test_speaker.py checks
speaker.py's WavLM + ECAPA-TDNN against. Not a test, and not run by the test suite: it needs the
reference code, which the project does not ship.

The reference is Seed-TTS-eval's SIM model as its verification.py builds it: ECAPA_TDNN
(thirdparty/UniSpeech/downstreams/speaker_verification/models/ecapa_tdnn.py) over the WavLM that
torch.hub.load('s3prl/s3prl', 'wavlm_large') returns (s3prl/upstream/wavlm/expert.py, WavLM.py,
modules.py, with s3prl/upstream/interfaces.py for its hidden-state hooks), here at tiny sizes
(WavLM: 2 layers of width 32, a 7-layer conv front end of width 24 with WavLM's kernels and
strides, layer-norm front end, pre-LN, normalized input as WavLM-large; ECAPA: channels 16,
embedding 8, feat_dim 32; its 1536-channel pooling is fixed in the reference) and seeded random
weights. Every tensor of the state dict is perturbed (so that a key mapped wrongly cannot pass on
a default value such as a LayerNorm's 1 and 0) and rounded to float16, then run in float32: the
file stores the weights in float16 exactly, 1.3 MB instead of 2.3.

It stores: `checkpoint.<key>`, the reference model's state dict (the layout of
wavlm_large_finetune.pth's state_dict['model']: `feature_extract.model.*` for WavLM, the ECAPA
head's own keys); two clips `wav0` (1.0 s) and `wav1` (2.1 s, over 80 frames so that WavLM's
log-spaced relative-position buckets are used); for each clip, as verification.py runs it (one
clip, batch 1), `hidden<i>` (the stacked hidden_states the head receives, [L, T, D]) and
`emb<i>` (the embedding, [8]).

Usage (Python with torch and safetensors; torchaudio is stubbed, only its fbank path needs it):
    python tests/make_ecapa_golden.py --seed-tts-eval DIR --s3prl DIR [--out FILE]
DIR: checkouts of github.com/BytedanceSpeech/seed-tts-eval (made at 752f4297) and
github.com/s3prl/s3prl (made at ec8064b5).
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import types

import torch
from safetensors.torch import save_file

TINY_WAVLM = {
    "extractor_mode": "layer_norm",
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4,
    "conv_feature_layers": "[(24,10,5)] + [(24,3,2)] * 4 + [(24,2,2)] * 2",
    "conv_bias": False,
    "layer_norm_first": True,
    "normalize": True,
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
}


def package(name, path):
    module = types.ModuleType(name)
    # a package whose __init__ is not run (s3prl's imports its downloaders)
    module.__path__ = [path]
    sys.modules[name] = module
    return module


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed-tts-eval", required=True)
    parser.add_argument("--s3prl", required=True)
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "ecapa_golden.safetensors"
        ),
    )
    args = parser.parse_args()
    torchaudio = types.ModuleType("torchaudio")
    torchaudio.transforms = types.ModuleType("torchaudio.transforms")
    sys.modules.update({"torchaudio": torchaudio, "torchaudio.transforms": torchaudio.transforms})
    root = os.path.join(args.s3prl, "s3prl")
    package("s3prl", root)
    package("s3prl.upstream", os.path.join(root, "upstream"))
    package("s3prl.upstream.wavlm", os.path.join(root, "upstream", "wavlm"))
    package("s3prl.utility", os.path.join(root, "utility"))
    sys.modules["s3prl.utility.helper"] = types.SimpleNamespace(show=print)
    expert = importlib.import_module("s3prl.upstream.wavlm.expert")
    ecapa = load_file(
        "ecapa_tdnn",
        os.path.join(
            args.seed_tts_eval,
            "thirdparty/UniSpeech/downstreams/speaker_verification/models/ecapa_tdnn.py",
        ),
    )

    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    upstream = os.path.join(folder, "wavlm_tiny.pt")
    wavlm = expert.WavLM(expert.WavLMConfig(TINY_WAVLM))
    torch.save({"cfg": TINY_WAVLM, "model": wavlm.state_dict()}, upstream)
    # what s3prl's hub gives
    torch.hub.load = lambda repo, name, *a, **k: expert.UpstreamExpert(upstream)
    model = ecapa.ECAPA_TDNN(feat_dim=32, channels=16, emb_dim=8, feat_type="wavlm_large")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            scale = 0.1 * float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 0.1
            t.add_(scale * torch.randn(t.shape, generator=generator))
            if name.endswith("running_var") or name.endswith("weight_g"):
                t.abs_().add_(0.1)
            t.copy_(t.half().float())
    model.eval()
    hidden = []
    call = type(model.feature_extract).__call__  # UpstreamBase.__call__ adds hidden_states

    def recording_call(self, wavs, *a, **k):
        result = call(self, wavs, *a, **k)
        hidden.append(torch.stack(result["hidden_states"])[:, 0])
        return result

    type(model.feature_extract).__call__ = recording_call
    tensors = {
        f"checkpoint.{k}": (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    for i, seconds in enumerate([1.0, 2.1]):
        n = int(seconds * 16000)
        t = torch.arange(n) / 16000
        wav = 0.2 * torch.sin(2 * torch.pi * (150 + 50 * i) * t) + 0.05 * torch.randn(
            n, generator=generator
        )
        wav = wav.half().float()
        with torch.no_grad():
            emb = model(wav[None])[0]  # one clip at a time, as verification.py
        tensors.update(
            {f"wav{i}": wav.half(), f"hidden{i}": hidden[-1].contiguous(), f"emb{i}": emb}
        )
        print(f"wav{i}: {n} samples, hidden {tuple(hidden[-1].shape)}, emb {emb.tolist()}")
    save_file(
        tensors,
        args.out,
        metadata={
            "made_by": "tests/make_ecapa_golden.py",
            "wavlm_cfg": repr(TINY_WAVLM),
            "ecapa": "ECAPA_TDNN(feat_dim=32, channels=16, emb_dim=8, feat_type='wavlm_large')",
        },
    )
    print(
        f"wrote {args.out}: {os.path.getsize(args.out)} bytes, "
        f"{sum(v.numel() for k, v in tensors.items() if k.startswith('checkpoint.'))} weights"
    )


if __name__ == "__main__":
    main()
