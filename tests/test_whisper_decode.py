"""whisper_decode.py: the greedy transcript verified against the text equals whisper.decode's, clip
by clip (real tiny.en on spoken clips, a random multilingual Whisper), at one decoder call where
the speech says the text; each clip stops on its own; the NLL is the teacher-forced one."""

import json
import os

import pytest
import torch
import whisper
from whisper.tokenizer import get_tokenizer

import scorer as scoring
import whisper_decode
from helpers import ASSETS, noise
from whisper_worker import read_wav

SPEECH = os.path.join(ASSETS, "speech")
WINDOW_S = 6.0  # the clips are at most 4.7 s: a short window keeps the encoder cheap
BOUND = 60  # every clip's greedy bound


@pytest.fixture(scope="module")
def tiny_en():
    path = os.path.join(ASSETS, "whisper-tiny.en.pt")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found (set TEST_ASSETS)")
    model = scoring.windowed(whisper.load_model(path, device="cpu"), WINDOW_S)
    with open(os.path.join(SPEECH, "clips.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    audios = [read_wav(os.path.join(SPEECH, row["wav"])) for row in rows]
    n_samples = int(WINDOW_S * 16000)
    mel = torch.stack(
        [whisper.log_mel_spectrogram(whisper.pad_or_trim(a, n_samples), 80) for a in audios]
    )
    with torch.inference_mode():
        features = model.encoder(mel)
    expected, _ = greedy_alone(model, features, ["en"] * len(rows), [BOUND] * len(rows))
    return model, rows, features, expected


def greedy_alone(model, features, languages, bounds, fp16=False):
    """whisper.decode's tokens and language for each clip decoded alone, as the scorer's options."""
    answers = []
    for b, (language, bound) in enumerate(zip(languages, bounds)):
        options = whisper_decode.greedy_options(language, bound, fp16)
        answers.append(whisper.decode(model, features[b : b + 1], options)[0])
    return [a.tokens for a in answers], [a.language for a in answers]


def counted_calls(monkeypatch):
    """The (rows, tokens) shape of every decoder call verified_decode makes, in order."""
    calls = []
    forward = whisper_decode._Cache.forward

    def counting(self, tokens, start):
        calls.append(tuple(tokens.shape))
        return forward(self, tokens, start)

    monkeypatch.setattr(whisper_decode._Cache, "forward", counting)
    return calls


def test_real_clips_equal_greedy_with_right_and_wrong_texts(tiny_en):
    """Clean, noisy and silent clips, each with its own text and with another clip's text (nothing
    matches): the same tokens as whisper.decode of each clip alone, and the teacher-forced NLL."""
    model, rows, features, expected = tiny_en
    tokenizer = get_tokenizer(False)
    texts = [row["text"] for row in rows]
    wrong = texts[3:] + texts[:3]  # each clip with the next sentence's text
    bounds = [BOUND] * len(rows)
    for case in (texts, wrong):
        targets = [tokenizer.encode(" " + text) for text in case]
        stats = whisper_decode.DraftStats()
        got = whisper_decode.verified_decode(
            model, features, targets, ["en"] * len(rows), bounds, stats
        )
        for row, answer, tokens in zip(rows, got, expected):
            assert answer.tokens == tokens, (
                row,
                tokenizer.decode(answer.tokens),
                tokenizer.decode(tokens),
            )
        prefix = list(tokenizer.sot_sequence_including_notimestamps)
        sequences = [prefix + target + [tokenizer.eot] for target in targets]
        with torch.inference_mode():
            nlls = scoring.teacher_forced_nll(model, features, sequences, [2] * len(rows))
        assert [a.nll for a in got] == pytest.approx(nlls, abs=1e-4)
        # one greedy decision per token, and the EOT where the bound did not end the transcript
        assert stats.decided == sum(len(t) + (len(t) < n) for t, n in zip(expected, bounds))
    assert stats.accepted < stats.decided / 2  # a wrong text drafts little


def test_speech_saying_the_text_costs_one_decoder_call(tiny_en, monkeypatch):
    """Where the text is what Whisper hears (its own greedy transcript), the transcript comes from
    the teacher-forced pass alone: one decoder call for the batch, every token from the draft;
    whisper.decode calls its decoder once per token."""
    model, rows, features, expected = tiny_en
    heard = [b for b, row in enumerate(rows) if row["kind"] != "silence"]
    features = features[heard]
    expected = [expected[b] for b in heard]
    bounds = [BOUND] * len(heard)
    assert max(map(len, expected)) == BOUND  # a noisy clip loops to its bound (at this window)
    calls = counted_calls(monkeypatch)
    stats = whisper_decode.DraftStats()
    got = whisper_decode.verified_decode(
        model, features, expected, ["en"] * len(heard), bounds, stats
    )
    assert [a.tokens for a in got] == expected
    assert calls == [(len(heard), 2 + max(map(len, expected)))]  # the SOT sequence and the text
    assert stats.accepted == stats.decided == sum(len(t) + (len(t) < BOUND) for t in expected)
    decoder_calls = []
    hook = model.decoder.register_forward_hook(lambda *_: decoder_calls.append(1))
    greedy_alone(model, features[:1], ["en"], bounds[:1])
    hook.remove()
    assert len(decoder_calls) == len(expected[0]) + 1


def test_text_said_right_in_other_case_and_punctuation_takes_few_calls(tiny_en, monkeypatch):
    """A text Whisper hears right but spells otherwise (lowercase, no final period, as the demo's
    sentences): the transcript leaves it at its first token, then rejoins it (a guessed draft, the
    period before EOT drafted): a few decoder calls, not one per token."""
    model, rows, features, expected = tiny_en
    tokenizer = get_tokenizer(False)
    clean = [b for b, row in enumerate(rows) if row["kind"] == "clean"]
    heard = [tokenizer.decode(expected[b]) for b in clean]
    assert all(text.endswith(".") and text[1].isupper() for text in heard)
    plain = [text.lower().rstrip(".").replace(",", "") for text in heard]
    targets = [tokenizer.encode(text) for text in plain]
    calls = counted_calls(monkeypatch)
    got = whisper_decode.verified_decode(
        model, features[clean], targets, ["en"] * len(clean), [BOUND] * len(clean)
    )
    assert [a.tokens for a in got] == [expected[b] for b in clean]
    longest = max(len(expected[b]) for b in clean)
    # the pass, then a call where each leaves the text (the capital, a comma) and per 8 drafted
    assert len(calls) <= 5 and longest >= 16  # whisper.decode: a call per token


def test_random_whisper_equals_greedy_languages_and_bounds_included():
    """A random multilingual Whisper (it rarely stops: its bound ends it), languages given and
    detected: the tokens and languages of whisper.decode alone, clip by clip."""
    model = scoring.random_tiny_whisper(seed=3)
    audios = [noise(s, seed) for seed, s in enumerate([1.0, 2.5, 0.5, 1.5, 2.0])]
    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(a), 80) for a in audios])
    with torch.inference_mode():
        features = model.encoder(mel)
    tokenizer = get_tokenizer(True, num_languages=model.num_languages)
    texts = ["Hi.", "The quick brown fox.", "안녕하세요", "One two three.", "네"]
    targets = [tokenizer.encode(" " + text) for text in texts]
    languages = ["en", None, "ko", None, "ko"]
    bounds = [1, 30, 12, 7, 20]
    got = whisper_decode.verified_decode(model, features, targets, languages, bounds)
    expected, detected = greedy_alone(model, features, languages, bounds)
    assert [a.tokens for a in got] == expected
    assert [a.language for a in got] == detected
    assert [len(a.tokens) for a in got] == bounds  # the bound, not an EOT, ended each
    with pytest.raises(ValueError, match=r"greedy bounds must be None or in \[1, 444\]"):
        whisper_decode.verified_decode(model, features[:1], targets[:1], ["en"], [445])


def test_each_clip_stops_on_its_own(monkeypatch):
    """Clips that stop early leave the batch: the long one decodes on alone, and the rows computed
    are far fewer than whisper.decode's batch kept to its longest clip."""
    model = scoring.random_tiny_whisper(seed=3)
    audios = [noise(1.0 + i / 4, 30 + i) for i in range(4)]
    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(a), 80) for a in audios])
    with torch.inference_mode():
        features = model.encoder(mel)
    tokenizer = get_tokenizer(True, num_languages=model.num_languages)
    targets = [tokenizer.encode(" a clip")] * 4
    bounds = [3, 3, 2, 40]
    calls = counted_calls(monkeypatch)
    got = whisper_decode.verified_decode(model, features, targets, ["en"] * 4, bounds)
    assert [a.tokens for a in got] == greedy_alone(model, features, ["en"] * 4, bounds)[0]
    assert [len(a.tokens) for a in got] == bounds
    rows = [n_rows for n_rows, _ in calls]
    assert rows[0] == 4 and rows[-1] == 1
    assert sum(rows) <= 4 * 3 + len(calls)  # the others gone after their third token


def test_scorer_scores_equal_the_whisper_decode_path(tiny_en):
    """WhisperScorer's verified transcripts and NLLs are those of its whisper.decode path (kept for
    bench.py), silence undecoded in both: transcript "", CER 1."""
    model, rows, _, _ = tiny_en
    rows = rows[:6]  # two sentences, clean, noisy (it loops) and silent
    n_samples = int(WINDOW_S * 16000)
    audios = [read_wav(os.path.join(SPEECH, row["wav"]))[:n_samples] for row in rows]
    texts = [row["text"] for row in rows]
    kw = dict(batch_size=4, window_s=WINDOW_S, prosody_threads=1)
    verified = scoring.WhisperScorer(model, "cpu", "en", **kw)
    old = scoring.WhisperScorer(model, "cpu", "en", transcripts="whisper.decode", **kw)
    got = verified.score(audios, texts)
    expected = old.score(audios, texts)
    assert [s.transcript for s in got] == [s.transcript for s in expected]
    assert [s.cer for s in got] == [s.cer for s in expected]
    assert [s.nll for s in got] == pytest.approx([s.nll for s in expected], abs=1e-4)
    silent = [s for s, row in zip(got, rows) if row["kind"] == "silence"]
    assert [(s.transcript, s.cer) for s in silent] == [("", 1.0)] * 2
    assert verified.draft_stats.calls >= 3 and verified.draft_stats.accepted > 0


def test_blank_and_eot_are_suppressed_at_the_first_token_only():
    """A Whisper whose every logit ranks " ", then EOT, then " a" first: whisper.decode's first
    token is " a" (suppress_blank), then " " to the bound; so is the verified transcript's."""
    model = scoring.random_tiny_whisper(seed=1)
    tokenizer = get_tokenizer(True, num_languages=model.num_languages)
    blank = tokenizer.encode(" ")[0]
    word = tokenizer.encode(" a")[0]
    with torch.no_grad():
        model.decoder.ln.weight.zero_()  # every position's last hidden state is the bias
        bias = model.decoder.ln.bias.normal_(generator=torch.Generator().manual_seed(0))
        for token, scale in [(blank, 3.0), (tokenizer.eot, 2.0), (word, 1.0)]:
            model.decoder.token_embedding.weight[token] = scale * bias
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(noise(1.0, 5)), 80)
    with torch.inference_mode():
        features = model.encoder(mel[None])
    targets = [tokenizer.encode(" a b")]
    got = whisper_decode.verified_decode(model, features, targets, ["en"], [6])
    expected, _ = greedy_alone(model, features, ["en"], [6])
    assert expected == [[word] + [blank] * 5] and [a.tokens for a in got] == expected
