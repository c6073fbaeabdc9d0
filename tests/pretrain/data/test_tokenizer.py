import pytest

from pretrain.data import EOS_TOKEN, eos_id, load_tokenizer, train_tokenizer
from pretrain.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok_path(corpus, tmp_path_factory):
    root, _ = corpus
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(sorted(root.rglob("*.txt")), 300, path)
    return path


def test_roundtrip_any_text(tok_path):
    tok = load_tokenizer(tok_path)
    # Characters never seen in training (emoji, CJK, control chars) must survive too: byte-level BPE.
    for text in ["kalo mi, tsuvan.\n", "  leading and trailing  ", "héllo wörld 🙂 日本語 \t\r\n\x00", ""]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    # Training merged frequent syllables: the corpus encodes to fewer tokens than bytes.
    assert len(tok.encode("kalomi tsuvan kalo").ids) < len("kalomi tsuvan kalo")


def test_vocab_and_eos(tok_path):
    tok = load_tokenizer(tok_path)
    assert tok.get_vocab_size() == 300
    assert tok.id_to_token(eos_id(tok)) == EOS_TOKEN
    assert tok.encode(EOS_TOKEN).ids == [eos_id(tok)]


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_tokenizer(bad)


def test_vocab_too_small(corpus, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(sorted(corpus[0].rglob("*.txt")), 100, tmp_path / "t.json")
