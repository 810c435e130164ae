"""The `transformers` provider: LoRA fine-tuning of an open-weights causal LM with Hugging Face (trl + peft).

torch, transformers, peft and trl come from the optional extra `pip install -e '.[transformers]'`; they are imported
inside functions, so the rest of the project (and `get_provider` for other providers) never needs them.
"""
