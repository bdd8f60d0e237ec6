"""data.py: datasets, the LLASA prompt, the speech vocabulary, --epochs."""

import json

import pytest

import config
import data


def test_load_dataset_formats_and_errors(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text(
        '{"text": " Hello. ", "id": "a", "language": "en"}\n\n{"text": "안녕"}\n', encoding="utf-8"
    )
    rows = data.load_dataset(str(jl))
    assert [(r.text, r.id, r.language) for r in rows] == [
        ("Hello.", "a", "en"),
        ("안녕", "d.jsonl:3", None),
    ]
    txt = tmp_path / "d.txt"
    txt.write_text("one\n\ntwo\n", encoding="utf-8")
    assert [r.text for r in data.load_dataset(str(txt))] == ["one", "two"]
    for i, (bad, why) in enumerate(
        [
            ('{"text": 3}', "string field 'text'"),
            ("{oops", "not valid JSON"),
            ('{"text": "  "}', "empty"),
            ('{"text": "x", "language": 1}', "language"),
        ]
    ):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text('{"text": "fine"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"bad{i}\.jsonl:2: .*{why}"):
            data.load_dataset(str(f))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        data.load_dataset(str(tmp_path / "missing.jsonl"))
    assert len(data.load_dataset(data.SAMPLE_DATA)) >= 24  # the shipped sample data parses


def test_llasa_prompt_and_speech_vocab():
    tok = data.tiny_tokenizer(n_speech=300)
    ids = data.prompt_ids(tok, "Hi 안녕")
    text = tok.decode(ids)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nConvert the text to speech:"
        "<|TEXT_UNDERSTANDING_START|>Hi 안녕<|TEXT_UNDERSTANDING_END|><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|SPEECH_GENERATION_START|>"
    )
    # continue_final_message: no end of turn after the start
    assert "<|eot_id|>" not in tok.decode(ids[-3:])
    sv = data.speech_vocab(tok)
    assert sv.n == 300
    assert tok.convert_ids_to_tokens(sv.first + 7) == "<|s_7|>"
    assert sv.end_id == tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    assert set(sv.allowed_ids()) == set(range(sv.first, sv.first + 300)) | {sv.end_id}
    assert sv.to_codes([sv.first + 5, sv.first]) == [5, 0]
    with pytest.raises(ValueError, match="non-speech"):
        sv.to_codes([sv.end_id])
    with pytest.raises(ValueError, match="empty text"):
        data.prompt_ids(tok, "  ")
    # deterministic ids
    assert data.tiny_tokenizer().get_vocab() == data.tiny_tokenizer().get_vocab()


# ---- voice prompts -------------------------------------------------------------------------------


def _wav(path, seconds=0.2, rate=16000):
    import numpy as np
    import soundfile as sf

    sf.write(path, (0.1 * np.sin(np.arange(int(seconds * rate)) * 0.05)).astype("float32"), rate)


def test_voice_prompt_rows_and_their_errors(tmp_path):
    """prompt_wav (relative to the file) + prompt_text, both or neither; missing or unreadable
    audio stops the load with file and line."""
    (tmp_path / "v").mkdir()
    _wav(tmp_path / "v" / "a.wav")
    good = tmp_path / "d.jsonl"
    good.write_text(
        '{"text": "Hi.", "prompt_wav": "v/a.wav", "prompt_text": " A voice. "}\n'
        '{"text": "Plain."}\n'
    )
    rows = data.load_dataset(str(good))
    assert rows[0].prompt_wav == str(tmp_path / "v" / "a.wav")
    assert rows[0].prompt_text == "A voice."
    assert rows[1].prompt_wav is None
    assert rows[1].prompt_text is None
    (tmp_path / "v" / "junk.wav").write_bytes(b"not audio at all")
    for i, (row, err, why) in enumerate(
        [
            ('{"text": "x", "prompt_wav": "v/a.wav"}', ValueError, "needs both"),
            ('{"text": "x", "prompt_text": "y"}', ValueError, "needs both"),
            (
                '{"text": "x", "prompt_wav": "v/none.wav", "prompt_text": "y"}',
                FileNotFoundError,
                "not found",
            ),
            (
                '{"text": "x", "prompt_wav": "v/junk.wav", "prompt_text": "y"}',
                ValueError,
                "cannot be read",
            ),
        ]
    ):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text('{"text": "fine"}\n' + row + "\n")
        with pytest.raises(err, match=rf"bad{i}\.jsonl:2: .*{why}"):
            data.load_dataset(str(f))


def test_seed_tts_eval_lists(tmp_path):
    _wav(tmp_path / "p1.wav")
    lst = tmp_path / "meta.lst"
    lst.write_text(
        "u1|Prompt one.|p1.wav|Say this.\n\nu2|Prompt two.|p1.wav|And this.|gt/u2.wav\n",
        encoding="utf-8",
    )
    rows = data.load_dataset(str(lst))
    assert [(r.id, r.text, r.prompt_text) for r in rows] == [
        ("u1", "Say this.", "Prompt one."),
        ("u2", "And this.", "Prompt two."),
    ]
    assert rows[1].prompt_wav == str(tmp_path / "p1.wav")
    assert rows[1].source == f"{lst}:3"
    for i, (line, err, why) in enumerate(
        [
            ("u3|a|p1.wav", ValueError, "4 or 5"),
            ("u3|a|missing.wav|text", FileNotFoundError, "not found"),
            ("|a|p1.wav|text", ValueError, "empty"),
        ]
    ):
        bad = tmp_path / f"bad{i}.lst"
        bad.write_text("u1|Prompt one.|p1.wav|Say this.\n" + line + "\n")
        with pytest.raises(err, match=rf"bad{i}\.lst:2: .*{why}"):
            data.load_dataset(str(bad))


def test_clone_prompt_ids_equal_a_hand_built_llasa_prompt():
    """LLASA's clone prompt, as its model card builds it: text = prompt_text + text joined with
    nothing (`input_text = prompt_text + target_text`; no space token LLASA never saw at the seam
    of a Chinese or Japanese pair), the assistant turn going on after <|SPEECH_GENERATION_START|>
    with the prompt's speech tokens."""
    tok = data.tiny_tokenizer(n_speech=300)
    for prompt_text, text in (("A voice.", "Say this."), ("我是一个声音。", "请说这个。")):
        chat = [
            {
                "role": "user",
                "content": "Convert the text to speech:<|TEXT_UNDERSTANDING_START|>"
                f"{prompt_text}{text}<|TEXT_UNDERSTANDING_END|>",
            },
            {"role": "assistant", "content": "<|SPEECH_GENERATION_START|><|s_3|><|s_299|><|s_0|>"},
        ]
        rendered = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
        want = tok(rendered, add_special_tokens=False)["input_ids"]
        assert data.prompt_ids(tok, text, prompt_text, [3, 299, 0]) == want
    plain = data.prompt_ids(tok, "Say this.")
    assert want[: len(plain) - 1] != plain[:-1]  # the text differs too (prompt text first)
    with pytest.raises(ValueError, match="outside"):
        data.prompt_ids(tok, "Say this.", "A voice.", [300])
    with pytest.raises(ValueError, match="both"):
        data.prompt_ids(tok, "Say this.", "A voice.")


# Llama-3.2-Instruct's way (Llasa's template) of printing a date in its system header: the
# caller's date_string, else today's (transformers' strftime_now), else its own fallback.
DATED_TEMPLATE = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}"
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n"
    "Today Date: {{ date_string }}<|eot_id|>"
    + data.LLAMA3_CHAT_TEMPLATE.removeprefix("{{ bos_token }}")
)


def test_prompt_ids_do_not_depend_on_todays_date(monkeypatch):
    """Llasa's chat template prints today's date unless given one: the prompt ids would change from
    one day to the next, and across a --resume. They are rendered with data.CHAT_DATE instead."""
    import datetime

    from transformers.utils import chat_template_utils

    tok = data.tiny_tokenizer(n_speech=300)
    tok.chat_template = DATED_TEMPLATE
    days = []
    for day in (datetime.datetime(2025, 1, 1), datetime.datetime(2026, 6, 30)):

        class Today(datetime.datetime):  # what the template's strftime_now reads as "now"
            @classmethod
            def now(cls, tz=None, day=day):
                return day

        monkeypatch.setattr(chat_template_utils, "datetime", Today)
        # the template does print "today"
        assert (
            tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).count(
                day.strftime("%d %b %Y")
            )
            == 1
        )
        days.append(
            (data.prompt_ids(tok, "Say this."), data.prompt_ids(tok, "Say this.", "A voice.", [3]))
        )
    assert days[0] == days[1]
    assert tok.decode(days[0][0]).count(f"Today Date: {data.CHAT_DATE}") == 1


def test_read_audio_resamples_to_16k(tmp_path):
    import numpy as np
    import soundfile as sf

    t = np.arange(8000) / 8000
    # stereo, 8 kHz, 1 s
    sf.write(tmp_path / "a.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1), 8000)
    audio = data.read_audio(str(tmp_path / "a.wav"))
    want = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert audio.dtype == np.float32
    assert audio.shape == (16000,)
    assert np.abs(audio - want)[100:-100].max() < 0.02  # the same tone at the new rate


@pytest.mark.parametrize("flag", [["--sim-weight", "0.5"], ["--guard", "sim"]])
def test_speaker_similarity_flags_need_voice_prompts(tmp_path, flag):
    """--sim-weight / --guard sim on data without prompt_wav would train on sim = 0 silently:
    refused at load, naming the file; the clone preset's data (voice prompts) loads."""
    plain = config.parse_config(["--preset", "tiny", "--out", str(tmp_path / "run"), *flag])
    with pytest.raises(ValueError, match=f"{plain.data}: no row has a prompt_wav, so {flag[0]}"):
        data.load_data(plain)
    clone = config.parse_config(["--preset", "tiny-clone", "--out", str(tmp_path / "run"), *flag])
    examples, _ = data.load_data(clone)
    assert all(ex.prompt_wav for ex in examples)


def test_epoch_steps_pass_over_the_data():
    assert data.epoch_steps(1, 15000, 8) == 1875  # the seed's one epoch of its 15K Korean rows
    assert data.epoch_steps(1, 10, 4) == 3  # the last step partial
    assert data.epoch_steps(2.5, 10, 4) == 7
    assert data.epoch_steps(0.1, 80, 8) == 1  # not 2: 0.1 * 80 / 8 is 1.0000000000000002 in floats
    assert data.epoch_steps(0.01, 10, 4) == 1  # at least one step


def test_epochs_flag_sets_the_runs_steps(tmp_path, monkeypatch, capsys):
    """--epochs E: the trainer runs ceil(E * rows / --prompts-per-step) steps, not --steps (the
    tiny preset's 6): 6 rows at 4 prompts a step, one epoch, is 2 steps. A negative value is a
    user's error."""
    import grpo
    import parallel
    from helpers import _FakeScorer, _tiny

    class Scorer(_FakeScorer):
        def close(self):
            pass

    rows = tmp_path / "six.jsonl"
    rows.write_text("".join(json.dumps({"text": f"Sentence number {i}."}) + "\n" for i in range(6)))
    no_worker = lambda cfg, d, speaker_model=None: (None, Scorer(0.5))  # noqa: E731
    monkeypatch.setattr(parallel, "start_scorer", no_worker)
    cfg = _tiny(tmp_path, "--data", str(rows), "--val-data", "", "--epochs", "1")
    history = grpo.train(cfg)
    assert cfg.steps == 2
    assert [m["step"] for m in history] == [1, 2]
    assert "steps 1-2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        config.parse_config(["--preset", "tiny", "--epochs", "-1"])
    assert exit_.value.code == 2
    assert "--epochs -1.0: must be >= 0" in capsys.readouterr().err
