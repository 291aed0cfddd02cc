import pytest

from pipelines.prompts.extra_networks import ExtraNetworkTag, extract_extra_networks


def test_lora_tag_removed_and_parsed():
    text, tags = extract_extra_networks("a cat <lora:detail:0.8>, sunset")
    assert text == "a cat , sunset"
    assert tags == [ExtraNetworkTag("lora", "detail", ("0.8",))]
    assert tags[0].multiplier(0) == 0.8
    assert tags[0].lora_weights() == (0.8, 0.8)


def test_lora_te_unet_and_named_args():
    _, (tag,) = extract_extra_networks("<lora:my/sub name:0.5:0.25>")
    assert tag.name == "my/sub name"
    assert tag.lora_weights() == (0.5, 0.25)
    _, (tag,) = extract_extra_networks("<lora:x:te=0.3:unet=0.7:dyn=8>")
    assert tag.positional == ()
    assert tag.named == {"te": "0.3", "unet": "0.7", "dyn": "8"}
    assert tag.lora_weights() == (0.3, 0.7)
    assert tag.dyn_dim() == 8
    _, (tag,) = extract_extra_networks("<lora:x:1:0.5:16>")
    assert tag.dyn_dim() == 16


def test_defaults_without_weight():
    _, (tag,) = extract_extra_networks("<lora:x>")
    assert tag.args == ()
    assert tag.multiplier(0, 1.0) == 1.0
    assert tag.lora_weights() == (1.0, 1.0)
    assert tag.dyn_dim() is None


def test_hypernet_and_any_kind_in_order():
    text, tags = extract_extra_networks("(<hypernet:anime:0.6> girl:1.2) <foo:bar:a:b> BREAK x")
    assert text == "( girl:1.2)  BREAK x"
    assert [(t.kind, t.name, t.args) for t in tags] == [
        ("hypernet", "anime", ("0.6",)), ("foo", "bar", ("a", "b"))]
    assert tags[0].multiplier() == 0.6


def test_not_tags_are_left_alone():
    for text in ("a <b> c", "<:x:1>", "a < lora:x:1>", "no tags", ""):
        assert extract_extra_networks(text) == (text, [])


def test_bad_weight_is_a_clear_value_error():
    _, (tag,) = extract_extra_networks("<lora:x:strong>")
    with pytest.raises(ValueError, match="not a number"):
        tag.multiplier(0)


def test_tag_text_round_trip():
    _, (tag,) = extract_extra_networks("<lora:x:0.5:te=1>")
    assert tag.text() == "<lora:x:0.5:te=1>"
    assert hash(tag) == hash(ExtraNetworkTag("lora", "x", ("0.5", "te=1")))
