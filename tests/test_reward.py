"""reward.py: the reward formula, the character error rate, the evaluation table's normalization."""

import itertools
import math

import pytest

from reward import (
    RewardConfig,
    char_error_rate,
    normalize_text,
    seed_tts_normalize,
    table_error_rate,
    tts_reward,
)


def test_tts_reward_known_values():
    assert tts_reward(0.0, 0.0) == 1.0
    # U_cer = 1 - tanh(0.3) = 0.7086873, U_nll = exp(-1/3) = 0.7165313;
    # 1 / (0.6 / U_cer + 0.4 / U_nll)
    assert tts_reward(0.1, 1.0) == pytest.approx(0.7118043, abs=1e-6)
    # U_cer = 1 - tanh(0.5) = 0.5378828, U_nll = exp(-3/2) = 0.2231302;
    # (1 + 3) / (1 / U_cer + 3 / U_nll)
    assert tts_reward(
        0.25, 3.0, beta_c=2.0, tau_n=2.0, lambda_c=1.0, lambda_n=3.0
    ) == pytest.approx(0.2613660, abs=1e-6)
    # weight 0: NLL ignored
    assert tts_reward(0.2, 5.0, lambda_n=0.0) == pytest.approx(1 - math.tanh(0.6))
    assert tts_reward(1e6, 0.5) == 0.0  # U_cer underflows to 0: reward 0, no division by zero
    assert tts_reward(0.0, math.inf) == 0.0
    assert tts_reward(0.0, 0.0, **vars(RewardConfig(beta_c=1.0))) == 1.0


def test_tts_reward_decreases_with_cer_and_nll():
    grid = [0.0, 0.05, 0.2, 0.5, 1.0, 2.0]
    for x in grid:
        by_cer = [tts_reward(c, x) for c in grid]
        by_nll = [tts_reward(x, n) for n in grid]
        assert all(a > b for a, b in itertools.pairwise(by_cer))
        assert all(a > b for a, b in itertools.pairwise(by_nll))
        assert all(0.0 <= r <= 1.0 for r in by_cer + by_nll)


def test_tts_reward_rejects_bad_values():
    for cer, nll, bad in [
        (math.nan, 1.0, "nan"),
        (-0.1, 1.0, "-0.1"),
        (0.1, -2.0, "-2.0"),
        (0.1, math.nan, "nan"),
    ]:
        with pytest.raises(ValueError, match=bad):
            tts_reward(cer, nll)
    with pytest.raises(ValueError, match="tau_n"):
        tts_reward(0.1, 1.0, tau_n=0.0)
    with pytest.raises(ValueError, match="lambda_c"):
        RewardConfig(lambda_c=-1.0)


def test_char_error_rate():
    assert char_error_rate("Hello, World!", "hello world") == 0.0  # case and punctuation
    assert char_error_rate("안녕 하세요", "안녕하세요") == 0.0  # Korean spacing
    assert char_error_rate("The cat.", "") == 1.0  # nothing said: all deleted, never 0
    assert char_error_rate("The cat.", " ... ") == 1.0
    assert char_error_rate("abcd", "abxd") == 0.25  # one substitution in 4 characters
    # a deletion and a substitution
    assert char_error_rate("hello world", "helo wor1d") == pytest.approx(2 / 10)
    assert char_error_rate("Hello", "hello", normalize=False) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="no characters"):
        char_error_rate("?!", "anything")


def test_cer_normalizer_keeps_marks_across_scripts():
    # Whisper's annotations
    assert normalize_text("Hello, World! [music] (laughs) <i>Ok</i>.") == "helloworldok"
    assert normalize_text("안녕 하세요!") == "안녕하세요"
    assert normalize_text("你好，世界。") == "你好世界"
    assert normalize_text("ＡＢＣ１２３") == "abc123"  # NFKC: full-width letters and digits
    # Combining marks (category M) are letters: Whisper's BasicTextNormalizer made them spaces.
    assert normalize_text("नमस्ते दुनिया") == "नमस्तेदुनिया"
    assert normalize_text("สวัสดี ครับ") == "สวัสดีครับ"
    # one matra (े) missing
    assert char_error_rate("नमस्ते दुनिया", "नमस्त दुनिया") == pytest.approx(1 / 12)
    # the virama (्) missing
    assert char_error_rate("नमस्ते दुनिया", "नमसते दुनिया") == pytest.approx(1 / 12)
    # three Thai vowel signs missing
    assert char_error_rate("สวัสดีครับ", "สวสดครบ") == pytest.approx(3 / 10)
    assert char_error_rate("你好，世界。", "你好世界") == 0.0
    assert char_error_rate("你好世界", "你好世") == 0.25
    assert char_error_rate("안녕하세요", "안녕하세오") == 0.2


def test_seed_tts_normalize_deletes_punctuation_as_run_wer():
    """run_wer.py deletes punctuation (replace(x, '')) rather than making it a space; the ASCII
    apostrophe alone stays."""
    assert table_error_rate("a well-known man", "a wellknown man", "en") == ("wer", 0.0)
    assert seed_tts_normalize("Hello,world", "en") == "helloworld"
    assert table_error_rate("don’t", "dont", "en") == ("wer", 0.0)  # ’ deleted, as in zhon's list
    assert table_error_rate("I don’t know", "I don't know", "en") == ("wer", pytest.approx(1 / 3))
    assert seed_tts_normalize("“Hello,” she said… (twice)!", "en") == "hello she said twice"
    # fullwidth punctuation deleted, letters kept
    assert seed_tts_normalize("5＋3＝8～ｏｋ？", "en") == "538ｏｋ"
    assert (
        seed_tts_normalize("你好，世界！「测试」……（好）《书》、", "zh")
        == "你 好 世 界 测 试 好 书"
    )
    assert table_error_rate("你好，世界。", "你好世界", "zh") == ("cer", 0.0)
    # CER languages keep case, as run_wer.py's zh
    assert seed_tts_normalize("AI 很好", "zh") == "A I 很 好"
    # every WER language lowercased
    assert seed_tts_normalize("Guten  Tag, Welt", "de") == "guten tag welt"
