"""Building the base model: the skeleton, streaming and sharded loading, LoRA."""
