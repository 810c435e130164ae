"""The shared prompt rendered as a causal LM's text: the tokenizer's chat template where it has one, else the
plain prompt/completion layout of `formats.to_prompt_completion`. Training and generation both render here, so the
tuned model sees at inference exactly the text it was trained on."""

from __future__ import annotations

from typing import Any

from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt


def prompt_messages(question: str, context: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_INSTRUCTION},
            {"role": "user", "content": user_prompt(question, context)}]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """System + user messages -> the text after which the model writes its answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(message["content"] for message in messages)


def render_completion(tokenizer: Any, answer: str) -> str:
    """The answer as the model should write it, ending with end-of-sequence (where generation stops)."""
    text = answer if getattr(tokenizer, "chat_template", None) else " " + answer
    return text + tokenizer.eos_token


def training_pair(tokenizer: Any, record: dict[str, Any]) -> dict[str, str]:
    """One prepared chat record (system, user, assistant) -> trl's prompt/completion pair (loss on the completion)."""
    messages = record["messages"]
    return {"prompt": render_prompt(tokenizer, messages[:2]),
            "completion": render_completion(tokenizer, messages[2]["content"])}
