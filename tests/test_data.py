"""data.py: datasets, the LLASA prompt, the speech vocabulary."""
import pytest

import data


def test_load_dataset_formats_and_errors(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": " Hello. ", "id": "a", "language": "en"}\n\n{"text": "안녕"}\n', encoding="utf-8")
    rows = data.load_dataset(str(jl))
    assert [(r.text, r.id, r.language) for r in rows] == [("Hello.", "a", "en"), ("안녕", "d.jsonl:3", None)]
    txt = tmp_path / "d.txt"
    txt.write_text("one\n\ntwo\n", encoding="utf-8")
    assert [r.text for r in data.load_dataset(str(txt))] == ["one", "two"]
    for i, (bad, why) in enumerate([('{"text": 3}', "string field 'text'"), ("{oops", "not valid JSON"),
                                    ('{"text": "  "}', "empty"),
                                    ('{"text": "x", "language": 1}', "language")]):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text('{"text": "fine"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"bad{i}\.jsonl:2: .*{why}"):
            data.load_dataset(str(f))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.load_dataset(str(tmp_path / "missing.jsonl"))
    assert len(data.load_dataset(data.SAMPLE_DATA)) >= 24  # the shipped sample data parses


def test_llasa_prompt_and_speech_vocab():
    tok = data.tiny_tokenizer(n_speech=300)
    ids = data.prompt_ids(tok, "Hi 안녕")
    text = tok.decode(ids)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nConvert the text to speech:"
                    "<|TEXT_UNDERSTANDING_START|>Hi 안녕<|TEXT_UNDERSTANDING_END|><|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n<|SPEECH_GENERATION_START|>")
    assert "<|eot_id|>" not in tok.decode(ids[-3:])  # continue_final_message: no end of turn after the start
    sv = data.speech_vocab(tok)
    assert sv.n == 300 and tok.convert_ids_to_tokens(sv.first + 7) == "<|s_7|>"
    assert sv.end_id == tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    assert set(sv.allowed_ids()) == set(range(sv.first, sv.first + 300)) | {sv.end_id}
    assert sv.to_codes([sv.first + 5, sv.first]) == [5, 0]
    with pytest.raises(ValueError, match="non-speech"):
        sv.to_codes([sv.end_id])
    with pytest.raises(ValueError, match="empty text"):
        data.prompt_ids(tok, "  ")
    assert data.tiny_tokenizer().get_vocab() == data.tiny_tokenizer().get_vocab()  # deterministic ids
