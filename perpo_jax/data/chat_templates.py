"""Built-in conversation templates that need no checkpoint chat template.

`qwen_1_5`: the ChatML conversation the official LLaVA-NeXT / OneVision code trains and
evaluates Qwen models with (LLaVA-VL/LLaVA-NeXT `llava/conversation.py`,
`conv_templates["qwen_1_5"] = conv_qwen`: `SeparatorStyle.CHATML`, system
"<|im_start|>system\\nYou are a helpful assistant.", roles "<|im_start|>user" /
"<|im_start|>assistant", sep "<|im_end|>"), and that the official PerPO LLaVA-NeXT OCR run
uses (`--version qwen_1_5`). One single-image user turn renders as

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    <image>
    {question}<|im_end|>
    <|im_start|>assistant
                                            <- the generation prompt ends with this newline

Where the pieces come from:
- `Conversation.get_prompt` (CHATML): `system + sep + "\\n"`, then per message
  `role + "\\n" + message + sep + "\\n"`, and for the open assistant turn `role + "\\n"`.
- The image token: `llava/train/train.py::preprocess_multimodal` moves a `<image>` that does
  not start the message to the front as `"<image>\\n" + rest.strip()`; a message that already
  starts with it is kept as is. The evaluation scripts build `"<image>\\n" + question` too.
- The response: `train.py::preprocess_qwen` renders every turn with
  `"<|im_start|>" + role + "\\n" + content + "<|im_end|>" + "\\n"` and labels the whole
  assistant turn, so the scored response is the answer followed by `<|im_end|>` and "\\n"
  (the "<|im_start|>assistant\\n" header is the same for every candidate of a list). At
  generation time `<|im_end|>` (Qwen2 id 151645) is the stop token.

Nothing here tokenizes: the prompt is text with one unexpanded image token.
"""
from __future__ import annotations

QWEN_1_5_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# What the template puts between the generation prompt and the answer: nothing (the prompt
# already ends with "\n").
QWEN_1_5_ANSWER_PREFIX = ""
# What ends an assistant turn: the stop token, then the turn separator. The official trainer
# labels both; generation stops at the first.
QWEN_1_5_RESPONSE_END = IM_END
QWEN_1_5_TURN_SEPARATOR = "\n"


def _chatml_turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def _image_first(question: str, image_token: str) -> str:
    """The user message as LLaVA-NeXT's `preprocess_multimodal` leaves it: one image token at
    the front followed by a newline; a message already starting with it is kept as is."""
    if question.startswith(image_token):
        return question
    rest = question.replace(image_token, "").strip()
    return f"{image_token}\n{rest}"


def qwen_1_5_prompt(question: str, image_token: str = "<image>") -> str:
    """The `qwen_1_5` generation prompt for one image + `question` (text, one image token).

    Ends with "<|im_start|>assistant\\n"; the answer follows directly
    (`QWEN_1_5_ANSWER_PREFIX` is ""), and the response ends with `QWEN_1_5_RESPONSE_END`.
    """
    if not image_token:
        raise ValueError("image_token must be a non-empty string")
    return (_chatml_turn("system", QWEN_1_5_SYSTEM)
            + _chatml_turn("user", _image_first(question, image_token))
            + f"{IM_START}assistant\n")


def qwen_1_5_response(answer: str) -> str:
    """The scored text of one assistant answer as the official trainer labels it:
    answer + "<|im_end|>" + "\\n"."""
    return f"{QWEN_1_5_ANSWER_PREFIX}{answer}{QWEN_1_5_RESPONSE_END}{QWEN_1_5_TURN_SEPARATOR}"
