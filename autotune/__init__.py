"""Hardware-aware LoRA fine-tuning for Llasa text-to-speech."""

__version__ = "0.1.0"
