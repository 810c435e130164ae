"""A tiny Llama-style causal LM and a byte-level BPE tokenizer trained on the fly: the transformers provider's
tests need no download. The toy QA set asks four questions, each under several passages, so a LoRA-tuned model can
learn the answers in seconds where the random base model answers nothing right."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_mlflow.providers.transformers import to_chat_record
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt

# Weights this large give the random model peaked (not uniform) logits, which LoRA can then steer.
INIT_RANGE = 0.2
FACTS = [
    ("What color is the sky?", "blue"),
    ("Which animal barks?", "dog"),
    ("What is frozen water called?", "ice"),
    ("Which planet do we live on?", "Earth"),
]
PASSAGES = [
    "The sky is blue, dogs bark, water freezes into ice, and we live on Earth.",
    "We live on Earth. Frozen water is ice. A dog barks. The sky looks blue.",
    "On Earth the sky is blue; ice is frozen water; the dog is the animal that barks.",
    "Every dog barks at the blue sky over the ice of planet Earth.",
]


def toy_examples(passages: list[str]) -> list[dict]:
    return [{"id": f"{p:02d}{q}", "title": "toy", "question": question, "context": passage, "answers": [answer]}
            for p, passage in enumerate(passages) for q, (question, answer) in enumerate(FACTS)]


def write_prepared(folder: Path, train: list[dict], validation: list[dict]) -> Path:
    """The layout `prepare` writes: canonical JSONL on top, the chat records under transformers/."""
    (folder / "transformers").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("validation", validation)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (folder / "transformers" / f"{split}.jsonl").write_text(
            "".join(json.dumps(to_chat_record(r)) + "\n" for r in rows), encoding="utf-8")
    return folder


def build_tiny_model(folder: Path, texts: list[str]) -> Path:
    """Save a ~140k-parameter Llama and its tokenizer (trained on `texts` plus the prompt) to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [SYSTEM_INSTRUCTION, user_prompt("q", "c"), *texts]
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, tie_word_embeddings=True,
                         initializer_range=INIT_RANGE)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
