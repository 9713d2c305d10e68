import json

import numpy as np
import pytest
import torch

from llm_caption.captioning.vocab import Vocabulary

CAPTIONS = ["a red circle", "a blue square", "a red square to the left of a blue circle", "a rare word"]


def test_special_tokens_come_first_and_min_count_filters():
    vocab = Vocabulary.build(CAPTIONS, min_count=2, max_len=8)
    assert vocab.itos[:4] == ["<pad>", "<sos>", "<eos>", "<unk>"]
    assert vocab.itos[4] == "a"  # most frequent first
    assert "rare" not in vocab and "red" in vocab
    assert vocab.stoi["a"] == 4


def test_encode_fixed_length_and_decode_round_trip():
    vocab = Vocabulary.build(CAPTIONS, min_count=1, max_len=8)
    ids = vocab.encode("A red circle.", 8)
    assert len(ids) == 8
    assert ids[0] == 1 and ids[4] == 2 and ids[5:] == [0, 0, 0]
    assert vocab.decode(ids) == "a red circle"
    assert vocab.decode(torch.tensor(ids)) == "a red circle"
    assert vocab.decode(np.array([1, 0, vocab.stoi["blue"], 2, vocab.stoi["red"]])) == "blue"
    assert vocab.decode(vocab.encode("a zebra circle")) == "a <unk> circle"


def test_truncation_keeps_eos_and_reports_it():
    vocab = Vocabulary.build(CAPTIONS, max_len=5)
    ids, truncated = vocab.encode_with_info("a red square to the left")
    assert truncated and len(ids) == 5 and ids[-1] == 2
    assert vocab.decode(ids) == "a red square"
    _, truncated = vocab.encode_with_info("a red square")
    assert not truncated


def test_to_dict_from_dict_json_round_trip():
    vocab = Vocabulary.build(CAPTIONS, min_count=2, max_len=12)
    data = json.loads(json.dumps(vocab.to_dict()))
    assert set(data) == {"itos", "min_count", "max_len"}
    again = Vocabulary.from_dict(data)
    assert again.itos == vocab.itos and again.min_count == 2 and again.max_len == 12
    assert again.encode("a blue circle") == vocab.encode("a blue circle")


def test_rejects_bad_special_tokens():
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(itos=["a", "<sos>", "<eos>", "<unk>"])
