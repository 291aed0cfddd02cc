import pytest

from pipelines.prompts.parser import (parse_attention, prompt_schedule, split_and, text_at_step,
                                      uses_emphasis)


def _approx(result):
    return [(t, pytest.approx(w, abs=1e-4)) for t, w in result]


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    ("[word]", [("word", 0.9091)]),
    ("((word))", [("word", 1.21)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(x:-0.5)", [("x", -0.5)]),
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("no:weight here)", [("no:weight here)", 1.0)]),
])
def test_attention_documented_examples(text, expected):
    assert _approx(parse_attention(text)) == _approx(expected)


def test_unbalanced_square_and_escaped_backslash():
    assert _approx(parse_attention("[unbalanced")) == _approx([("unbalanced", 1 / 1.1)])
    assert parse_attention("a \\\\ b") == [("a \\ b", 1.0)]


def test_bad_weight_is_value_error():
    with pytest.raises(ValueError, match="not a valid weight"):
        parse_attention("(x:1.2.3)")


def test_weight_one_equals_plain():
    assert parse_attention("a (cat:1.0) b") == [("a cat b", 1.0)]
    assert not uses_emphasis("a (cat:1.0)") and uses_emphasis("(cat)")


@pytest.mark.parametrize("prompt, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[from::4] x", [(4, "from x"), (10, " x")]),
    ("a | b [c:d:5]", [(10, "a | b [c:d:5]")]),  # '|' outside brackets: no editing, like A1111
    ("", [(10, "")]),
])
def test_schedule_documented_examples(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_alternation_switches_every_step():
    schedule = prompt_schedule("[a|(b:1.1)]", 10)
    assert [s for s, _ in schedule] == list(range(1, 11))
    assert [t for _, t in schedule] == ["a", "(b:1.1)"] * 5
    assert [t for _, t in prompt_schedule("[fe|||]male", 4)] == ["female", "male", "male", "male"]
    # A1111 picks entries by its 0-based call counter (see test_cat_dog_...): the first two
    # steps both use the first option, then it alternates every step.
    assert [text_at_step(schedule, s) for s in range(1, 11)] == ["a", "a"] + ["(b:1.1)", "a"] * 4


def test_cat_dog_half_over_twenty_steps():
    schedule = prompt_schedule("[cat:dog:0.5]", 20)
    assert schedule == [(10, "cat"), (20, "dog")]
    # The issue text said "cat for steps 1-10, dog after"; A1111 really gives cat for steps 1-11:
    # CFGDenoiser.step starts at 0 and reconstruct_cond_batch takes the first entry with
    # step <= end_at_step, so calls 0..10 (11 steps) get "cat" and calls 11..19 (9 steps) "dog".
    assert [text_at_step(schedule, s) for s in range(1, 21)] == ["cat"] * 11 + ["dog"] * 9
    assert prompt_schedule("[cat:dog:10]", 20) == schedule  # fraction and step number agree
    assert [text_at_step(prompt_schedule("[cat:dog:1]", 3), s) for s in (1, 2, 3)] == ["cat", "cat", "dog"]


def test_nested_editing_inside_emphasis_and_alternation():
    assert prompt_schedule("(a [b:c:2]:1.2)", 4) == [(2, "(a b:1.2)"), (4, "(a c:1.2)")]
    assert prompt_schedule("[x|[y:z:2]]", 3) == [(1, "x"), (2, "y"), (3, "x")]


def test_step_beyond_total_is_clamped_and_zero_means_after():
    assert prompt_schedule("[a:b:50]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:0]", 10) == [(10, "b")]


def test_split_and_with_weights():
    assert split_and("a cat :1.2 AND a dog AND sky: 0.5") == [("a cat", 1.2), (" a dog", 1.0), (" sky", 0.5)]
    assert split_and("ANDROID robot") == [("ANDROID robot", 1.0)]
    assert split_and("") == [("", 1.0)]
