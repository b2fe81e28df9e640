"""Tiny random stand-ins for the scoring models, built offline: a Whisper and a WavLM x-vector.

They are the real transformers classes on tiny shapes from a fixed seed (the scoring
counterpart of `llasa.build_tiny_model`), so tests and offline runs drive the real ASR
pipeline, Whisper's language forcing and long-form decoding, and WavLM's x-vector head,
without a download. What they say is meaningless: lowercase letters, and embeddings that
tell signals apart but not voices.

`scores.load_asr("tiny")` and `scores.load_speaker("tiny")` wrap these as the real
models are wrapped; `bench/scoring.py` builds the real models' shapes on the same tokenizer.
"""

from __future__ import annotations

from typing import Any

from autotune.llasa import SAMPLING_RATE

__all__ = ["tiny_wavlm_xvector", "tiny_whisper_pipeline", "tiny_whisper_tokenizer"]

_SPACE = "\u0120"  # how byte-level BPE writes a space ("Ġ")


def tiny_whisper_tokenizer(text_tokens: int = 0) -> tuple[Any, list[str]]:
    """A byte-level Whisper tokenizer with no merges and Whisper's special tokens in
    Whisper's order (end of text, start of transcript, languages, tasks, ...,
    no-timestamps, then the 1,501 timestamps), built offline; and its language tokens.
    `text_tokens` (e.g. Whisper's real 50,257) pads the text vocabulary with filler
    two-symbol tokens, never produced by encoding but decodable, so that the special
    ids are the real model's."""
    from tokenizers import pre_tokenizers
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    fillers = (a + b for a in alphabet for b in alphabet)
    while len(vocab) < text_tokens:
        vocab.setdefault(next(fillers), len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    languages = [f"<|{code}|>" for code in LANGUAGES]
    specials = ["<|startoftranscript|>", *languages, "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    for token in specials:
        vocab[token] = len(vocab)
    for i in range(1501):
        vocab[f"<|{i * 0.02:.2f}|>"] = len(vocab)
    # The tokenizer takes the first timestamp to be the id after its last special token.
    return WhisperTokenizer(vocab=vocab, merges=[], extra_special_tokens=specials), languages


def tiny_whisper_pipeline(device: str = "cpu") -> Any:
    """A tiny random Whisper in transformers' ASR pipeline.

    Real tokenizer class (byte-level, Whisper's special tokens), real feature
    extractor (128 mel bins, 30 s windows, as large-v3), and a 1-layer model
    from a fixed seed with its generation config set up as multilingual Whisper's,
    so language forcing, greedy decoding and long-form decoding run for real.
    """
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              pipeline)

    tokenizer, languages = tiny_whisper_tokenizer()
    vocab = tokenizer.get_vocab()
    eos = vocab["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=128, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=16, tie_word_embeddings=False, pad_token_id=eos,
        bos_token_id=eos, eos_token_id=eos, decoder_start_token_id=vocab["<|startoftranscript|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config)
    # The untied output layer can only say a-z, space and end-of-text, loudly: the
    # transcripts are plain lowercase letters rather than stray bytes, and the
    # timestamps' probability mass never beats them, so long-form decoding takes
    # whole 30 s windows instead of creeping on through near-empty segments.
    spoken = [vocab[ch] for ch in _SPACE + "abcdefghijklmnopqrstuvwxyz"] + [eos]
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        kept = weight[spoken] * 300.0
        weight.zero_()
        weight[spoken] = kept
    # A generation config of its own (not derived from the model config), so the
    # multilingual settings survive save_pretrained/from_pretrained as a hub checkpoint's do.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        max_length=config.max_target_positions, begin_suppress_tokens=[vocab[_SPACE], eos],
        lang_to_id={token: vocab[token] for token in languages}, is_multilingual=True,
        task_to_id={"translate": vocab["<|translate|>"], "transcribe": vocab["<|transcribe|>"]},
        no_timestamps_token_id=vocab["<|notimestamps|>"], prev_sot_token_id=vocab["<|startofprev|>"],
        max_initial_timestamp_index=50)
    feature_extractor = WhisperFeatureExtractor(feature_size=128)
    return pipeline("automatic-speech-recognition", model=model.eval().to(device), tokenizer=tokenizer,
                    feature_extractor=feature_extractor, device=torch.device(device))


def tiny_wavlm_xvector(device: str = "cpu") -> tuple[Any, Any]:
    """A tiny random WavLM x-vector model (about 60k parameters) and a feature extractor
    with the real settings of `microsoft/wavlm-base-plus-sv`.

    Fan-in initialisation with zero biases: transformers' small-std init lets the
    biases dominate the pooled statistics, so every clip gets nearly the same
    embedding and a test of "different clips differ" would barely be one.
    """
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    config = WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        tdnn_dim=(32, 32, 32, 32, 64), xvector_output_dim=16, num_buckets=32, max_bucket_distance=100)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WavLMForXVector(config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                    module.reset_parameters()
                    if module.bias is not None:
                        module.bias.zero_()
    feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLING_RATE, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)
    return model.to(device), feature_extractor
