"""How close generated speech is to what it should say and who should say it, as numbers:
character or word error rate on normalised text (CER for scripts written without spaces,
Japanese and Chinese among them; WER for the rest), and the cosine of two embeddings.
Pure: text and numpy only."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np


# Scripts written without spaces between words: an error rate over words would
# count a whole sentence as one word. Kana and hangul also name the language for Whisper.
_KANA = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))


_HAN = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))


_HANGUL = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF))


_OTHER_UNSPACED = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF))  # Thai, Lao, Myanmar, Khmer


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'", "\u2018": "'"})


def _in(ranges: tuple[tuple[int, int], ...], ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in ranges)


def _has(ranges: tuple[tuple[int, int], ...], text: str) -> bool:
    return any(_in(ranges, ch) for ch in text)


def uses_cer(text: str) -> bool:
    """Whether `text` is scored by character error rate: it holds kana, kanji/hanzi,
    hangul or another script written without spaces between words."""
    return any(_in(_KANA, ch) or _in(_HAN, ch) or _in(_HANGUL, ch) or _in(_OTHER_UNSPACED, ch) for ch in text)


def asr_language(text: str) -> str | None:
    """The Whisper language code the text's script implies, or None to let Whisper detect it.

    Kana means Japanese, hangul Korean, and Han characters without kana Chinese.
    Forcing the language keeps Whisper from translating or romanising a poor
    clip; Latin and other scripts are shared by many languages, so they are
    left to Whisper's detection.
    """
    if _has(_KANA, text):
        return "ja"
    if _has(_HANGUL, text):
        return "ko"
    if _has(_HAN, text):
        return "zh"
    return None


def normalise(text: str) -> str:
    """Text as the error rates compare it: NFKC (full-width Latin and digits become
    ASCII, half-width kana full-width), case-folded, punctuation and symbols
    replaced by spaces (an apostrophe inside a word, as in "don't", is kept),
    whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text or "").casefold().translate(_APOSTROPHES)
    out: list[str] = []
    for i, ch in enumerate(text):
        category = unicodedata.category(ch)
        if ch == "'" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
            out.append(ch)
        elif category[0] in "PSZC":
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def edit_distance(reference: Sequence[Any], hypothesis: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions, deletions and insertions all cost 1)."""
    if len(reference) < len(hypothesis):
        reference, hypothesis = hypothesis, reference
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, start=1):
        current = [i]
        for j, h in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def error_rate(reference: str, hypothesis: str | None) -> tuple[float, str]:
    """`(value, "cer" | "wer")`: the edit distance between the normalised texts over
    the reference's length, in characters (whitespace ignored) or words as
    `uses_cer(reference)` decides. Insertions can take it above 1; an empty
    hypothesis gives 1.0. A reference that normalises to nothing gives 0.0 for an
    empty hypothesis and 1.0 otherwise."""
    metric = "cer" if uses_cer(reference) else "wer"
    ref, hyp = normalise(reference), normalise(hypothesis or "")
    if metric == "cer":
        ref_units: list[str] = [ch for ch in ref if not ch.isspace()]
        hyp_units: list[str] = [ch for ch in hyp if not ch.isspace()]
    else:
        ref_units, hyp_units = ref.split(), hyp.split()
    if not ref_units:
        return (0.0 if not hyp_units else 1.0), metric
    return edit_distance(ref_units, hyp_units) / len(ref_units), metric


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0.0 when either is all zeros)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0
