"""The TTS reward: pure functions of a clip's CER and NLL, no model (DESIGN.md §2).

reward = weighted harmonic mean of two utilities in [0, 1]:
    U_cer = 1 - tanh(beta_c * cer)      intelligibility of the greedy transcript
    U_nll = exp(-nll / tau_n)           how likely Whisper finds the intended text (nats/token)
The harmonic mean is low when either utility is low, so a clip cannot buy a high reward with a
good NLL while being transcribed wrongly, or the other way round.

The CER compares texts normalized the same way for every script (normalize_text: no case,
punctuation, symbols or spaces; letters, numbers and combining marks kept). Score is what every
scorer answers per clip.
"""

import importlib
import math
import re
import string
import unicodedata
from dataclasses import dataclass, field

import jiwer

# What Whisper's BasicTextNormalizer removes as annotations: "[music]", "<b>", "(laughs)".
_BRACKETED = re.compile(r"[<\[][^>\]]*[>\]]|\([^)]+?\)")


@dataclass(frozen=True)
class RewardConfig:
    """The reward's knobs, passed down from the trainer's config to the Whisper worker.

    Defaults are the seed recipe's (DESIGN.md §4)."""

    beta_c: float = 3.0  # CER sharpness: U_cer(0.1) = 0.71, U_cer(0.5) = 0.09
    tau_n: float = 3.0  # NLL scale in nats/token: U_nll(1.0) = 0.72, U_nll(3.0) = 0.37
    lambda_c: float = 0.6  # weight of U_cer
    lambda_n: float = 0.4  # weight of U_nll

    def __post_init__(self):
        for name in ("beta_c", "tau_n"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("lambda_c", "lambda_n"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
        if self.lambda_c + self.lambda_n <= 0:
            raise ValueError(
                f"lambda_c + lambda_n must be positive, got {self.lambda_c} + {self.lambda_n}"
            )


@dataclass
class Score:
    """What a scorer says of one clip. Every scorer (Whisper, a custom reward, the worker process)
    answers with these, and the trainer averages their numeric fields into its metrics generically
    (grpo.clip_means): a new per-clip measure is a new field here, with no change in grpo.py.

    A clip that could not be heard (bad input, longer than Whisper's window, a failed batch) has
    reward 0 and `error` set; its cer and nll are None and it counts in `error_frac`, not in the
    cer/nll means. Silence is not an error: it is heard, transcribed as "" and scored CER 1."""

    reward: float  # in [0, 1]
    transcript: str = ""  # Whisper's greedy transcript ("" for a custom reward)
    cer: float | None = None  # character error rate, >= 0 (may exceed 1 with insertions)
    nll: float | None = None  # mean teacher-forced cross-entropy of the intended text, nats/token
    error: str | None = None  # why the clip got reward 0 without being scored, else None
    too_long: bool = False  # longer than Whisper's 30 s window: refused (reward 0, error set)
    # Prosody and pacing (prosody.measure), which the reward cannot see; None when not measured:
    # the pitch spread over voiced frames (semitones), the voiced fraction of 10 ms frames, the
    # speaking rate (normalized characters per second of speech, outer silence trimmed) and the
    # voice's median pitch over voiced frames (Hz; 0 with none). Steps report the median of
    # the spread, the rate and the pitch: one near-empty clip has a huge rate.
    f0_std_semitones: float | None = field(default=None, metadata={"agg": "median"})
    voiced_frac: float | None = None
    chars_per_s: float | None = field(default=None, metadata={"agg": "median"})
    f0_median_hz: float | None = field(default=None, metadata={"agg": "median"})
    # Speaker similarity (speaker.py): cosine of the clip's and its voice prompt's speaker
    # embeddings, in [-1, 1]; None without a prompt or a speaker model, and for a clip that could
    # not be heard (error set). Silence (empty, all zeros, too short for the model) is 0.0: no
    # voice, counted.
    sim: float | None = None
    # Speech quality (dnsmos.py, with --quality dnsmos): DNSMOS P.835's signal, background and
    # overall ratings and P.808's, MOS 1-5; None when not measured.
    dnsmos_sig: float | None = None
    dnsmos_bak: float | None = None
    dnsmos_ovrl: float | None = None
    dnsmos_p808: float | None = None
    # The language Whisper transcribed the clip in (the one asked for, else the one it detected);
    # None where no Whisper heard it. outputs.table_metrics rates a row without a language by it.
    language: str | None = None


def tts_reward(
    cer: float,
    nll: float,
    *,
    beta_c: float = 3.0,
    tau_n: float = 3.0,
    lambda_c: float = 0.6,
    lambda_n: float = 0.4,
) -> float:
    """Reward in [0, 1] of one clip from its character error rate and its mean NLL (nats/token).

    cer >= 0 (it may exceed 1 with insertions); nll >= 0, inf allowed (utility 0). A utility of 0
    with a positive weight gives 0: the harmonic mean's limit, computed without dividing by 0."""
    RewardConfig(beta_c, tau_n, lambda_c, lambda_n)  # validates the knobs
    cer = _non_negative("cer", cer)
    nll = _non_negative("nll", nll)
    u_cer = 1.0 - math.tanh(beta_c * cer)
    u_nll = math.exp(-nll / tau_n)
    terms = [(w, u) for w, u in ((lambda_c, u_cer), (lambda_n, u_nll)) if w > 0]
    if any(u <= 0.0 for _, u in terms):
        return 0.0
    reward = sum(w for w, _ in terms) / sum(w / u for w, u in terms)
    return min(max(reward, 0.0), 1.0)


def _non_negative(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}") from None
    if math.isnan(number) or number < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return number


def normalize_text(text: str) -> str:
    """Text as the CER compares it: NFKC and casefolded, bracketed annotations ([..], <..>, (..))
    removed as Whisper's BasicTextNormalizer does, then only letters, numbers and combining marks
    (Unicode categories L*, N*, M*) kept: punctuation, symbols, whitespace and controls go.

    Marks are letters here: Hindi matras and viramas, Thai vowel signs and tones are sounds, and
    Whisper's normalizer (which turns category M into spaces) would score "नमस्ते" and "नमसत" alike.
    Removing every space makes the rate comparable across scripts: Korean spacing varies
    ("안녕 하세요" = "안녕하세요") and Chinese or Japanese have no spaces at all."""
    # NFKC again after casefold, as Unicode's NFKC_Casefold: casefold may decompose
    # (U+01F0 -> j + U+030C).
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return "".join(c for c in _BRACKETED.sub("", text) if unicodedata.category(c)[0] in "LNM")


def char_error_rate(reference: str, hypothesis: str, *, normalize: bool = True) -> float:
    """Character error rate (edits / reference characters) of `hypothesis` against `reference`.

    An empty hypothesis is 1.0 (every character deleted), never 0. A reference with nothing left
    to compare (empty after normalization) is a ValueError: the rate would be undefined."""
    ref = normalize_text(reference) if normalize else reference
    hyp = normalize_text(hypothesis) if normalize else hypothesis
    if not ref:
        why = " after normalization (punctuation, symbols and spaces removed)" if normalize else ""
        raise ValueError(f"reference {reference!r} has no characters to compare{why}")
    if not hyp:
        return 1.0
    return float(jiwer.cer(ref, hyp))


# ---- the evaluation table's WER / CER (seed-tts-eval's run_wer.py), not the reward's CER ----

# No spaces between words: rated by character.
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "th", "yue"})
# run_wer.py deletes every character of string.punctuation + zhon.hanzi.punctuation but the ASCII
# apostrophe. Ours: ASCII punctuation, any other character of Unicode category P* (CJK and
# fullwidth marks, ‘’“”…), fullwidth forms NFKC maps to ASCII punctuation (＋ ＄ ～ ｜), and the
# three of zhon's list none of those catch (the ideographic space, 〾 and 〿).
_ASCII_PUNCT = frozenset(string.punctuation) - {"'"}
_ZHON_REST = frozenset("\u3000\u303e\u303f")


def _is_deleted(c: str) -> bool:
    if c == "'":
        return False
    if c in _ASCII_PUNCT or c in _ZHON_REST:
        return True
    if c.isascii():
        return False
    if unicodedata.category(c).startswith("P"):
        return True
    folded = unicodedata.normalize("NFKC", c)  # fullwidth forms of ASCII punctuation
    return folded != "" and all(x in _ASCII_PUNCT for x in folded)


def seed_tts_normalize(text: str, language: str | None) -> str:
    """Text as seed-tts-eval's run_wer.py compares it. Punctuation is deleted, not turned into a
    space ("well-known" -> "wellknown", "你好，世界" -> "你好世界"): ASCII punctuation but the
    apostrophe ("don't" stays one word), every non-ASCII P* character and fullwidth punctuation.
    The curly ’ is deleted too, as run_wer.py does (its zhon list holds it): "don’t" reads "dont",
    not "don't". Runs of spaces collapse. A CER language (CER_LANGUAGES: zh, ja, ko, th, yue) is
    split into characters, spaces dropped, joined by single spaces, so that jiwer's word rate is the
    character rate; not lowercased, as run_wer.py's zh. Every other language is lowercased
    (run_wer.py lowercases en; we lowercase every WER language)."""
    text = "".join(c for c in text if not _is_deleted(c))
    if (language or "").lower() in CER_LANGUAGES:
        return " ".join(c for c in text if not c.isspace())
    return " ".join(text.lower().split())


def table_error_rate(reference: str, hypothesis: str, language: str | None) -> tuple[str, float]:
    """("wer" or "cer", the rate) of hypothesis against reference, both seed_tts_normalize'd: CER
    for CER_LANGUAGES, WER for the rest (language None: WER; eval.py refuses rows without a language
    unless the ASR is English-only). An empty hypothesis is 1.0 (every unit deleted); a reference
    empty after normalization is a ValueError."""
    kind = "cer" if (language or "").lower() in CER_LANGUAGES else "wer"
    ref = seed_tts_normalize(reference, language)
    hyp = seed_tts_normalize(hypothesis, language)
    if not ref:
        raise ValueError(f"reference {reference!r} has nothing left to compare after normalization")
    if not hyp:
        return kind, 1.0
    return kind, float(jiwer.wer(ref, hyp))


def import_function(spec: str, what: str, forms: str = "'module:function'"):
    """The function a "module:function" spec names (a user's reward, speaker embedding or ASR).
    ValueError for a malformed spec, AttributeError naming the module when it lacks the function."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"{what} {spec!r} must be {forms}")
    module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AttributeError(
            f"{what} {spec!r}: module {module_name!r} ({module.__file__}) "
            f"has no function {function_name!r}"
        )
    return function
