"""Incremental detokenization of the server's streams: the deltas add up to the full decode."""

from __future__ import annotations

import random

import pytest

from eet_pipe.loading.tokenizer import ByteTokenizer
from eet_pipe.serving.sequences import TextStream

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


@pytest.mark.parametrize("kind", ["bytes", "bytelevel", "metaspace"])
def test_stop_strings_end_sequences_like_a_full_decode_search(kind: str) -> None:
    """SequenceState searches only the new text for stop strings; the result equals searching the whole
    decode after every token (the stop strings are cut from the text's middle, across token edges)."""
    from eet_pipe.generation.sequences import SamplingParams, SequenceState

    if kind == "bytes":
        tok = ByteTokenizer()
        encode, decode = tok.encode, tok.decode
    else:
        bpe = _bpe(kind)
        encode, decode = (lambda t: bpe.encode(t).ids), bpe.decode
    for text in TEXTS:
        ids = encode(text)
        full = decode(ids)
        for start in range(1, max(2, len(full) - 3), 7):
            stops = [full[start:start + 3], "never there"]
            want_text, want_n = None, len(ids)
            for n in range(1, len(ids) + 1):  # the old rule: first occurrence in the whole decode
                so_far = decode(ids[:n])
                hits = [so_far.find(s) for s in stops if s in so_far]
                if hits:
                    want_text, want_n = so_far[: min(hits)], n
                    break
            state = SequenceState(SamplingParams(max_new_tokens=len(ids) + 1, stop=stops), eos_ids=[], decode=decode)
            for t in ids:
                state.append(t)
                if state.finished:
                    break
            assert (state.text, len(state.tokens)) == (want_text, want_n), (kind, text, stops)


def test_stop_string_completed_by_a_token_that_ends_in_half_a_character() -> None:
    """A token can finish a stop string and start a multi-byte character in the same bytes."""
    from eet_pipe.generation.sequences import SamplingParams, SequenceState

    pieces = {0: b"x", 1: b"ab\xe2", 2: b"\x9c\x93", 3: b"y"}

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    state = SequenceState(SamplingParams(max_new_tokens=9, stop=["xab"]), eos_ids=[], decode=decode)
    for t in [0, 1, 2, 3]:
        state.append(t)
        if state.finished:
            break
    assert state.tokens == [0, 1] and state.text == "" and state.finish_reason == "stop"
    stream = TextStream(decode, [])
    shown = "".join(stream.update([0, 1, 2, 3][: n]) for n in range(1, 5))
    assert shown == "xab✓y" == decode([0, 1, 2, 3])


def test_tokens_without_text_are_left_out_of_later_windows() -> None:
    """Ids a byte vocabulary decodes to nothing (as random weights sample them) between real bytes: the deltas
    still add up, and a long run of them does not lengthen every later decode."""
    tok = ByteTokenizer()
    rng = random.Random(1)
    text = "héllo wörld ✓ 日本語 🙂 " * 10
    ids: list[int] = []
    for b in tok.encode(text):
        ids += [rng.randrange(300, 50_000) for _ in range(rng.randrange(0, 12))] + [b]
    ids += [301] * 200
    decoded = []

    def decode(window: list[int]) -> str:
        decoded.append(len(window))
        return tok.decode(window)

    deltas, joined = _stream(decode, ids)
    assert joined == text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert max(decoded[:-1]) <= 48  # (runs inside an incomplete character wait with it); the last is `finish`
    assert sum(decoded) < 12 * len(ids)  # every window from the last text on: 36 x


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_skipped_special_tokens_between_words_keep_the_spaces(kind: str) -> None:
    tok = _bpe(kind)
    unk = tok.token_to_id("<unk>")
    rng = random.Random(2)
    for text in TEXTS:
        ids: list[int] = []
        for i in tok.encode(text).ids:
            ids += [unk] * rng.randrange(0, 4) + [i]
        ids += [unk] * 30
        decode = tok.decode  # skips special tokens
        assert _stream(decode, ids)[1] == decode(ids), (kind, text)


def test_byte_decode_skips_special_and_out_of_range_ids_and_replaces_invalid_bytes() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("añb 🙂")
    assert tok.decode(ids) == "añb 🙂"
    with_specials = [tok.bos_token_id, *ids[:3], tok.eos_token_id, -1, 999, *ids[3:], tok.pad_token_id]
    assert tok.decode(with_specials) == "añb 🙂"
    assert tok.decode([0x61, 0xC3]) == "a\ufffd" and tok.decode([0x61, 0xC3, 256]) == "a\ufffd"  # half a character
    assert tok.decode([]) == "" and tok.decode([257]) == ""


def _saved(tmp_path, backend, **kwargs):
    from transformers import PreTrainedTokenizerFast

    from eet_pipe.loading.tokenizer import HFTokenizer

    PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs).save_pretrained(tmp_path)
    return HFTokenizer(tmp_path)


def test_hf_decode_takes_the_rust_path_only_where_it_gives_the_same_text(tmp_path) -> None:
    """A byte-level BPE without space clean-up decodes through the Rust tokenizer, with transformers' text for
    any ids (special ones included); a WordPiece tokenizer that cleans up spaces keeps transformers' decode,
    whose clean-up the Rust decode lacks ("hello ." -> "hello.")."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bpe = _bpe("bytelevel")
    bpe.add_special_tokens(["<|end|>"])
    fast = _saved(tmp_path / "bpe", bpe, eos_token="<|end|>", clean_up_tokenization_spaces=False)
    assert fast._rust_decode is not None
    rng = random.Random(0)
    vocab = fast._tok.vocab_size + 1
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        assert fast.decode(ids) == fast._tok.decode(ids, skip_special_tokens=True), ids
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, ".": 2, "world": 3}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.decoder = decoders.WordPiece(cleanup=False)
    cleaned = _saved(tmp_path / "wp", wordpiece, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert wordpiece.decode([1, 2, 3]) == "hello . world"
    assert cleaned._rust_decode is None and cleaned.decode([1, 2, 3]) == "hello. world"
