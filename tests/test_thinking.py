"""Reasoning is split from the answer however the stream is cut into pieces."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from cascade_local.thinking import ThinkingSplitter


def split_all(pieces: list[str], in_reasoning: bool, may_open: bool = False) -> tuple[str, str]:
    splitter = ThinkingSplitter(in_reasoning, may_open)
    for piece in pieces:
        splitter.feed(piece)
    splitter.flush()
    return splitter.reasoning, splitter.content


def cut(text: str, points: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(p % (len(text) + 1) for p in points)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_any_cut_of_a_thinking_stream(points):
    text = "Let me think: 2+2</thin is not a tag.\n</think>\nThe answer is <b>4</b>."
    assert split_all(cut(text, points), in_reasoning=True) == (
        "Let me think: 2+2</thin is not a tag.\n", "\nThe answer is <b>4</b>.")


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_any_cut_when_the_model_opens_its_own_think(points):
    text = "<think>plan</think>done <thin"
    assert split_all(cut(text, points), in_reasoning=False, may_open=True) == ("plan", "done <thin")


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_with_thinking_off_think_tags_are_answer_text(points):
    """The prompt closed the thought: a stray </think> (or <think>) never turns the answer into reasoning."""
    text = "Part one</think>part two <think>three</think> four"
    assert split_all(cut(text, points), in_reasoning=False) == ("", text)


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_once_the_thought_is_closed_later_tags_are_answer_text(points):
    text = "plan</think>answer <think>not a thought</think> end"
    assert split_all(cut(text, points), in_reasoning=True) == (
        "plan", "answer <think>not a thought</think> end")


def test_never_closed_thinking_is_all_reasoning():
    assert split_all(["still ", "thinking <", "/thi"], in_reasoning=True) == ("still thinking </thi", "")


def test_pieces_come_out_in_order_with_kinds():
    splitter = ThinkingSplitter(True)
    kinds = [(p.kind, p.text) for piece in ["a</th", "ink>b"] for p in splitter.feed(piece)]
    assert kinds == [("reasoning", "a"), ("content", "b")]
