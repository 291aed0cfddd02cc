import pytest

from pipelines.prompts.source import PromptSource
from pipelines.prompts.styles import Style, StyleStore, merge_style_text
from pipelines.prompts.wildcards import WildcardResolver
from pipelines.request import GenerationRequest

A1111_CSV = ('name,prompt,negative_prompt\n'
             '"Cinematic","cinematic still of {prompt}, film grain","cartoon, drawing"\n'
             'Warm,"warm light, golden hour",\n'
             'Empty,,\n')


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(A1111_CSV, encoding="utf-8")
    return StyleStore(path)


def test_reads_a1111_csv_and_applies_in_order(store):
    assert store.names() == ["Cinematic", "Warm", "Empty"]
    prompt, negative = store.apply(["Cinematic", "Warm"], "a fox", "blurry")
    assert prompt == "cinematic still of a fox, film grain, warm light, golden hour"
    assert negative == "blurry, cartoon, drawing"
    assert merge_style_text("style", "") == "style" and merge_style_text("", "p") == "p"


def test_extract_reverses_apply(store):
    prompt, negative = store.apply(["Cinematic", "Warm"], "a fox", "blurry")
    assert store.extract(prompt, negative) == (["Cinematic", "Warm"], "a fox", "blurry")
    assert store.extract("a fox", "") == ([], "a fox", "")


def test_unknown_style_is_value_error(store):
    with pytest.raises(ValueError, match="unknown style"):
        store.apply(["Nope"], "x", "")


def test_save_replace_delete_keep_the_a1111_format(store):
    store.save(Style("Warm", "warmer", "cold"))
    store.save(Style("New", "{prompt} at night", ""))
    assert [s.name for s in store.load()] == ["Cinematic", "Warm", "Empty", "New"]
    assert store.get(["Warm"])[0] == Style("Warm", "warmer", "cold")
    store.delete("Empty")
    text = store.path.read_text()
    assert text.splitlines()[0] == "name,prompt,negative_prompt" and "Empty" not in text
    with pytest.raises(ValueError):
        store.save(Style(" ", "x"))
    assert StyleStore(store.path.parent / "none.csv").load() == []


@pytest.fixture
def wildcards(tmp_path):
    folder = tmp_path / "wildcards"
    (folder / "sub").mkdir(parents=True)
    (folder / "colour.txt").write_text("red\nblue\ngreen\n")
    (folder / "sub" / "shape.txt").write_text("circle\nsquare\n")
    return WildcardResolver(folder)


def test_random_wildcards_follow_the_seed(wildcards):
    assert wildcards.names() == ["colour", "sub/shape"]
    first = wildcards.resolve("a __colour__ __sub/shape__ {big|small}", [10, 11, 12, 10])
    assert first[0] == first[3]  # same seed, same prompt
    assert all("__" not in p and "{" not in p for p in first)
    assert wildcards.resolve("a __colour__", [10]) == wildcards.resolve("a __colour__", [10])
    assert wildcards.resolve("plain (x:1.2) [a:b:3] <lora:l:1>", [1, 2]) == ["plain (x:1.2) [a:b:3] <lora:l:1>"] * 2


def test_a1111_syntax_passes_through_dynamicprompts_intact(wildcards):
    """`{a|a}` makes the prompt go through dynamicprompts (a plain prompt is returned before it);
    A1111's weights, editing, alternation `[d|e]` (not a variant: only `{}` is) and extra-network
    tags come out as written, in both modes."""
    template = "{a|a} (x:1.2) [b:c:3] [d|e] <lora:l:1>"
    expected = "a (x:1.2) [b:c:3] [d|e] <lora:l:1>"
    assert wildcards.resolve(template, [1, 2]) == [expected] * 2
    assert wildcards.resolve(template, [0, 0], "combinatorial") == [expected] * 2
    assert wildcards.resolve("__colour__ \\(lit\\) [d|e|f] a AND b :0.5 BREAK c", [5])[0].endswith(
        " \\(lit\\) [d|e|f] a AND b :0.5 BREAK c")


def test_combinatorial_over_the_batch(wildcards):
    assert wildcards.resolve("{a|b} __sub/shape__", [0] * 5, "combinatorial") == [
        "a circle", "a square", "b circle", "b square", "a circle"]
    two = wildcards.resolve("{2$$x|y|z}", [1, 2, 3])
    assert all(p.count(",") == 1 for p in two)


def test_missing_wildcard_is_value_error(wildcards):
    with pytest.raises(ValueError, match="wildcard.*nothere"):
        wildcards.resolve("a __nothere__", [1])


def test_source_applies_styles_then_wildcards(store, wildcards):
    source = PromptSource(store, wildcards)
    request = GenerationRequest(prompt="a __colour__ fox", negative_prompt="", styles=("Warm",), batch_size=2)
    styled, images = source.prepare(request, base_seed=5)
    assert styled.prompt == "a __colour__ fox, warm light, golden hour"
    assert styled.negative_prompt == ""
    assert len(images) == 2 and all(i.prompt.endswith(" fox, warm light, golden hour") for i in images)
    assert all("__" not in i.prompt for i in images)
