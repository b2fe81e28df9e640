"""Golden tests of autotune.textnorm against llasa-trainer's `normalize_text`.

`reference_normalize` below is laksjdjf/llasa-trainer's `modules/llasa_utils.py` `normalize_text`,
its rules embedded here as data (the package copies nothing of it). When a checkout of
llasa-trainer is at hand (`LLASA_TRAINER_DIR`: a work tree, or a bare git folder whose HEAD is
read), one test runs the real function on every line and checks the embedded copy against it.

`llasa_trainer` is meant to differ from the reference in the two ways its module docstring
documents, and in no other: half-width katakana become what Unicode says they are (the
reference's table is shifted), and runs of `…` are shortened after characters are dropped
(so normalising is idempotent). The tests compare it with the reference as such, with the
reference itself where neither difference can show, and with answers written by hand.
"""

from __future__ import annotations

import ast
import os
import random
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

from autotune.textnorm import AUTO, NORMALIZATIONS, default_for_model, llasa_trainer, normalize, resolve

# --------------------------------------------------------------------------- the reference, as data

# llasa_utils.py's REPLACE_MAP, in its order.
REFERENCE_REPLACE_MAP = [
    (r"\t", ""),
    (r"\[n\]", ""),
    (r" ", ""),
    (r"　", ""),
    (r"[;▼♀♂《》≪≫①②③④⑤⑥]", ""),
    (r"[\u02d7\u2010-\u2015\u2043\u2212\u23af\u23e4\u2500\u2501\u2e3a\u2e3b]", ""),
    (r"[\uff5e\u301C]", "ー"),
    (r"？", "?"),
    (r"！", "!"),
    (r"[●◯〇]", "○"),
    (r"♥", "♡"),
]
REFERENCE_FULLWIDTH_ALPHA = str.maketrans({chr(f): chr(h) for f, h in zip(
    list(range(0xFF21, 0xFF3B)) + list(range(0xFF41, 0xFF5B)), list(range(0x41, 0x5B)) + list(range(0x61, 0x7B)))})
# The shifted table: `zip(range(0xFF61, 0xFF9F), range(0x30A1, 0x30FB))`.
REFERENCE_HALFWIDTH_KATAKANA = str.maketrans({chr(h): chr(f) for h, f in zip(range(0xFF61, 0xFF9F),
                                                                            range(0x30A1, 0x30FB))})
REFERENCE_FULLWIDTH_DIGITS = str.maketrans({chr(f): chr(h) for f, h in zip(range(0xFF10, 0xFF1A), range(0x30, 0x3A))})
REFERENCE_INVALID = re.compile(r"[^\u3040-\u309F\u30A0-\u30FF\u4E00-\u9FFF\u3400-\u4DBF\u3005"
                               r"\u0041-\u005A\u0061-\u007A" r"\u0030-\u0039" r"。、!?…♪♡○]")


def reference_normalize(text: str, *, unicode_kana: bool = False, shorten_after_dropping: bool = False) -> str:
    """llasa-trainer's `normalize_text` step by step; the two flags switch on the documented differences."""
    for pattern, replacement in REFERENCE_REPLACE_MAP:
        text = re.sub(pattern, replacement, text)
    text = text.translate(REFERENCE_FULLWIDTH_ALPHA)
    text = text.translate(REFERENCE_FULLWIDTH_DIGITS)
    if unicode_kana:
        text = re.sub(r"[\uff61-\uff9f]+", lambda m: unicodedata.normalize("NFKC", m.group()), text)
    else:
        text = text.translate(REFERENCE_HALFWIDTH_KATAKANA)
    if shorten_after_dropping:
        return re.sub(r"…{3,}", "……", REFERENCE_INVALID.sub("", text))
    text = re.sub(r"…{3,}", "……", text)
    return REFERENCE_INVALID.sub("", text)


def as_documented(text: str) -> str:
    return reference_normalize(text, unicode_kana=True, shorten_after_dropping=True)


# --------------------------------------------------------------------------- lines to normalise

SENTENCES = [
    "今日はいい天気ですね。", "東京駅から新幹線で大阪まで行きます。", "猫が窓辺で日向ぼっこをしている。",
    "明日の会議は午前十時から始まる予定です、よろしくお願いします。", "ありがとうございました", "本当にそうなの",
    "アニメの主人公が叫んだ", "時々、雨が降ります。", "天使ちゃんマジ天使", "少々お待ちください",
    "ゝゞヽヾも仮名です", "ヶ月後にまた会いましょう", "今年は二〇二五年です", "えっと、その", "ふふっ",
    "このプロジェクトでは日本語の音声合成を試します", "お腹すいたなぁ", "やったー", "うーん", "さようなら",
]
FEATURES = {
    "spaces": [" ", "　", "\t", "  ", "　　", " \t　"],
    "line breaks": ["[n]", "[n][n]", "\n", "\r\n", "[ｎ]"],
    "question and exclamation": ["？", "！", "？！", "!?", "！！", "?"],
    "full-width letters and digits": ["ＡＢＣ", "ｘｙｚ", "１２３", "Ｔｏｋｙｏ２０２５", "ＧＰＴ", "０"],
    "half-width katakana": ["ｶﾞｷﾞｸﾞ", "ﾊﾟﾋﾟﾌﾟ", "ｱｲｳｴｵ", "ｺﾝﾆﾁﾊ｡", "｢ﾃｽﾄ｣", "ｳﾞｧｲｵﾘﾝ", "ﾎﾟｯﾌﾟ", "ｰ", "ﾞ", "ｨｪ･"],
    "wave dashes": ["～", "〜", "～～", "〜ー"],
    "ellipses": ["…", "……", "………", "……………", "…" * 8],
    "ellipses split by dropped characters": ["……」……", "…「…」…", "……-…", "…－……", "……😀……", "… …"],
    "marks": ["●", "◯", "〇", "♥", "♪", "♡", "○", "♥♥"],
    "removed symbols": [";", "▼", "♀", "♂", "《", "》", "≪", "≫", "①", "②", "⑥"],
    "dashes": ["\u2010", "\u2011", "\u2013", "\u2014", "\u2015", "\u2212", "\u2500", "\u2501", "\u02d7", "\u2043",
               "\u23af", "\u23e4", "\u2e3a", "\u2e3b"],
    "dropped characters": ["「", "」", "（", "）", "『", "』", "〆", "😀", "한국", "#", "@", "-", "－", ",", ".",
                           "⑦", "㍻", "é", "\u00a0", "、", "。", "・", "：", "♫"],
    "English": ["Hello world.", "It's 5 o'clock!", "GPU-4090", "TTS", "Llasa 3B", "OK?"],
}


def generated_lines() -> list[str]:
    """A few hundred lines: each sentence with each feature put in 1-3 times at random places,
    then lines that mix every feature."""
    rng = random.Random(25)
    lines = []

    def insert(text: str, piece: str) -> str:
        at = rng.randrange(len(text) + 1)
        return text[:at] + piece + text[at:]

    for sentence in SENTENCES:
        for pieces in FEATURES.values():
            line = sentence
            for _ in range(rng.randint(1, 3)):
                line = insert(line, rng.choice(pieces))
            lines.append(line)
    every = [p for pieces in FEATURES.values() for p in pieces]
    for _ in range(120):
        line = rng.choice(SENTENCES)
        for _ in range(rng.randint(2, 8)):
            line = insert(line, rng.choice(every))
        lines.append(line)
    return lines


LINES = generated_lines()

# Answers written by hand from the rules (the reference's, with the two documented differences).
GOLDEN = [
    ("こんにちは 世界", "こんにちは世界"),
    ("こんにちは　世界", "こんにちは世界"),
    ("タブ\tです", "タブです"),
    ("一行目[n]二行目", "一行目二行目"),
    ("改行\nあり", "改行あり"),
    ("本当？", "本当?"),
    ("すごい！", "すごい!"),
    ("え？！", "え?!"),
    ("ＡＢＣとｘｙｚ", "ABCとxyz"),
    ("１２３円", "123円"),
    ("ＧＰＴ－４", "GPT4"),
    ("ｶﾞｷﾞｸﾞ", "ガギグ"),
    ("ﾊﾟﾋﾟﾌﾟ", "パピプ"),
    ("ｱｲｳｴｵ", "アイウエオ"),
    ("ｺﾝﾆﾁﾊ｡", "コンニチハ。"),
    ("｢ﾃｽﾄ｣", "テスト"),
    ("ｳﾞｧｲｵﾘﾝ", "ヴァイオリン"),
    ("ﾗｰﾒﾝ", "ラーメン"),
    ("あ～", "あー"),
    ("え〜", "えー"),
    ("え…", "え…"),
    ("え……", "え……"),
    ("え………", "え……"),
    ("え……………", "え……"),
    ("……」……", "……"),
    ("…－……", "……"),
    ("●◯〇", "○○○"),
    ("好き♥", "好き♡"),
    ("♪♡○", "♪♡○"),
    ("▼注意", "注意"),
    ("♀♂", ""),
    ("《題名》と≪強調≫", "題名と強調"),
    ("①②③④⑤⑥", ""),
    ("⑦番", "番"),
    ("あ—い―う−え─お━か", "あいうえおか"),
    ("「こんにちは」", "こんにちは"),
    ("（笑）", "笑"),
    ("A・B", "A・B"),
    ("時々", "時々"),
    ("〆切", "切"),
    ("ゝゞヽヾヶ", "ゝゞヽヾヶ"),
    ("你好", "你好"),
    ("한국어", ""),
    ("😀笑", "笑"),
    ("Hello, world.", "Helloworld"),
    ("It's 5 o'clock!", "Its5oclock!"),
    ("ＧＷは、ﾃﾞｨｽﾞﾆｰに行きました！　楽しかった～♥", "GWは、ディズニーに行きました!楽しかったー♡"),
    ("", ""),
    ("　 \t[n]", ""),
]


# --------------------------------------------------------------------------- llasa-trainer


@pytest.mark.parametrize(("text", "expected"), GOLDEN, ids=[repr(t)[:40] for t, _ in GOLDEN])
def test_golden_answers(text: str, expected: str) -> None:
    assert llasa_trainer(text) == expected
    assert normalize(text, "llasa-trainer") == expected
    assert as_documented(text) == expected   # the hand-written answers follow the stated rules


def test_the_lines_cover_every_rule() -> None:
    assert 350 <= len(LINES) <= 500
    assert len(set(LINES)) > 0.95 * len(LINES)
    joined = "".join(LINES)
    for feature, pieces in FEATURES.items():
        assert sum(p in joined for p in pieces) >= len(pieces) - 1, feature


def test_every_line_is_the_reference_with_the_two_documented_differences() -> None:
    different = [(line, llasa_trainer(line), as_documented(line)) for line in LINES
                 if llasa_trainer(line) != as_documented(line)]
    assert not different, different[:5]


def test_where_neither_difference_can_show_it_is_the_reference_itself() -> None:
    """No half-width katakana in the line, and no run of three `…` left by the reference
    (a run the dropping joined): then nothing may differ at all."""
    plain = [line for line in LINES if not re.search(r"[\uff61-\uff9f]", line)
             and not re.search("…{3,}", reference_normalize(line))]
    assert len(plain) >= 250
    different = [(line, llasa_trainer(line), reference_normalize(line)) for line in plain
                 if llasa_trainer(line) != reference_normalize(line)]
    assert not different, different[:5]
    # The lines also hold both kinds of difference, each of which shows.
    kana = [line for line in LINES if re.search(r"[\uff61-\uff9f]", line)]
    assert len(kana) >= 40 and sum(llasa_trainer(l) != reference_normalize(l) for l in kana) >= 30
    joined = [line for line in LINES if re.search("…{3,}", reference_normalize(line))]
    assert len(joined) >= 10 and all(llasa_trainer(l) != reference_normalize(l) for l in joined)


def test_the_documented_differences_are_what_the_docstring_says() -> None:
    # 1. The reference's half-width table is shifted: `ｱ` is `ケ`, `｡` is `ァ`, `ｶﾞ` is `ザマ`.
    assert [reference_normalize(t) for t in ("ｱ", "｡", "ｶﾞ")] == ["ケ", "ァ", "ザマ"]
    assert [llasa_trainer(t) for t in ("ｱ", "｡", "ｶﾞ")] == ["ア", "。", "ガ"]
    # 2. A run the dropping joins: the reference keeps four, and shortens them only when run again.
    assert reference_normalize("……」……") == "…………"
    assert reference_normalize(reference_normalize("……」……")) == "……" == llasa_trainer("……」……")


@pytest.mark.parametrize("mode", ["llasa-trainer", "nfkc", "none"])
def test_normalising_twice_is_normalising_once(mode: str) -> None:
    for text in LINES + [t for t, _ in GOLDEN]:
        once = normalize(text, mode)
        assert normalize(once, mode) == once, (text, once)


def test_only_kept_characters_come_out() -> None:
    kept = re.compile(r"[\u3040-\u309F\u30A0-\u30FF\u4E00-\u9FFF\u3400-\u4DBF\u3005A-Za-z0-9。、!?…♪♡○]*")
    for line in LINES:
        assert kept.fullmatch(llasa_trainer(line)), line


def _llasa_trainer_source() -> str | None:
    folder = os.environ.get("LLASA_TRAINER_DIR")
    if not folder:
        return None
    path = Path(folder) / "modules" / "llasa_utils.py"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    shown = subprocess.run(["git", f"--git-dir={folder}", "show", "HEAD:modules/llasa_utils.py"],
                           capture_output=True, text=True, encoding="utf-8")
    return shown.stdout if shown.returncode == 0 else None


def test_the_embedded_reference_is_llasa_trainers_own() -> None:
    """Runs the real `normalize_text` (its module's definitions only: the file imports torchaudio)."""
    source = _llasa_trainer_source()
    if source is None:
        pytest.skip("set LLASA_TRAINER_DIR to a checkout of laksjdjf/llasa-trainer to compare with its own code")
    wanted = {"REPLACE_MAP", "FULLWIDTH_ALPHA_TO_HALFWIDTH", "HALFWIDTH_KATAKANA_TO_FULLWIDTH",
              "FULLWIDTH_DIGITS_TO_HALFWIDTH", "INVALID_PATTERN"}
    body = [node for node in ast.parse(source).body
            if (isinstance(node, ast.FunctionDef) and node.name == "normalize_text")
            or (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) in wanted)
            or (isinstance(node, ast.Assign) and {getattr(t, "id", None) for t in node.targets} & wanted)]
    assert len(body) == len(wanted) + 1
    namespace: dict = {"re": re}
    exec(compile(ast.Module(body=body, type_ignores=[]), "llasa_utils.py", "exec"), namespace)  # noqa: S102
    theirs = namespace["normalize_text"]
    for text in LINES + [t for t, _ in GOLDEN]:
        assert theirs(text) == reference_normalize(text), text


# --------------------------------------------------------------------------- the other choices


@pytest.mark.parametrize(("text", "expected"), [
    ("ＡＢＣ１２３", "ABC123"),
    ("ｶﾞｷﾞ｡", "ガギ。"),
    ("①番", "1番"),
    ("㍻", "平成"),
    ("こんにちは　世界", "こんにちは 世界"),
    ("あ～", "あ~"),
    ("え……", "え......"),
    ("「テスト」？", "「テスト」?"),
    ("Hello, world.", "Hello, world."),
])
def test_nfkc_is_unicodes_and_drops_nothing(text: str, expected: str) -> None:
    assert normalize(text, "nfkc") == expected


def test_none_leaves_every_text_as_written() -> None:
    for text in LINES:
        assert normalize(text, "none") is text


def test_an_unknown_choice_names_the_known_ones() -> None:
    assert NORMALIZATIONS == ("none", "llasa-trainer", "nfkc")
    for mode in (AUTO, "NFKC", "llasa_trainer", ""):
        with pytest.raises(ValueError, match="known: none, llasa-trainer, nfkc"):
            normalize("テスト", mode)


@pytest.mark.parametrize(("model", "expected"), [
    ("NandemoGHS/Anime-Llasa-3B", "llasa-trainer"),
    ("nandemoghs/anime-llasa-3b-v2", "llasa-trainer"),
    ("NandemoGHS/Some-Other-Model", "llasa-trainer"),
    ("/models/Anime-Llasa-3B/", "llasa-trainer"),
    ("C:\\models\\anime-llasa-3b", "llasa-trainer"),
    ("./anime-llasa-3b-merged", "llasa-trainer"),
    ("HKUSTAudio/Llasa-1B", "none"),
    ("HKUSTAudio/Llasa-3B", "none"),
    ("/models/Llasa-1B", "none"),
    ("/models/anime-llasa-3b/checkpoint-100", "none"),
    ("tiny", "none"),
    ("llasa-1b-random", "none"),
    ("", "none"),
])
def test_auto_decides_by_model(model: str, expected: str) -> None:
    assert default_for_model(model) == expected
    assert resolve(AUTO, model) == expected
    for chosen in NORMALIZATIONS:
        assert resolve(chosen, model) == chosen   # a choice the user made is never overruled
