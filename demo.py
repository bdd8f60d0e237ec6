"""See it learn: a real-Whisper GRPO demo that runs on a laptop CPU in minutes.

The tiny preset proves the plumbing; this demo shows learning you can hear. Its pieces:

- a word codec (codec.WordCodec): speech token k is word k of a fixed English vocabulary, a clip
  spoken once by espeak-ng and shipped in data/demo/words.npz;
- texts that use only that vocabulary (data/demo/train.jsonl, val.jsonl), made from templates;
- a starting policy that knows the words: a small Llama with a LLASA-style tokenizer, warm started
  (2000 AdamW steps, cosine-decayed lr; 1-3 minutes on one CPU thread, once: cached in
  runs/demo-policy) on (text -> word tokens) pairs, so that greedy decoding is nearly right
  (optionally on corrupted targets: `noise`);
- speaking badly by sampling it hot (temperature 2.0 in the demo preset, for rollouts, validation and
  the trainer's log-probs alike): most held-out sentences then come out with a wrong word or two;
- GRPO with Whisper tiny.en on the CPU then rewards saying the right words (`--preset demo`): it
  sharpens the policy as sampled, as LLASA's GRPO does for speech whose samples err where greedy may not.

    python demo.py build-words     # (maintainers) espeak-ng + sox -> data/demo/words.npz
    python demo.py build-texts     # (maintainers) templates -> data/demo/train.jsonl, val.jsonl, val_demo.jsonl
    python demo.py warm-start      # the starting policy -> runs/demo-policy (1-3 minutes, once; also automatic)
    python grpo.py --preset demo   # about 5 minutes on 2 CPU cores; metrics.jsonl + metrics.png
    python demo.py plot runs/demo/metrics.jsonl
"""
import argparse
import json
import math
import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
import zlib

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
# homophones (to/two, see/sea, red/read, there/their).
WORDS = {
    "det": ["the", "a", "my", "your", "his", "her", "our", "this", "that", "every"],
    "noun": ["cat", "dog", "bird", "fish", "horse", "man", "woman", "girl", "boy", "child",
             "teacher", "doctor", "farmer", "king", "queen", "friend", "mother", "father", "baby", "house",
             "car", "boat", "tree", "book", "door", "window", "table", "chair", "apple", "bread",
             "cake", "ball", "hat", "river", "garden", "city", "school", "train", "lamp", "box"],
    "adj": ["big", "small", "old", "young", "happy", "sad", "green", "blue", "black", "white",
            "yellow", "warm", "cold", "quiet", "loud", "fast", "slow", "tall", "little", "brown",
            "funny", "clever", "lazy", "hungry", "pretty"],
    "tverb": ["sees", "likes", "loves", "finds", "takes", "wants", "needs", "helps", "calls", "follows",
              "watches", "opens", "closes", "carries", "paints", "cleans", "pushes", "pulls", "holds",
              "visits", "buys", "sells", "eats", "brings", "makes", "builds", "catches", "draws"],
    "iverb": ["sleeps", "runs", "walks", "sings", "dances", "jumps", "laughs", "smiles", "swims", "waits"],
    "adv": ["today", "slowly", "quickly", "again", "now", "often", "always", "outside", "tonight"],
    "prep": ["in", "on", "under", "near", "behind", "with"],
    "conj": ["and", "but"],
}
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
N_TRAIN, N_VAL = 200, 24
# The demo's small validation set (data/demo/val_demo.jsonl): these held-out sentences (indices into
# val.jsonl), the 8 of the 24 that Whisper tiny.en transcribes best when the words are said right
# (mean CER 0.03, against 0.15 over all 24), so that validation CER measures the policy, not
# Whisper's own errors on espeak-ng's voice; 8 clips keep each validation to ~15 s on a CPU.
VAL_DEMO = (1, 6, 11, 12, 14, 15, 17, 18)
VAL_DEMO_FILE = os.path.join(DEMO_DIR, "val_demo.jsonl")
GAP_S = 0.06  # silence between words in WordCodec.decode


# ----------------------------------------------------------------------------- assets (maintainers)

def make_texts(seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic training and held-out validation sentences from the templates, all distinct."""
    rng = random.Random(seed)
    seen, texts = set(), []
    while len(texts) < N_TRAIN + N_VAL:
        template = TEMPLATES[len(texts) % len(TEMPLATES)]
        text = template
        while "{" in text:  # fill the slots left to right, each with a fresh draw
            a = text.index("{")
            b = text.index("}", a)
            text = text[:a] + rng.choice(WORDS[text[a + 1:b]]) + text[b + 1:]
        if text not in seen:
            seen.add(text)
            texts.append(text)
    assert max(len(t.split()) for t in texts) <= MAX_WORDS
    return texts[:N_TRAIN], texts[N_TRAIN:]


def build_texts(out_dir: str = DEMO_DIR, seed: int = 0):
    os.makedirs(out_dir, exist_ok=True)
    train, val = make_texts(seed)
    rows = {"train.jsonl": [(f"train-{i}", t) for i, t in enumerate(train)],
            "val.jsonl": [(f"val-{i}", t) for i, t in enumerate(val)],
            "val_demo.jsonl": [(f"val-{i}", val[i]) for i in VAL_DEMO]}
    for name, items in rows.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            for i, t in items:
                f.write(json.dumps({"id": i, "text": t}) + "\n")
    print(f"wrote {len(train)} training and {len(val)} validation sentences ({len(VAL_DEMO)} in val_demo.jsonl) "
          f"to {out_dir}")


def trim_silence(wav: np.ndarray, threshold: float = 0.01, pad_s: float = 0.01) -> np.ndarray:
    """Cut leading and trailing samples quieter than `threshold` (of full scale), keeping `pad_s`."""
    loud = np.nonzero(np.abs(wav) > threshold)[0]
    if len(loud) == 0:
        return wav[:0]
    pad = int(pad_s * SAMPLE_RATE)
    return wav[max(0, loud[0] - pad):loud[-1] + 1 + pad]


def speak(word: str, tmp: str) -> np.ndarray:
    """One word by espeak-ng (en-us, 150 words per minute), resampled to 16 kHz mono by sox: float32."""
    import soundfile
    raw, wav16 = os.path.join(tmp, "raw.wav"), os.path.join(tmp, "16k.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", raw, word], check=True)
    subprocess.run(["sox", raw, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", wav16], check=True)
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
    np.savez_compressed(path, clips=pcm, offsets=offsets, words=np.array(VOCAB), sample_rate=SAMPLE_RATE)
    print(f"wrote {path}: {len(VOCAB)} words, {len(pcm) / SAMPLE_RATE:.1f} s of speech, "
          f"{os.path.getsize(path) / 1e6:.2f} MB")


# ----------------------------------------------------------------------------- the starting policy

# 2000 steps with a cosine-decayed learning rate: the policy KNOWS the mapping (greedy decoding is
# nearly right); the demo then samples it hot (temperature 2), where it speaks badly, and GRPO
# sharpens the policy as sampled. (A shorter warm start leaves knowledge gaps that ~200 Whisper-scored
# samples cannot fill; lr 1e-2 or hidden 128 do not find the word-copying circuit in 1000 steps.)
WARM_START = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, steps=2000, batch=16, lr=3e-3,
                  cosine=True, noise=0.0)


def demo_tokenizer():
    """data.tiny_tokenizer with one speech token per word, plus every vocabulary word as one text token
    (as Llama-3's BPE has common English words): the policy then maps text token -> speech token
    instead of spelling words out of bytes, which a small model learns in seconds."""
    from tokenizers import AddedToken
    tok = data.tiny_tokenizer(n_speech=len(VOCAB))
    tok.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in sorted(VOCAB, key=len, reverse=True)])
    return tok


def random_sentence(rng: random.Random) -> str:
    text = TEMPLATES[rng.randrange(len(TEMPLATES))]
    while "{" in text:
        a = text.index("{")
        b = text.index("}", a)
        text = text[:a] + rng.choice(WORDS[text[a + 1:b]]) + text[b + 1:]
    return text


def warm_start_batch(tok, texts: list[str], noise: float = 0.0, rng: random.Random | None = None):
    """(ids [B, T] right-padded, attention mask [B, T], target mask [B, T] float): prompt then the
    words' speech tokens and <|SPEECH_GENERATION_END|>; the loss counts only the response. With
    `noise`, each target word is replaced by a random vocabulary word with that probability."""
    vocab = data.speech_vocab(tok)
    seqs, n_prompt = [], []
    for t in texts:
        prompt = data.prompt_ids(tok, t)
        codes = [rng.randrange(len(VOCAB)) if noise and rng.random() < noise else VOCAB.index(w) for w in t.split()]
        seqs.append(prompt + [vocab.first + c for c in codes] + [vocab.end_id])
        n_prompt.append(len(prompt))
    T = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in seqs])
    pos = torch.arange(T)[None]
    lengths, starts = torch.tensor([len(s) for s in seqs])[:, None], torch.tensor(n_prompt)[:, None]
    return ids, (pos < lengths).long(), ((pos >= starts) & (pos < lengths)).float()


def warm_start(seed: int = 0, steps: int | None = None, log=print, **overrides):
    """(model, tokenizer): a small Llama trained for `steps` AdamW steps (lr cosine-decayed to 0 over
    them when `cosine`) on fresh template sentences (never a validation sentence) -> their word
    tokens. Deterministic for a given seed and thread count."""
    import sample
    cfg = {**WARM_START, **overrides, **({} if steps is None else {"steps": steps})}
    tok = demo_tokenizer()
    model = sample.tiny_llama(len(tok), seed=seed, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                              num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"], max_positions=512)
    model.train()
    held_out = {r.text for r in data.load_dataset(VAL_FILE)} if os.path.exists(VAL_FILE) else set()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    total = max(cfg["steps"], 1)
    sched = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 0 over the run (or constant)
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)) if cfg["cosine"] else 1.0)
    t0 = time.time()
    for step in range(cfg["steps"]):
        texts = []
        while len(texts) < cfg["batch"]:
            t = random_sentence(rng)
            if t not in held_out:
                texts.append(t)
        ids, attn, target = warm_start_batch(tok, texts, cfg["noise"], rng)  # [B, T] each
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [B, T-1, V]
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]
        loss = -(logp * target[:, 1:]).sum() / target[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and ((step + 1) % 100 == 0 or step + 1 == cfg["steps"]):
            log(f"warm start step {step + 1}/{cfg['steps']}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return model.eval(), tok


def ensure_policy(out_dir: str = POLICY_DIR, seed: int = 0, steps: int | None = None) -> str:
    """The demo's starting policy as a Hugging Face directory (sample.load_model loads it), built by
    `warm_start` when `out_dir` has none; returns `out_dir`."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    model, tok = warm_start(seed=seed, steps=steps)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir) if not os.path.exists(out_dir) else (shutil.rmtree(out_dir), os.replace(tmp, out_dir))
    print(f"wrote the demo's starting policy to {out_dir}")
    return out_dir


# ----------------------------------------------------------------------------- the learning curve

# 5x7 bitmaps of the characters the plot writes (rows top to bottom, 5 bits each, MSB left).
FONT = {
    "0": [14, 17, 19, 21, 25, 17, 14], "1": [4, 12, 4, 4, 4, 4, 14], "2": [14, 17, 1, 2, 4, 8, 31],
    "3": [31, 2, 4, 2, 1, 17, 14], "4": [2, 6, 10, 18, 31, 2, 2], "5": [31, 16, 30, 1, 1, 17, 14],
    "6": [6, 8, 16, 30, 17, 17, 14], "7": [31, 1, 2, 4, 8, 8, 8], "8": [14, 17, 17, 14, 17, 17, 14],
    "9": [14, 17, 17, 15, 1, 2, 12], ".": [0, 0, 0, 0, 0, 12, 12], " ": [0] * 7,
    "a": [0, 0, 14, 1, 15, 17, 15], "c": [0, 0, 14, 16, 16, 17, 14], "d": [1, 1, 13, 19, 17, 17, 15],
    "e": [0, 0, 14, 17, 31, 16, 14], "l": [12, 4, 4, 4, 4, 4, 14], "m": [0, 0, 26, 21, 21, 17, 17],
    "n": [0, 0, 22, 25, 17, 17, 17], "p": [0, 0, 30, 17, 30, 16, 16], "r": [0, 0, 22, 25, 16, 16, 16],
    "s": [0, 0, 14, 16, 14, 1, 30], "t": [8, 8, 28, 8, 8, 9, 6], "v": [0, 0, 17, 17, 17, 10, 4],
    "w": [0, 0, 17, 17, 21, 21, 10], "_": [0, 0, 0, 0, 0, 0, 31],
}
SERIES = (("reward_mean", (31, 119, 180)), ("val_cer", (214, 39, 40)))  # name, RGB


def write_png(path: str, rgb: np.ndarray):
    """rgb [H, W, 3] uint8 -> an 8-bit RGB PNG (no dependency beyond zlib)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _text(img, x, y, s, color, scale=2):
    for ch in s:
        for r, bits in enumerate(FONT.get(ch, FONT[" "])):
            for c in range(5):
                if bits >> (4 - c) & 1:
                    img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 6 * scale


def _line(img, x0, y0, x1, y1, color, width=2):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for t in np.linspace(0.0, 1.0, n):
        x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
        img[max(0, y - width // 2):y + (width + 1) // 2, max(0, x - width // 2):x + (width + 1) // 2] = color


def plot(metrics_jsonl: str, png_path: str | None = None, size=(640, 400)) -> str:
    """reward_mean (every step, blue) and val_cer (validation steps, red) against the step, on one
    0..1 axis, as a PNG (default: metrics.png beside metrics.jsonl). Returns the PNG's path."""
    png_path = png_path or os.path.join(os.path.dirname(os.path.abspath(metrics_jsonl)), "metrics.png")
    rows = [row for _, row in data.read_jsonl(metrics_jsonl)]
    w, h = size
    left, right, top, bottom = 60, 20, 40, 50  # margins, pixels
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    steps = [r["step"] for r in rows] or [1]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)

    def px(step, value):
        return (left + (step - s0) / (s1 - s0) * (w - left - right),
                h - bottom - min(max(value, 0.0), 1.0) * (h - top - bottom))

    grey, black = (220, 220, 220), (0, 0, 0)
    for v in np.linspace(0, 1, 6):  # horizontal grid and y labels
        _, y = px(s0, v)
        _line(img, left, y, w - right, y, grey, 1)
        _text(img, 8, int(y) - 7, f"{v:.1f}", black)
    for st in sorted({int(round(s)) for s in np.linspace(s0, s1, min(6, s1 - s0 + 1))}):  # x ticks
        x, _ = px(st, 0)
        _line(img, x, h - bottom, x, h - bottom + 5, black, 1)
        _text(img, int(x) - 6 * len(str(st)), h - bottom + 10, str(st), black)
    _line(img, left, top, left, h - bottom, black)
    _line(img, left, h - bottom, w - right, h - bottom, black)
    _text(img, w // 2 - 24, h - 18, "step", black)
    x = left
    for name, color in SERIES:
        points = [px(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            _line(img, xa, ya, xb, yb, color)
        for xp, yp in points:  # a dot on every point, so a single validation shows
            img[max(0, int(yp) - 3):int(yp) + 4, max(0, int(xp) - 3):int(xp) + 4] = color
        img[12:22, x:x + 20] = color  # legend
        _text(img, x + 26, 10, name, black)
        x += 40 + 12 * len(name)
    write_png(png_path, img)
    return png_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build-words", help="speak the vocabulary with espeak-ng into data/demo/words.npz")
    sub.add_parser("build-texts", help="write data/demo/train.jsonl and val.jsonl from the templates")
    w = sub.add_parser("warm-start", help="build the starting policy (a few seconds) unless it exists")
    w.add_argument("--out", default=POLICY_DIR)
    w.add_argument("--seed", type=int, default=0)
    pl = sub.add_parser("plot", help="metrics.jsonl -> a PNG of reward_mean and val_cer per step")
    pl.add_argument("metrics")
    pl.add_argument("--out", default=None, help="PNG path (default: metrics.png beside metrics.jsonl)")
    args = p.parse_args(argv)
    if args.cmd == "build-words":
        build_words()
    elif args.cmd == "build-texts":
        build_texts()
    elif args.cmd == "warm-start":
        ensure_policy(args.out, args.seed)
    elif args.cmd == "plot":
        print(f"wrote {plot(args.metrics, args.out)}")


if __name__ == "__main__":
    main()
