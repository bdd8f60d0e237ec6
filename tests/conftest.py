"""Shared fixtures of the test files under tests/.

The autouse `one_thread` fixture is defined in helpers.py (test_grpo.py at the root registers it
too); helpers.py also holds what is not a fixture: the repository root, $TEST_ASSETS (default
../shared/assets relative to the repository root), noise, the HF references, tiny trainer runs.
"""

import pytest

import helpers

one_thread = helpers.one_thread  # autouse, module scope: applies to every test module under tests/


REWARD_MODULE = """
import time
import zlib
import numpy as np

def peak(audio, text):
    if text == "boom":
        raise ValueError("boom from the user's reward")
    if text == "sleep":
        time.sleep(60)
    if text == "exit":
        raise SystemExit(3)
    if text == "empty?":
        return 0.75 if audio.shape == (0,) and audio.dtype == np.float32 else 0.0
    return float("nan") if text == "nan" else float(np.abs(audio).max())
"""


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_reward")
    (folder / "user_reward_mod.py").write_text(REWARD_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))  # the spawned worker inherits sys.path
        yield "user_reward_mod:peak"
