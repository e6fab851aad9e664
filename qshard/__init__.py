"""qshard: LoRA fine-tuning on quantized base models, from one device to many."""

__version__ = "0.1.0"
