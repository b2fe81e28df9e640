"""Our CER and WER against jiwer's (issue 23), on a few hundred reference/hypothesis pairs in
Japanese, Chinese, English and mixed text: jiwer is a check here, never a dependency of the
package (it is in the `test` extra only).

Both sides get the same units: our normalisation (`metrics.normalise`) decides what a character
or a word is, then our `error_rate` and jiwer's `cer`/`wer` must agree on the rate. What is being
checked is the alignment and the counting (substitutions, deletions, insertions over the
reference's length), which is where a hand-written edit distance goes wrong.
"""

from __future__ import annotations

import random

import pytest

from autotune.metrics import error_rate, normalise, uses_cer

jiwer = pytest.importorskip("jiwer", reason="jiwer checks the error rates: `pip install jiwer` (the `test` extra)")

JAPANESE = ["今日はいい天気ですね。", "お茶をもう一杯いかがですか？", "週末は家族と山に登ります。", "「はい」、そうです！",
            "カタカナとひらがな、漢字が混ざった文です。", "東京駅から新幹線で大阪へ向かいました。", "ｶﾀｶﾅも全角に直ります。",
            "ＡＢＣの歌を歌いましょう", "明日の会議は午後三時からです。", "猫が窓辺で昼寝をしている。"]
CHINESE = ["你好，世界。", "今天天气很好，我们去公园散步吧。", "这是一个测试句子。", "我喜欢喝茶。"]
ENGLISH = ["The cat sat on the mat.", "Don't stop now, we're almost there!", "A quick brown fox jumps over the lazy dog.",
           "She sells sea shells by the sea shore.", "Hello, world", "It is 5 o'clock somewhere.",
           "Speech synthesis should sound natural and clear."]
MIXED = ["今日はAIの話をします。", "Llasaで日本語を話す", "GPUは24GBです。"]
CJK_POOL = "あいうえおかきくけこさしすせそたちつてとなにぬねのアイウエオ天気今日山川東京猫犬茶会議"
WORD_POOL = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "now", "sea", "shore", "fox", "lazy", "clear"]


def mutate(text: str, rng: random.Random, cjk: bool) -> str:
    """`text` with a few random substitutions, deletions and insertions, of characters (CJK)
    or of words (the rest); sometimes nothing at all, sometimes everything lost."""
    roll = rng.random()
    if roll < 0.05:
        return ""
    if roll < 0.12:
        return text
    units = list(text) if cjk else text.split()
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(("sub", "del", "ins"))
        pick = rng.choice(CJK_POOL) if cjk else rng.choice(WORD_POOL)
        at = rng.randrange(len(units) + (kind == "ins")) if units else 0
        if kind == "sub" and units:
            units[at] = pick
        elif kind == "del" and units:
            del units[at]
        else:
            units.insert(at, pick)
    return ("" if cjk else " ").join(units)


def pairs() -> list[tuple[str, str]]:
    rng = random.Random(23)
    out = []
    for text in JAPANESE + CHINESE + ENGLISH + MIXED:
        for _ in range(16):
            out.append((text, mutate(text, rng, uses_cer(text))))
    return out


def test_there_are_a_few_hundred_pairs_in_every_script():
    found = pairs()
    assert len(found) >= 300
    assert sum(uses_cer(r) for r, _ in found) >= 150 and sum(not uses_cer(r) for r, _ in found) >= 80
    assert any(h == "" for _, h in found) and any(r == h for r, h in found)


def test_our_error_rates_match_jiwer():
    mismatches = []
    for reference, hypothesis in pairs():
        ours, metric = error_rate(reference, hypothesis)
        ref, hyp = normalise(reference), normalise(hypothesis)
        if metric == "cer":
            theirs = jiwer.cer("".join(ref.split()), "".join(hyp.split()))
        else:
            theirs = jiwer.wer(ref, hyp)
        if abs(ours - theirs) > 1e-12:
            mismatches.append((reference, hypothesis, metric, ours, theirs))
    assert mismatches == []
