import pytest

from router.output import OutputProcessor, StopStringMatcher
from tests.router.helpers import demo_tokenizer


def run(matcher, pieces):
    out, matched_at = [], None
    for i, piece in enumerate(pieces):
        text, matched = matcher.push(piece)
        out.append(text)
        if matched:
            matched_at = i
            break
    return out, matched_at


def test_stop_string_inside_one_piece_cuts_before_it():
    assert run(StopStringMatcher(["END"]), ["abcENDxyz"]) == (["abc"], 0)


def test_stop_string_spanning_pieces_holds_back_the_partial_match():
    out, at = run(StopStringMatcher(["END"]), ["ab", "cE", "N", "Dzz"])
    assert out == ["ab", "c", "", ""] and at == 3
    assert "".join(out) == "abc"


def test_partial_match_that_does_not_complete_is_released():
    m = StopStringMatcher(["END"])
    assert m.push("xE") == ("x", False)
    assert m.push("Nx") == ("ENx", False)
    assert m.push("E") == ("", False)
    assert m.flush() == "E"


def test_earliest_of_several_stop_strings_wins_and_overlaps_are_held():
    m = StopStringMatcher(["bcd", "ab"])
    assert m.push("xa") == ("x", False)     # "a" may start "ab"
    assert m.push("bcd") == ("", True)      # "ab" at 0 comes before "bcd" at 1
    m = StopStringMatcher(["aab"])
    assert m.push("aa") == ("", False)
    assert m.push("a") == ("a", False)      # "aaa": keep the last "aa"
    assert m.push("b") == ("", True)


def test_matcher_needs_non_empty_stop_strings():
    with pytest.raises(ValueError):
        StopStringMatcher([])
    with pytest.raises(ValueError):
        StopStringMatcher(["a", ""])


def test_output_processor_detokenizes_bytes_and_stops_on_text():
    tok = demo_tokenizer()
    proc = OutputProcessor(tok, [256, 104], ["lo w"])
    pieces = [proc.push(ord(c)) for c in "ello world"]
    # "l" may start "lo w": held; the second "l" releases the first; "lo w" stops.
    assert pieces[:6] == [("e", False), ("", False), ("l", False), ("", False), ("", False), ("", True)]


def test_output_processor_multibyte_character_spans_tokens():
    tok = demo_tokenizer()
    proc = OutputProcessor(tok, [256], ())
    data = "é!".encode()
    assert [proc.push(b) for b in data] == [("", False), ("é", False), ("!", False)]
    assert proc.finish() == ("", False)


def test_finish_flushes_held_text_or_completes_a_stop():
    tok = demo_tokenizer()
    proc = OutputProcessor(tok, [256], ["xyz"])
    assert proc.push(ord("a")) == ("a", False)
    assert proc.push(ord("x")) == ("", False)
    assert proc.finish() == ("x", False)
    assert OutputProcessor(None, [1], ()).push(5) == ("", False)
