"""Adapter wishes read from prompt tags: weights, TE/UNet split, hypernets, one per name across
the prompts of a batch."""
from pipelines.adapters.lora_stack import LoraRequest
from pipelines.adapters.wishes import HypernetRequest, adapter_wishes


def test_tags_become_requests():
    wishes = adapter_wishes("a cat <lora:ink:0.6> <lora:neon:0.5:1> <hypernet:wash:0.3>", "<lora:bad:te=0:unet=1>")
    assert wishes.loras == (LoraRequest("ink", 0.6, 0.6), LoraRequest("neon", 0.5, 1.0), LoraRequest("bad", 0.0, 1.0))
    assert wishes.hypernets == (HypernetRequest("wash", 0.3),)


def test_the_same_network_in_several_prompts_counts_once_but_twice_in_one_prompt_adds_up():
    wishes = adapter_wishes("<lora:ink:0.6> a", "<lora:ink:0.6> b", "<lora:ink:0.9> c")
    assert wishes.loras == (LoraRequest("ink", 0.6, 0.6),)
    assert len(adapter_wishes("<lora:ink:0.5> and <lora:ink:0.5>").loras) == 2  # the stack sums them
