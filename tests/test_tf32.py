"""tf32.py: TF32 on or off for a block, and the process's settings as they were after it, whichever
of torch's two APIs the process used (transformers' enable_tf32 uses the new one)."""

import contextlib

import pytest
import torch
from transformers.utils import import_utils

import tf32

pytestmark = pytest.mark.skipif(not tf32.NEW_API, reason="torch < 2.9 has only the legacy switches")
# transformers' enable_tf32 without its lru_cache (a second call with one flag would do nothing)
enable_tf32 = getattr(import_utils.enable_tf32, "__wrapped__", import_utils.enable_tf32)
KEYS = [("generic", "all")] + [
    (b, o) for b in ("cuda", "mkldnn") for o in ("all", "matmul", "conv", "rnn")
]


def legacy() -> list:
    """What torch's legacy getters answer (raising once the new API set a state they can't tell)."""
    out = []
    for get in (
        torch.get_float32_matmul_precision,
        lambda: torch.backends.cuda.matmul.allow_tf32,
        lambda: torch.backends.cudnn.allow_tf32,
    ):
        try:
            out.append(get())
        except RuntimeError:
            out.append("raises")
    return out


def state() -> tuple:
    return {k: tf32._get(k) for k in KEYS}, legacy()


@pytest.fixture
def clean():
    """torch's defaults before and after the test (each test here changes process-wide settings)."""

    def reset():
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
        for key in KEYS:
            tf32._set(key, "none")
        torch.backends.cudnn.allow_tf32 = True  # cuDNN's TF32 convolutions, torch's default

    reset()
    yield
    reset()


SETUPS = {
    "defaults": lambda: None,
    "enable_tf32": lambda: enable_tf32(True),
    "enable_tf32_off": lambda: enable_tf32(False),
    "legacy_high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy_cudnn_off": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "mkldnn_bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_fp32_math_sets_the_block_and_restores_what_the_process_had(clean, setup):
    """Inside: CUDA's matmuls and convolutions in TF32 or IEEE as asked, oneDNN's in IEEE; after:
    every (backend, op) computes as before, and the legacy getters answer as before (or raise as
    before: after enable_tf32 they raise, and must not start raising otherwise)."""
    SETUPS[setup]()
    before = state()
    for cuda_tf32 in (True, False):
        with tf32.fp32_math(cuda_tf32):
            inside = {k: tf32._computes_in(k) for k in tf32.OPS}
        cuda = "tf32" if cuda_tf32 else "ieee"
        assert inside == {
            ("cuda", "matmul"): cuda,
            ("cuda", "conv"): cuda,
            ("mkldnn", "matmul"): "ieee",
            ("mkldnn", "conv"): "ieee",
        }, (setup, cuda_tf32)
        assert state() == before, (setup, cuda_tf32)


def test_fp32_math_keeps_an_inherited_setting_inherited(clean):
    """After enable_tf32(True) (generic "tf32"), oneDNN's matmul inherits; a block that set it to
    IEEE puts back "none", not "tf32": a later enable_tf32(False) still reaches it."""
    enable_tf32(True)
    with tf32.fp32_math(cuda_tf32=False):
        assert tf32._get(("mkldnn", "matmul")) == "ieee"
    assert tf32._get(("mkldnn", "matmul")) == "tf32"
    enable_tf32(False)
    assert tf32._get(("mkldnn", "matmul")) == "ieee"


def test_fp32_math_restores_after_an_error(clean):
    enable_tf32(True)
    before = state()
    with contextlib.suppress(KeyError), tf32.fp32_math(cuda_tf32=False):
        raise KeyError("in the block")
    assert state() == before
