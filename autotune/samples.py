"""Audio samples during training (filled in by the Listen-to-the-result work)."""


def maybe_add_sample_callback(trainer, config, output_dir, tokenizer, texts, console) -> None:
    return None
