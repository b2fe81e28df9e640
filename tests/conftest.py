"""Shared test settings: nothing may reach for a model hub."""

import os

# PEFT looks up the base model on the hub when saving an adapter; offline that
# lookup only costs time. Set before huggingface_hub is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
