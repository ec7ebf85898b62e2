"""Incremental detokenization of the server's streams: the deltas add up to the full decode."""

from __future__ import annotations

import random

import pytest

from eet_pipe.serving.sequences import TextStream
from eet_pipe.tokenizer import ByteTokenizer

TEXTS = ["Hello world", "héllo wörld ✓ 日本語 🙂 done", "a" * 300 + " ünïcödé " * 20, "🙂🙂🙂x", "line\nbreak\ttab  spaces "]


def _stream(decode, ids: list[int], stop: list[str] | None = None) -> tuple[list[str], str]:
    s = TextStream(decode, stop or [])
    deltas = [s.update(ids[: i + 1]) for i in range(len(ids))]
    deltas.append(s.finish(decode(ids)))
    return deltas, "".join(deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokens_add_up_and_never_show_half_characters(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    deltas, joined = _stream(tok.decode, ids)
    assert joined == text
    assert not any("\ufffd" in d for d in deltas)
    shown = ""
    for i, d in enumerate(deltas[:-1]):  # what is shown is always final text, and never lags by much
        shown += d
        assert text.startswith(shown)
        assert len(tok.decode(ids[: i + 1]).rstrip("\ufffd")) - len(shown) <= 0


def test_stop_strings_hold_back_their_length_minus_one() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("abcdefgh")
    s = TextStream(tok.decode, ["xyz1"])  # hold 3 characters
    shown = "".join(s.update(ids[: i + 1]) for i in range(len(ids)))
    assert shown == "abcde"
    assert s.finish("abcdefgh") == "fgh"


def test_invalid_bytes_in_the_middle_are_shown_once_complete_text_follows() -> None:
    tok = ByteTokenizer()
    ids = [104, 105, 0xFF, 106, 107]  # 'hi', an invalid byte, 'jk'
    _, joined = _stream(tok.decode, ids)
    assert joined == tok.decode(ids) == "hi\ufffdjk"


def _bpe(kind: str):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>"))
    if kind == "bytelevel":  # GPT-2 style
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # sentencepiece style: '▁' marks a leading space, stripped at the start of a decode
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = sorted(set("".join(TEXTS)) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, special_tokens=["<unk>"])
    tok.train_from_iterator(TEXTS * 5, trainer)
    assert tokenizers.__version__
    return tok


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_subword_tokenizers_add_up_to_the_full_decode(kind: str) -> None:
    tok = _bpe(kind)
    rng = random.Random(0)
    for text in [*TEXTS, "the wörld said hello to the ünïcödé"]:
        ids = tok.encode(text).ids
        decode = tok.decode
        deltas, joined = _stream(decode, ids)
        assert joined == decode(ids), (kind, text)
        assert not any("\ufffd" in d for d in deltas[:-1])
        # and on token soup, where neighbouring pieces merge into other characters
        soup = [rng.randrange(tok.get_vocab_size()) for _ in range(60)]
        assert _stream(decode, soup)[1] == decode(soup)


def test_each_update_decodes_a_short_window_not_the_whole_output() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo wörld ✓ " * 100)  # 1 800 tokens
    decoded = []

    def decode(window: list[int]) -> str:
        decoded.append(len(window))
        return tok.decode(window)

    s = TextStream(decode, ["STOP"])
    shown = "".join(s.update(ids[: i + 1]) for i in range(len(ids)))
    assert shown + s.finish(tok.decode(ids)) == tok.decode(ids)
    assert sum(decoded) < 8 * len(ids)  # whole-output decoding would be ~len(ids)^2 / 2
