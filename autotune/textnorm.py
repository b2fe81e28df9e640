"""Text normalisation: one named choice (`data.text_normalization`), applied to every text that
becomes a prompt, in training and in speech alike.

- `none`: the text as written (HKUSTAudio's Llasa models were trained on raw text).
- `llasa-trainer`: the rules of laksjdjf/llasa-trainer's `normalize_text`
  (`modules/llasa_utils.py`), which that trainer applies to every Japanese transcript before
  training and before speaking, and so what an adapter it trained, or NandemoGHS's
  Anime-Llasa models, heard: spaces, tabs and `[n]` removed; `？！` to `?!`; full-width
  letters and digits to half-width; half-width katakana to full-width; wave dashes
  (`～〜`) to `ー`; a run of three or more `…` to `……`; `●◯〇` to `○`, `♥` to `♡`; a few symbols
  and dashes removed; then every character outside kana, kanji, Latin letters, digits and
  `。、!?…♪♡○` dropped. Two deliberate differences, each tested against the reference:
  1. the reference maps half-width katakana by a shifted table (`ｱ` becomes `ケ`, `｡`
     becomes `ァ`, `ｶﾞ` becomes `ザマ`); here they become what they are (`ｱ` -> `ア`,
     `ｶﾞ` -> `ガ`, `｡` -> `。`), as its own comment intends;
  2. runs of `…` are shortened after the dropping, not before it, so that a run the
     dropping joins (`……」……` -> `…………` in the reference) is shortened too (`……`):
     normalising twice gives what normalising once does. llasa-trainer's own server
     normalises a request and then its prompt again, so where the two orders differ it
     speaks the shortened run anyway.
- `nfkc`: Unicode NFKC (full-width letters and digits to half-width, half-width kana to
  full-width, compatibility characters such as `①` to `1`), nothing removed.
- `auto` (the default) resolves by model: `llasa-trainer` for NandemoGHS's Anime-Llasa
  models, which were made with it, `none` for every other model.

No torch here: `probe.py`'s config layer names these choices.
"""

from __future__ import annotations

import re
import unicodedata

NORMALIZATIONS = ("none", "llasa-trainer", "nfkc")
AUTO = "auto"

# llasa-trainer's REPLACE_MAP, in its order.
_REPLACEMENTS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"\t", ""),
    (r"\[n\]", ""),
    (r" ", ""),
    (r"\u3000", ""),                                   # the full-width space
    (r"[;▼♀♂《》≪≫①②③④⑤⑥]", ""),
    (r"[\u02d7\u2010-\u2015\u2043\u2212\u23af\u23e4\u2500\u2501\u2e3a\u2e3b]", ""),   # dashes and rules
    (r"[\uff5e\u301c]", "ー"),                          # ～ 〜: wave dashes are the long vowel mark
    (r"？", "?"),
    (r"！", "!"),
    (r"[●◯〇]", "○"),
    (r"♥", "♡"),
))
_FULLWIDTH_LETTERS_AND_DIGITS = str.maketrans(
    {chr(full): chr(half) for full, half in zip(list(range(0xFF21, 0xFF3B)) + list(range(0xFF41, 0xFF5B))
                                                + list(range(0xFF10, 0xFF1A)),
                                                list(range(0x41, 0x5B)) + list(range(0x61, 0x7B))
                                                + list(range(0x30, 0x3A)))})
_HALFWIDTH_KANA = re.compile(r"[\uff61-\uff9f]+")
_ELLIPSES = re.compile(r"…{3,}")
_NOT_KEPT = re.compile(r"[^\u3040-\u309F\u30A0-\u30FF\u4E00-\u9FFF\u3400-\u4DBF\u3005"
                       r"A-Za-z0-9。、!?…♪♡○]")


def llasa_trainer(text: str) -> str:
    """llasa-trainer's `normalize_text` (see the module's docstring for the two differences)."""
    for pattern, replacement in _REPLACEMENTS:
        text = pattern.sub(replacement, text)
    text = text.translate(_FULLWIDTH_LETTERS_AND_DIGITS)
    # NFKC on half-width katakana alone: `ｶﾞ` composes to `ガ`, `｡` becomes `。`.
    text = _HALFWIDTH_KANA.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
    text = _NOT_KEPT.sub("", text)
    return _ELLIPSES.sub("……", text)   # after the dropping: see the module docstring


def normalize(text: str, mode: str) -> str:
    """`text` as the prompt sees it under `mode` (one of `NORMALIZATIONS`)."""
    if mode == "none":
        return text
    if mode == "llasa-trainer":
        return llasa_trainer(text)
    if mode == "nfkc":
        return unicodedata.normalize("NFKC", text)
    raise ValueError(f"unknown text normalization {mode!r} (known: {', '.join(NORMALIZATIONS)})")


def default_for_model(name_or_path: str) -> str:
    """`auto`'s choice: `llasa-trainer` for NandemoGHS's Anime-Llasa models (a hub id, or a folder
    named after one), `none` otherwise."""
    name = (name_or_path or "").replace("\\", "/").rstrip("/").lower()
    last = name.rsplit("/", 1)[-1]
    return "llasa-trainer" if name.startswith("nandemoghs/") or last.startswith("anime-llasa") else "none"


def resolve(mode: str, model_name_or_path: str) -> str:
    """A concrete normalisation: `auto` decided by the model, any other choice as it is."""
    return default_for_model(model_name_or_path) if mode == AUTO else mode
