"""The built-in qwen_1_5 conversation equals LLaVA-NeXT's conv_templates["qwen_1_5"]."""
import pytest

from perpo_jax.data.chat_templates import (QWEN_1_5_ANSWER_PREFIX, QWEN_1_5_RESPONSE_END,
                                           qwen_1_5_prompt, qwen_1_5_response)

# conv_qwen.get_prompt() for [user: "<image>\nRead the page.", assistant: None], written out
EXPECTED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n<image>\nRead the page.<|im_end|>\n"
            "<|im_start|>assistant\n")


def test_prompt_equals_the_hand_written_chatml_text():
    assert qwen_1_5_prompt("Read the page.") == EXPECTED


@pytest.mark.parametrize("question", ["<image>\nRead the page.", "Read the page. <image>",
                                      "  Read the page.\n"])
def test_image_token_moved_to_the_front_as_preprocess_multimodal_does(question):
    assert qwen_1_5_prompt(question) == EXPECTED


def test_custom_image_token_and_response_end():
    assert "<|im_start|>user\n<img>\nQ<|im_end|>" in qwen_1_5_prompt("Q", image_token="<img>")
    assert (QWEN_1_5_ANSWER_PREFIX, QWEN_1_5_RESPONSE_END) == ("", "<|im_end|>")
    assert qwen_1_5_response("abc") == "abc<|im_end|>\n"
    with pytest.raises(ValueError, match="image_token"):
        qwen_1_5_prompt("Q", image_token="")
