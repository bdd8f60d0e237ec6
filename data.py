"""Datasets, LLASA prompt formatting, speech-token ids, and the tiny offline tokenizer.

A dataset is a JSONL file with a `text` field per row (optional `id`, `language`, and for voice
cloning `prompt_wav` + `prompt_text`: a recording of the voice to clone and what it says), a
Seed-TTS-eval list (`.lst`: `utt|prompt_text|prompt_wav|text[|wav]`), or a .txt file with one text
per line. Prompt audio paths are relative to the data file and are checked at load time. LLASA
prompts are built through the tokenizer's own chat template, the way LLASA's inference code does
(DESIGN.md §4); every special id is looked up by name.
"""

import json
import math
import os
from dataclasses import dataclass

import numpy as np

# The 8 markers LLASA added to Llama-3's vocabulary (with add_tokens, not as special tokens).
LLASA_MARKERS = [
    "<|TEXT_GENERATION_START|>",
    "<|TEXT_GENERATION_END|>",
    "<|TEXT_UNDERSTANDING_START|>",
    "<|TEXT_UNDERSTANDING_END|>",
    "<|SPEECH_GENERATION_START|>",
    "<|SPEECH_GENERATION_END|>",
    "<|SPEECH_UNDERSTANDING_START|>",
    "<|SPEECH_UNDERSTANDING_END|>",
]
SPEECH_START = "<|SPEECH_GENERATION_START|>"
SPEECH_END = "<|SPEECH_GENERATION_END|>"
SAMPLE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample.jsonl")

# The date Llama-3.2's chat template (Llasa's) prints in its system header: its own fallback when
# no date is given, a constant so that prompts are the same every day (and across --resume).
CHAT_DATE = "26 Jul 2024"
# Llama-3's chat template, without the system preamble (enough for LLASA's prompts).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass
class Example:
    """One row of a dataset: a text to say, and for voice cloning the voice to say it in."""

    text: str
    id: str
    language: str | None = None  # Whisper language (code or name) of the row; None: the run's
    source: str = ""  # "file:line", for error messages
    prompt_wav: str | None = None  # voice cloning: the voice's recording (a path, checked at load)
    prompt_text: str | None = None  # what prompt_wav says


SAMPLE_RATE = 16000  # XCodec2's and Whisper's rate


def read_audio(path: str) -> np.ndarray:
    """A sound file as float32 mono [S] at 16 kHz: channels averaged, another rate resampled (by
    FFT: exact for band-limited audio, the right tool for whole short clips)."""
    import soundfile as sf

    audio, rate = sf.read(path, dtype="float32", always_2d=True)  # [S, channels]
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE and len(audio):
        n = max(1, round(len(audio) * SAMPLE_RATE / rate))
        spectrum = np.fft.rfft(audio.astype(np.float64))
        keep = min(len(spectrum), n // 2 + 1)
        audio = np.fft.irfft(spectrum[:keep], n) * (n / len(audio))
    return audio.astype(np.float32)


def _prompt(where: str, base: str, wav, text, check: bool = True) -> tuple:
    """A row's (prompt_wav as a path, prompt_text), both str or both None; with `check`, the audio
    must be a readable, non-empty file. A bad row raises an error naming `where` (file:line)."""
    if wav is None and text is None:
        return None, None
    both_strings = isinstance(wav, str) and isinstance(text, str)
    if not both_strings or not wav.strip() or not text.strip():
        raise ValueError(
            f"{where}: voice cloning needs both 'prompt_wav' and 'prompt_text' as non-empty "
            f"strings, got prompt_wav={wav!r}, prompt_text={text!r}"
        )
    path = os.path.join(base, wav.strip())
    if not check:
        return path, text.strip()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: prompt audio not found: {path}")
    try:
        import soundfile as sf

        info = sf.info(path)
    except Exception as e:  # any reason it cannot be read, named with the line
        raise ValueError(f"{where}: prompt audio {path} cannot be read: {e}") from None
    if info.frames == 0:
        raise ValueError(f"{where}: prompt audio {path} is empty")
    return path, text.strip()


def _seed_tts_list(path: str, check: bool = True) -> list[Example]:
    """Seed-TTS-eval's list format, one row per line: utt|prompt_text|prompt_wav|text (a 5th field,
    the reference recording of the text, is allowed and not needed here)."""
    examples = []
    base = os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            fields = line.rstrip("\n").split("|")
            if len(fields) not in (4, 5):
                raise ValueError(
                    f"{where}: expected 4 or 5 '|'-separated fields "
                    f"(utt|prompt_text|prompt_wav|text[|wav]), got {len(fields)}: "
                    f"{line.strip()[:80]!r}"
                )
            utt, prompt_text, prompt_wav, text = (x.strip() for x in fields[:4])
            if not utt or not text:
                raise ValueError(f"{where}: empty utterance id or text")
            wav, prompt_text = _prompt(where, base, prompt_wav, prompt_text, check)
            example = Example(
                text=text, id=utt, source=where, prompt_wav=wav, prompt_text=prompt_text
            )
            examples.append(example)
    return examples


def read_jsonl(path: str):
    """Yield (line number, object) for each non-blank line of a JSONL file; a line that is not a
    JSON object raises ValueError naming file and line. Shared by datasets and the worker CLI."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                why = f"not valid JSON ({e.msg} at column {e.colno})"
                raise ValueError(f"{path}:{lineno}: {why}") from None
            if not isinstance(row, dict):
                got = line.strip()[:80]
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {got!r}")
            yield lineno, row


def load_dataset(path: str, check_prompts: bool = True) -> list[Example]:
    """Read texts from JSONL (`text`, optional `id`, `language`, `prompt_wav` + `prompt_text`), a
    Seed-TTS-eval list (.lst) or .txt (one text per line).

    Blank lines are skipped; anything malformed, or prompt audio that is missing or unreadable,
    raises an error naming file and line (prompt audio unchecked with check_prompts=False: eval.py
    checks it per row)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.endswith(".lst"):
        examples = _seed_tts_list(path, check_prompts)
    elif path.endswith((".jsonl", ".json")):
        examples = _jsonl_examples(path, check_prompts)
    else:
        examples = _text_lines(path)
    if not examples:
        raise ValueError(f"{path}: no texts found")
    return examples


def _text_lines(path: str) -> list[Example]:
    """A .txt dataset: one text per non-blank line."""
    name = os.path.basename(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                example = Example(
                    text=line.strip(), id=f"{name}:{lineno}", source=f"{path}:{lineno}"
                )
                examples.append(example)
    return examples


def _jsonl_examples(path: str, check_prompts: bool) -> list[Example]:
    """A JSONL dataset: `text`, optional `id`, `language`, `prompt_wav` + `prompt_text` per row."""
    name = os.path.basename(path)
    examples = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row.get("text"), str):
            got = str(row)[:80]
            raise ValueError(f"{where}: expected an object with a string field 'text', got {got!r}")
        if not row["text"].strip():
            raise ValueError(f"{where}: field 'text' is empty")
        lang = row.get("language")
        if lang is not None and not isinstance(lang, str):
            raise ValueError(f"{where}: field 'language' must be a string, got {lang!r}")
        wav, prompt_text = _prompt(
            where,
            os.path.dirname(path),
            row.get("prompt_wav"),
            row.get("prompt_text"),
            check_prompts,
        )
        example = Example(
            text=row["text"].strip(),
            id=str(row.get("id", f"{name}:{lineno}")),
            language=lang,
            source=where,
            prompt_wav=wav,
            prompt_text=prompt_text,
        )
        examples.append(example)
    return examples


def token_id(tokenizer, name: str) -> int:
    """Id of a token by its name; KeyError naming the token if the vocabulary lacks it."""
    # convert_tokens_to_ids is a lookup; get_vocab() would build a 190k-entry dict on every call.
    # An unknown name comes back as the unk id (or None), so check the round trip.
    tid = tokenizer.convert_tokens_to_ids(name)
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != name:
        raise KeyError(
            f"token {name!r} is not in the tokenizer's vocabulary "
            "(is this a LLASA checkpoint? it needs the LLASA markers and <|s_k|> speech tokens)"
        )
    return tid


@dataclass
class SpeechVocab:
    """Where the speech tokens and the stop token live. Speech id = first + code, code in [0, n)."""

    first: int  # id of <|s_0|>
    n: int  # number of speech tokens (65536 for LLASA)
    start_id: int  # <|SPEECH_GENERATION_START|>
    end_id: int  # <|SPEECH_GENERATION_END|>, the stop token

    def allowed_ids(self) -> list[int]:
        """Every speech token plus the stop token: the only ids a rollout may emit."""
        return list(range(self.first, self.first + self.n)) + [self.end_id]

    def to_codes(self, ids) -> list[int]:
        """Speech-token ids -> codec codes; anything outside the speech range is an error."""
        codes = [int(i) - self.first for i in ids]
        bad = [c for c in codes if not 0 <= c < self.n]
        if bad:
            ids = [b + self.first for b in bad[:5]]
            raise ValueError(f"non-speech token ids in a speech sequence: {ids}")
        return codes


def speech_vocab(tokenizer) -> SpeechVocab:
    """Find <|s_0|>..<|s_{n-1}|> and the speech markers by name; they must be contiguous ids."""
    vocab = tokenizer.get_vocab()
    first = token_id(tokenizer, "<|s_0|>")
    n = 0
    while vocab.get(f"<|s_{n}|>") == first + n:
        n += 1
    after = f"<|s_{n}|>"  # the first speech token out of place, if any
    if after in vocab:
        raise ValueError(
            f"speech token {after} has id {vocab[after]}, expected {first + n}: "
            "speech tokens must have contiguous ids"
        )
    return SpeechVocab(
        first=first,
        n=n,
        start_id=token_id(tokenizer, SPEECH_START),
        end_id=token_id(tokenizer, SPEECH_END),
    )


def prompt_ids(
    tokenizer, text: str, prompt_text: str | None = None, prompt_codes=None
) -> list[int]:
    """LLASA's TTS prompt for `text` as token ids, ending in <|SPEECH_GENERATION_START|>; with a
    voice prompt, LLASA's clone prompt: the text is prompt_text + text, joined with nothing as
    LLASA's model card joins them (`input_text = prompt_text + target_text`), and the assistant turn
    goes on after <|SPEECH_GENERATION_START|> with the prompt's speech tokens (prompt_codes, codec
    codes), so the model continues in that voice and only what it generates is the new speech.

    The chat is rendered to a string and then tokenized (instead of
    apply_chat_template(tokenize=True)), which behaves the same on transformers 4.46+ and 5.x. It
    is rendered with `date_string` = CHAT_DATE: Llasa's template (Llama-3.2-Instruct's) prints a
    date in its system header, today's unless given, which would change the prompt ids from one
    day to the next (and across --resume). Bad input raises ValueError; a tokenizer without
    LLASA's markers, KeyError."""
    if not text or not text.strip():
        raise ValueError("empty text: nothing to synthesize")
    if (prompt_text is None) != (prompt_codes is None):
        raise ValueError("a voice prompt needs both prompt_text and prompt_codes")
    if prompt_text is not None:
        text = prompt_text + text
    for name in ("<|TEXT_UNDERSTANDING_START|>", "<|TEXT_UNDERSTANDING_END|>", SPEECH_START):
        token_id(tokenizer, name)
    request = (
        f"Convert the text to speech:<|TEXT_UNDERSTANDING_START|>{text}<|TEXT_UNDERSTANDING_END|>"
    )
    chat = [
        {"role": "user", "content": request},
        {"role": "assistant", "content": SPEECH_START},
    ]
    rendered = tokenizer.apply_chat_template(
        chat, tokenize=False, continue_final_message=True, date_string=CHAT_DATE
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if ids[-1] != token_id(tokenizer, SPEECH_START):
        end = rendered[-80:]
        raise ValueError(
            f"the chat template did not end the prompt with {SPEECH_START}: ...{end!r}"
        )
    if prompt_codes is not None:  # the speech tokens <|s_k|> are single tokens: their ids, in order
        speech = speech_vocab(tokenizer)
        bad = [c for c in prompt_codes if not 0 <= int(c) < speech.n]
        if bad:
            raise ValueError(f"prompt codes outside the {speech.n} speech tokens: {bad[:5]}")
        ids = ids + [speech.first + int(c) for c in prompt_codes]
    return ids


def tiny_tokenizer(n_speech: int = 512):
    """A LLASA-style tokenizer built offline: byte-level text tokens (any language encodes),
    Llama-3 chat markers as special tokens, the 8 LLASA markers and `n_speech` speech tokens
    added with add_tokens, as LLASA did. Deterministic: the same ids every time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    headers = ["<|start_header_id|>", "<|end_header_id|>"]
    tok.add_special_tokens({"additional_special_tokens": headers})
    speech = [f"<|s_{k}|>" for k in range(n_speech)]
    tok.add_tokens(LLASA_MARKERS + speech)
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def load_data(cfg) -> tuple[list[Example], list[Example]]:
    """The run's training and validation examples (cfg: config.Config). With the Whisper reward,
    every row's language must be one the Whisper model knows: a bad one stops the run here, naming
    file and line, instead of being scored 0 at every step."""
    examples = load_dataset(cfg.data)
    val_examples = []
    if cfg.val_data:
        val_examples = load_dataset(cfg.val_data)
    uses = []  # the flags that need a voice prompt per row
    if cfg.sim_weight:
        uses.append("--sim-weight")
    if "sim" in {spec.partition(":")[0] for spec in cfg.guard}:
        uses.append("--guard sim")
    if uses and not any(
        ex.prompt_wav for ex in examples
    ):  # sim would be 0 for every clip, silently
        raise ValueError(
            f"{cfg.data}: no row has a prompt_wav, so {' and '.join(uses)} would have no speaker "
            "similarity to work on (sim needs a voice prompt per row: see README, Voice cloning)"
        )
    if cfg.reward == "whisper":
        _check_languages(cfg, examples + val_examples)
    return examples, val_examples


def _check_languages(cfg, examples: list):
    """ValueError naming the first of --language and the examples' languages that Whisper
    `cfg.whisper` does not know."""
    from scorer import language_code, model_languages

    known = model_languages(cfg.whisper)
    rows = [("--language", cfg.language)] + [(ex.source, ex.language) for ex in examples]
    for where, language in rows:
        if not language:
            continue
        try:
            ok = language_code(language) in known
        except ValueError:
            ok = False
        if ok:
            continue
        listed = ", ".join(sorted(known)[:12])
        if len(known) > 12:
            listed += ", ..."
        raise ValueError(
            f"{where}: language {language!r} is not one Whisper {cfg.whisper!r} knows ({listed})"
        )


def epoch_steps(epochs: float, rows: int, prompts_per_step: int) -> int:
    """The steps that pass `epochs` times over `rows` training examples at `prompts_per_step`
    prompts a step (--epochs): ceil(epochs * rows / prompts_per_step), at least 1."""
    steps = round(epochs * rows / prompts_per_step, 9)  # 0.1 * 80 / 8 is 1, not 1.0000000000000002
    return max(1, math.ceil(steps))


def step_examples(examples: list, step: int, cfg, d) -> list:
    """Rank d.rank's prompts (of d.world) for `step`, from an endless run of seeded epoch
    permutations (cfg: prompts_per_step, seed; d: a parallel.Dist or anything with rank and world).

    The data position is a function of the step alone, which is what makes --resume exact."""
    per_rank = cfg.prompts_per_step // d.world
    start = step * cfg.prompts_per_step + d.rank * per_rank
    out = []
    for k in range(start, start + per_rank):  # k: the position in the endless stream
        epoch, i = divmod(k, len(examples))
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))
        out.append(examples[order[i]])
    return out


def refill_examples(examples: list, step: int, round: int, cfg, d) -> list:
    """Rank d.rank's prompts for refill round `round` (1, 2, ...) of `step` under
    --dynamic-sampling: a seeded permutation of its own per (step, round), apart from the main
    stream of `step_examples`, so the data order stays a function of the step (exact --resume)."""
    per_rank = cfg.prompts_per_step // d.world
    order = np.random.default_rng([cfg.seed, step, round]).permutation(len(examples))
    ranks_part = range(d.rank * per_rank, (d.rank + 1) * per_rank)
    return [examples[order[k % len(examples)]] for k in ranks_part]
