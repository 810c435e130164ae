"""The one prompt template: training data for every provider and every evaluation request use it, so a tuned
model is evaluated on exactly the input shape it was trained on."""

from __future__ import annotations

SYSTEM_INSTRUCTION = (
    "You answer questions about a passage. Reply with the shortest span copied from the passage that answers "
    "the question, and nothing else."
)


def user_prompt(question: str, context: str) -> str:
    return f"Passage:\n{context}\n\nQuestion: {question}\nAnswer:"


def clean_completion(text: str | None) -> str:
    """A model's reply reduced to the answer span: first line, surrounding whitespace and quotes removed."""
    if not text:
        return ""
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return first_line.strip().strip('"').strip()


def training_answer(answers: list[str]) -> str:
    """The target a model is tuned on: the first gold answer, as SQuAD training conventionally does."""
    return answers[0]


def chat_messages(question: str, context: str, answer: str) -> list[dict[str, str]]:
    """The training conversation every chat-tuned provider uses: system instruction, user prompt, the answer."""
    return [{"role": "system", "content": SYSTEM_INSTRUCTION}, {"role": "user", "content": user_prompt(question, context)},
            {"role": "assistant", "content": answer}]
