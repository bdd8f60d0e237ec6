"""See it learn: a real-Whisper GRPO demo that runs on a laptop CPU in minutes.

The tiny preset proves the plumbing; this demo shows learning you can hear. Its pieces:

- a word codec (codec.WordCodec): speech token k is word k of a fixed English vocabulary, a clip
  spoken once by espeak-ng and shipped in data/demo/words.npz;
- texts that use only that vocabulary (data/demo/train.jsonl, val.jsonl), made from templates;
- a starting policy that speaks badly: a small Llama with a LLASA-style tokenizer, warm started
  (`warm_start`, once; cached in runs/demo-policy) to read the text out, then to mix up word
  pairs (it says "dog" for "cat" about one time in three), so that at temperature 1 about half of
  its words are wrong;
- GRPO with Whisper tiny.en on the CPU then rewards saying the right words (`--preset demo`).

    python demo.py build-words     # (maintainers) espeak-ng + sox -> data/demo/words.npz
    python demo.py build-texts     # (maintainers) templates -> data/demo/*.jsonl
    python demo.py warm-start      # the starting policy -> runs/demo-policy (once; also automatic)
    python grpo.py --preset demo   # metrics.jsonl + metrics.png (times: docs/demo.md)
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time

import numpy as np
import torch

import data

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.join(HERE, "data", "demo")
WORDS_FILE = os.path.join(DEMO_DIR, "words.npz")
TRAIN_FILE = os.path.join(DEMO_DIR, "train.jsonl")
VAL_FILE = os.path.join(DEMO_DIR, "val.jsonl")
POLICY_DIR = os.path.join(HERE, "runs", "demo-policy")
SAMPLE_RATE = 16000

# The vocabulary by role (the sentence templates draw from these). Every word is common, spoken
# clearly by espeak-ng, and has one usual spelling: no numbers (Whisper writes digits), no
# homophones (to/two, see/sea, red/read, there/their). Small on purpose: GRPO fixes a word from the
# samples that contain it, so the fewer the words, the more often each is practised (51 words
# learned faster than 130: docs/demo.md).
# (Kept as a table, one role a line: ruff format would set each word on a line of its own.)
# fmt: off
WORDS = {
    "det": ["the", "a", "my", "your", "his"],
    "noun": ["cat", "dog", "bird", "fish", "horse", "man", "woman", "girl", "boy", "child",
             "teacher", "doctor", "farmer", "king", "queen", "friend"],
    "adj": ["big", "small", "old", "young", "happy", "sad", "green", "blue"],
    "tverb": ["sees", "likes", "loves", "finds", "takes", "wants", "needs", "helps"],
    "iverb": ["sleeps", "runs", "walks", "sings", "dances"],
    "adv": ["today", "slowly", "quickly", "again"],
    "prep": ["in", "on", "under"],
    "conj": ["and", "but"],
}
# fmt: on
VOCAB = [w for ws in WORDS.values() for w in ws]  # code k = VOCAB[k]
TEMPLATES = [  # 3 to 7 words
    "the {adj} {noun} {tverb} the {noun}",
    "{det} {noun} {iverb} {adv}",
    "{det} {noun} {tverb} {det} {adj} {noun}",
    "the {noun} {iverb} {prep} the {noun}",
    "{det} {adj} {noun} {iverb} and {iverb}",
    "{det} {noun} {tverb} the {noun} {adv}",
    "{det} {adj} {noun} {iverb} {prep} {det} {noun}",
    "{det} {noun} {iverb} but {det} {noun} {iverb}",
]
MAX_WORDS = 7
# Candidate sentences (train, held out), and how many of each the demo keeps: those that Whisper
# tiny.en, hearing an 8 s window, transcribes exactly when every word is said right (the rest it
# mishears whatever the policy does, which would bury the reward's signal). val.jsonl holds every
# held-out candidate, which the warm start never sees; val_demo.jsonl the N_VAL kept for
# validation.
N_TRAIN_POOL = 1000
N_VAL_POOL = 200
N_TRAIN = 200
N_VAL = 24
WHISPER_WINDOW_S = 8.0  # the demo preset's --whisper-window
VAL_DEMO_FILE = os.path.join(DEMO_DIR, "val_demo.jsonl")
GAP_S = 0.06  # silence between words in WordCodec.decode


# ----------------------------------------------------------------------------- assets (maintainers)


def fill(template: str, rng: random.Random) -> str:
    """The template's {role} slots filled left to right, each with a fresh draw from WORDS[role]."""
    text = template
    while "{" in text:
        a = text.index("{")
        b = text.index("}", a)
        text = text[:a] + rng.choice(WORDS[text[a + 1 : b]]) + text[b + 1 :]
    return text


def make_texts(seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic candidate sentences from the templates, all distinct: (N_TRAIN_POOL for
    training, N_VAL_POOL held out)."""
    rng = random.Random(seed)
    seen = set()
    texts = []
    while len(texts) < N_TRAIN_POOL + N_VAL_POOL:
        text = fill(TEMPLATES[len(texts) % len(TEMPLATES)], rng)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    assert max(len(t.split()) for t in texts) <= MAX_WORDS
    return texts[:N_TRAIN_POOL], texts[N_TRAIN_POOL:]


def heard_right(texts: list[str], whisper_model: str = "tiny.en") -> list[bool]:
    """Whether Whisper (the demo's: `whisper_model`, an 8 s window, on the CPU) transcribes each
    text exactly (CER 0 after normalization) when its words are said right by the word codec."""
    from codec import WordCodec
    from scorer import WhisperScorer

    codes = [[VOCAB.index(w) for w in t.split()] for t in texts]
    audios = WordCodec(WORDS_FILE).decode(codes)
    scorer = WhisperScorer(whisper_model, "cpu", "en", window_s=WHISPER_WINDOW_S)
    return [s.cer == 0.0 for s in scorer.score(audios, texts)]


def build_texts(whisper_model: str = "tiny.en", out_dir: str = DEMO_DIR, seed: int = 0):
    """train.jsonl, val.jsonl (every held-out candidate) and val_demo.jsonl from `make_texts`,
    keeping the candidates that Whisper hears right (`heard_right`). Too few heard right:
    SystemExit."""
    train_pool, val_pool = make_texts(seed)
    ok = heard_right(train_pool + val_pool, whisper_model)
    train_ok = ok[: len(train_pool)]
    val_ok = ok[len(train_pool) :]
    train = [t for t, k in zip(train_pool, train_ok) if k][:N_TRAIN]
    val = [(i, t) for i, (t, k) in enumerate(zip(val_pool, val_ok)) if k][:N_VAL]  # (index, text)
    if len(train) < N_TRAIN or len(val) < N_VAL:
        raise SystemExit(
            f"only {len(train)} training and {len(val)} held-out candidates are heard right; "
            "raise N_TRAIN_POOL or N_VAL_POOL"
        )
    os.makedirs(out_dir, exist_ok=True)
    rows = {  # file -> (id, text) rows
        "train.jsonl": [(f"train-{i}", t) for i, t in enumerate(train)],
        "val.jsonl": [(f"val-{i}", t) for i, t in enumerate(val_pool)],
        "val_demo.jsonl": [(f"val-{i}", t) for i, t in val],
    }
    for name, items in rows.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            for i, t in items:
                f.write(json.dumps({"id": i, "text": t}) + "\n")
    print(
        f"kept {sum(train_ok)} of {len(train_pool)} training and {sum(val_ok)} of "
        f"{len(val_pool)} held-out candidates; wrote {len(train)} to train.jsonl, "
        f"{len(val_pool)} to val.jsonl and {len(val)} to val_demo.jsonl in {out_dir}"
    )


def trim_silence(wav: np.ndarray, threshold: float = 0.01, pad_s: float = 0.01) -> np.ndarray:
    """Cut leading and trailing samples quieter than `threshold` (of full scale), keeping `pad_s`
    seconds of them."""
    loud = np.nonzero(np.abs(wav) > threshold)[0]
    if len(loud) == 0:
        return wav[:0]
    pad = int(pad_s * SAMPLE_RATE)
    first = max(0, loud[0] - pad)
    end = loud[-1] + 1 + pad
    return wav[first:end]


def speak(word: str, tmp: str) -> np.ndarray:
    """One word by espeak-ng (en-us, 150 words per minute), resampled to 16 kHz mono by sox:
    float32 [S], silence trimmed."""
    import soundfile

    raw = os.path.join(tmp, "raw.wav")
    wav16 = os.path.join(tmp, "16k.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", raw, word], check=True)
    resample = ["sox", raw, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", wav16]
    subprocess.run(resample, check=True)
    wav, sr = soundfile.read(wav16, dtype="float32")
    assert sr == SAMPLE_RATE, sr
    return trim_silence(wav)


def build_words(path: str = WORDS_FILE):
    """Speak every word of VOCAB once and store the clips: `clips` (int16, all concatenated),
    `offsets` [n + 1] (clip k = clips[offsets[k]:offsets[k + 1]]), `words`, `sample_rate`."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise SystemExit("build-words needs espeak-ng and sox (apt-get install -y espeak-ng sox)")
    assert len(set(VOCAB)) == len(VOCAB), "duplicate words"
    with tempfile.TemporaryDirectory() as tmp:
        clips = [speak(w, tmp) for w in VOCAB]
    offsets = np.cumsum([0] + [len(c) for c in clips]).astype(np.int64)
    pcm = np.concatenate([np.round(np.clip(c, -1, 1) * 32767) for c in clips]).astype(np.int16)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(
        path, clips=pcm, offsets=offsets, words=np.array(VOCAB), sample_rate=SAMPLE_RATE
    )
    seconds = len(pcm) / SAMPLE_RATE
    megabytes = os.path.getsize(path) / 1e6
    print(f"wrote {path}: {len(VOCAB)} words, {seconds:.1f} s of speech, {megabytes:.2f} MB")


# ----------------------------------------------------------------------------- the starting policy

# Reading: `steps` with a cosine-decayed lr teach the word-copying circuit. Confusing:
# `confusion_steps` of lm_head alone. Errors GRPO can fix in a few dozen steps must be shared by
# many sentences: a shorter reading phase leaves gaps that the run's Whisper-scored samples cannot
# fill, and a well-read policy sampled hot errs differently in every sentence, so its per-prompt
# updates do not generalize; word-pair confusions live in lm_head rows that every sentence with
# that word shares (what was measured: docs/demo.md).
WARM_START = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    steps=1000,
    batch=16,
    lr=3e-3,
    cosine=True,
    confusion=0.35,
    confusion_steps=300,
    confusion_lr=3e-3,
)


def demo_tokenizer():
    """data.tiny_tokenizer with one speech token per word, plus every vocabulary word as one text
    token (as Llama-3's BPE has common English words): the policy then maps text token -> speech
    token instead of spelling words out of bytes, which a small model learns in seconds."""
    from tokenizers import AddedToken

    tok = data.tiny_tokenizer(n_speech=len(VOCAB))
    longest_first = sorted(VOCAB, key=len, reverse=True)
    tok.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in longest_first])
    return tok


def random_sentence(rng: random.Random) -> str:
    """A sentence from a template drawn from `rng`."""
    return fill(TEMPLATES[rng.randrange(len(TEMPLATES))], rng)


def confusions(seed: int = 0) -> dict[str, str]:
    """Each word's confusable partner: another word of the same role (a seeded derangement), which
    the starting policy says instead of it one time in three (WARM_START["confusion"])."""
    rng = random.Random(seed)
    partner = {}
    for words in WORDS.values():
        shifted = words[:]
        rng.shuffle(shifted)
        for a, b in zip(shifted, shifted[1:] + shifted[:1]):  # a cycle: nobody is its own partner
            partner[a] = b
    return partner


def warm_start_batch(
    tok, texts: list[str], confusion: float = 0.0, rng: random.Random | None = None
):
    """(ids [B, T] right-padded, attention mask [B, T] long, target mask [B, T] float): prompt then
    the words' speech tokens and <|SPEECH_GENERATION_END|>; the loss counts only the response.
    With `confusion`, each target word is replaced by its partner (`confusions`) with that
    probability, drawn from `rng`."""
    partner = confusions()
    vocab = data.speech_vocab(tok)
    seqs = []  # prompt + response ids per text
    n_prompt = []  # prompt tokens per text
    for t in texts:
        prompt = data.prompt_ids(tok, t)
        words = []  # the words the target says
        for w in t.split():
            if confusion and rng.random() < confusion:
                words.append(partner[w])
            else:
                words.append(w)
        codes = [VOCAB.index(w) for w in words]
        seqs.append(prompt + [vocab.first + c for c in codes] + [vocab.end_id])
        n_prompt.append(len(prompt))
    T = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in seqs])
    pos = torch.arange(T)[None]  # [1, T]
    lengths = torch.tensor([len(s) for s in seqs])[:, None]  # [B, 1]
    starts = torch.tensor(n_prompt)[:, None]  # [B, 1]: the first response position
    attention = (pos < lengths).long()
    target = ((pos >= starts) & (pos < lengths)).float()
    return ids, attention, target


def warm_start(seed: int = 0, steps: int | None = None, log=print, **overrides):
    """(model, tokenizer): the demo's starting policy, deterministic for a given seed and thread
    count.

    Two supervised phases on fresh template sentences (never a validation sentence) -> their word
    tokens: `steps` AdamW steps of the whole model on the right words (lr cosine-decayed to 0 when
    `cosine`), which teaches it to read the text out; then `confusion_steps` of its lm_head alone
    on targets where each word is its partner (`confusions`) with probability `confusion`: the
    policy then mixes up word pairs in its output layer, as a TTS model mispronounces, and samples
    a wrong word about half the time at temperature 1 (greedy: about one in three)."""
    from models import tiny_llama

    cfg = {**WARM_START, **overrides}
    if steps is not None:
        cfg["steps"] = steps
    tok = demo_tokenizer()
    model = tiny_llama(
        len(tok),
        seed=seed,
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        num_kv_heads=cfg["num_kv_heads"],
        max_positions=512,
    )
    model.train()
    held_out = set()  # never trained on: the validation sentences
    if os.path.exists(VAL_FILE):
        held_out = {r.text for r in data.load_dataset(VAL_FILE)}
    rng = random.Random(seed)
    t0 = time.time()

    def phase(name, params, n_steps, lr, confusion, cosine):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def lr_factor(s):  # cosine decay to 0 over the phase, or constant
            if not cosine:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * s / max(n_steps, 1)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        for step in range(n_steps):
            texts = []
            while len(texts) < cfg["batch"]:
                t = random_sentence(rng)
                if t not in held_out:
                    texts.append(t)
            ids, attn, target = warm_start_batch(tok, texts, confusion, rng)  # [B, T] each
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [B, T-1, V]
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]
            loss = -(logp * target[:, 1:]).sum() / target[:, 1:].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if log and ((step + 1) % 100 == 0 or step + 1 == n_steps):
                seconds = time.time() - t0
                progress = f"{name} {step + 1}/{n_steps}"
                log(f"warm start, {progress}: loss {loss.item():.3f} ({seconds:.0f} s)")

    every_weight = list(model.parameters())
    phase("reading", every_weight, cfg["steps"], cfg["lr"], 0.0, cfg["cosine"])
    head = [model.lm_head.weight]
    phase("confusing", head, cfg["confusion_steps"], cfg["confusion_lr"], cfg["confusion"], False)
    return model.eval(), tok


def resolve_model(name: str) -> str:
    """A --model value as models.load_model takes it: "demo" is this demo's starting policy
    (`ensure_policy`, built on first use), any other name is itself."""
    return ensure_policy() if name == "demo" else name


def ensure_policy(out_dir: str | None = None, seed: int = 0, **overrides) -> str:
    """The demo's starting policy as a Hugging Face directory (models.load_model loads it), built
    by `warm_start(seed, **overrides)` when `out_dir` (default runs/demo-policy) has none; returns
    `out_dir`. Written under a temporary name and renamed, so an interrupted build leaves nothing
    that looks done."""
    out_dir = out_dir or POLICY_DIR
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    print(f"building the demo's starting policy in {out_dir} (once; about a minute on 2 CPU cores)")
    model, tok = warm_start(seed=seed, **overrides)
    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(os.path.join(out_dir, "config.json")):  # another rank built the same policy
        shutil.rmtree(tmp)
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)  # no config.json there: an earlier build's remains
    os.replace(tmp, out_dir)
    print(f"wrote the demo's starting policy to {out_dir}")
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "build-words", help="speak the vocabulary with espeak-ng into data/demo/words.npz"
    )
    t = sub.add_parser(
        "build-texts",
        help="write data/demo/train.jsonl, val.jsonl and val_demo.jsonl from the templates, "
        "keeping the sentences Whisper hears right",
    )
    t.add_argument(
        "--whisper", default="tiny.en", help="Whisper tiny.en: a name or a checkpoint path"
    )
    w = sub.add_parser(
        "warm-start", help="build the starting policy (about a minute) unless it exists"
    )
    w.add_argument("--out", default=POLICY_DIR)
    w.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "build-words":
        build_words()
    elif args.cmd == "build-texts":
        build_texts(args.whisper)
    elif args.cmd == "warm-start":
        ensure_policy(args.out, args.seed)


if __name__ == "__main__":
    main()
