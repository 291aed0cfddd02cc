from pipelines.configs import load_tokenizer
from pipelines.prompts.counter import format_count, prompt_token_count


def test_counter_like_a1111():
    tok = load_tokenizer()
    assert prompt_token_count(tok, "") == (0, 75)
    assert prompt_token_count(tok, "a cat") == (2, 75)
    assert prompt_token_count(tok, "a cat <lora:style:0.8>") == (2, 75)  # tags do not count
    assert prompt_token_count(tok, "(a cat:1.3)") == (2, 75)  # weights syntax does not count
    # the longer side of an edit counts
    assert prompt_token_count(tok, "[a:a very big fluffy cat:0.5]") == (5, 75)
    long = ", ".join(["red circle"] * 40)  # 119 tokens
    count = prompt_token_count(tok, long)
    assert count[0] > 75 and count[1] == 150 and format_count(count) == f"{count[0]}/150"
    assert prompt_token_count(tok, "a BREAK b")[0] == 76  # BREAK fills the first chunk
