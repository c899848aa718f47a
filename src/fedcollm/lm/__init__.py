"""Language models: loading from anywhere, LoRA adapters, token encoding, logits where a loss is."""
