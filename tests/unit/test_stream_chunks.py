"""Stream chunks without logprobs come from a precomputed prefix: byte for byte what the chunk's dict
gives through `sse`, for any text, ids, finish reason, model name and both endpoints."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from eet_pipe.serving.responses import ResponseBuilder, sse
from eet_pipe.serving.sequences import Event


@settings(max_examples=300, deadline=None)
@given(chat=st.booleans(), ids=st.booleans(), model=st.text(max_size=20), kind=st.sampled_from(["token", "finish"]),
       index=st.integers(0, 20), text=st.text(max_size=30), token_ids=st.lists(st.integers(0, 300_000), max_size=5),
       reason=st.sampled_from([None, "stop", "length"]), logprobs_asked=st.booleans())
def test_a_chunk_is_the_dict_it_stands_for(chat, ids, model, kind, index, text, token_ids, reason, logprobs_asked):
    builder = ResponseBuilder(chat, model, lambda t: chr(65 + t % 26), logprobs_asked, token_ids=ids)
    ev = Event(kind, index=index, text=text, token_ids=token_ids, finish_reason=reason)
    chunk = builder.event_chunk(ev)
    if kind == "token" and not text and not ids:
        assert chunk is None
    else:
        assert chunk == builder._dict_chunk(ev, None)  # the dict path, which chunks with logprobs take
        head = {**builder._head(True), "choices": [json.loads(chunk[6:])["choices"][0]]}
        assert chunk == sse(head)


def test_chunks_with_logprobs_still_carry_them():
    builder = ResponseBuilder(False, "m", lambda t: "ab"[t], True)
    chunk = builder.event_chunk(Event("token", text="a", token_ids=[0], logprobs=[(0, -0.5, [(1, -1.0)])]))
    assert '"logprobs":{"tokens":["a"],"token_logprobs":[-0.5],"top_logprobs":[{"b":-1.0}],"text_offset":[0]}' in chunk
