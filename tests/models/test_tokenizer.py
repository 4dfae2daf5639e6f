import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from models.demo import BOS_ID, EOS_ID, build_tokenizer
from models.tokenizer import IncrementalDetokenizer, NoTokenizer, Tokenizer

TEXT = "héllo 世界 🙂 ok\n👩‍💻!"


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    """A byte-level tokenizer (the demo's) with its config files."""
    directory = tmp_path_factory.mktemp("bytes")
    build_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
         "add_bos_token": True}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID, 10]}))
    return directory


@pytest.fixture(scope="module")
def tok(byte_dir):
    return Tokenizer.from_dir(byte_dir)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int) -> list[str]:
    pieces = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces + [detok.flush()]


# -- Tokenizer ------------------------------------------------------------------------------
def test_round_trip_and_special_ids(tok):
    ids = tok.encode(TEXT)
    assert ids[0] == BOS_ID
    assert ids[1:] == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + TEXT
    assert tok.bos_token_id == BOS_ID
    assert tok.eos_token_ids == (EOS_ID, 10)  # generation_config's list, then tokenizer_config's
    assert tok.vocab_size == 258
    assert tok.token_to_id("</s>") == EOS_ID


def test_add_bos_token_false_wins_over_post_processor(tmp_path):
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_dir(tmp_path).encode("a") == [BOS_ID, 97]  # post-processor adds bos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.from_dir(tmp_path).encode("a") == [97]


def test_ids_from_config_json(tmp_path):
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, (2,))


def test_missing_tokenizer_raises_no_tokenizer(tmp_path):
    with pytest.raises(NoTokenizer, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    assert issubclass(NoTokenizer, ValueError)


def test_bad_files_raise_value_error(tmp_path, tok):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="string"):
        tok.encode([1, 2])


# -- IncrementalDetokenizer -------------------------------------------------------------------
def test_incremental_never_emits_partial_characters(tok):
    ids = tok.encode(TEXT)[1:]
    for chunk in (1, 2, 3, 5, len(ids)):
        pieces = stream(IncrementalDetokenizer(tok), ids, chunk)
        assert "".join(pieces) == TEXT
        assert not any("\ufffd" in piece for piece in pieces)


def test_incremental_holds_back_until_character_completes(tok):
    detok = IncrementalDetokenizer(tok)
    emoji = list("🙂".encode("utf-8"))
    assert detok.push([ord("a")]) == "a"
    assert [detok.push([b]) for b in emoji] == ["", "", "", "🙂"]
    assert detok.push(list("世".encode("utf-8"))[:2]) == ""
    assert detok.flush() == "\ufffd"  # an unfinished character at the end is rendered, not lost


def test_incremental_excludes_prompt_and_skips_specials(tok):
    prompt = tok.encode("prompt é")
    output = list("🙂 next".encode("utf-8"))
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    pieces = [detok.push([i]) for i in output[:3]] + [detok.push([EOS_ID] * 50)]
    pieces += [detok.push([i]) for i in output[3:]] + [detok.flush()]
    assert "".join(pieces) == "🙂 next"
    assert pieces[:3] == ["", "", ""]
    assert detok.flush() == ""


@pytest.fixture(scope="module")
def sentencepiece_tok(tmp_path_factory):
    """A Llama-2-style tokenizer: '▁' marks spaces, bytes fall back to <0xNN> tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ("▁", "▁hello", "▁world", "!"):
        vocab[piece] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<s>", "</s>"])
    directory = tmp_path_factory.mktemp("spm")
    hf.save(str(directory / "tokenizer.json"))
    return Tokenizer.from_dir(directory)


def test_incremental_sentencepiece_spaces_and_byte_fallback(sentencepiece_tok):
    tok = sentencepiece_tok
    ids = [tok.token_to_id(p) for p in ("▁hello", "▁world", "!", "▁")]
    ids += [3 + b for b in "🙂".encode("utf-8")] + [tok.token_to_id("▁world")]
    full = tok.decode(ids)
    assert full == "hello world! 🙂 world"
    for chunk in (1, 2, 4):
        pieces = stream(IncrementalDetokenizer(tok), ids, chunk)
        assert "".join(pieces) == full
        assert not any("\ufffd" in piece for piece in pieces)
    # After a prompt, the first output token keeps its leading space.
    detok = IncrementalDetokenizer(tok, prompt_ids=[1, tok.token_to_id("▁hello")])
    assert detok.push([tok.token_to_id("▁world")]) == " world"
