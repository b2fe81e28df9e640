"""The web UI's labels in English and Japanese. The browser's language picks one (Gradio's
`I18n`); a key missing from a language falls back to English. No torch, no gradio here."""

from __future__ import annotations

EN: dict[str, str] = {
    "title": "## Llasa voice studio",
    "intro": "Speak with your trained runs, compare checkpoints by ear and by score, keep the best one.",
    "tab_speak": "Speak",
    "tab_compare": "Compare",
    "tab_runs": "Runs",
    "tab_codec": "Codec",
    "run": "Run",
    "refresh": "Refresh",
    "checkpoint": "Checkpoint",
    "speaker": "Speaker",
    "text": "Text (one clip per line)",
    "text_placeholder": "Type what to say. Several lines give one clip per line.",
    "voice_prompt": "Voice prompt (optional): a clip of the voice to clone",
    "voice_prompt_text": "What the voice prompt says (blank: transcribed by the run's ASR model)",
    "sampling": "Sampling",
    "temperature": "Temperature",
    "top_p": "Top-p",
    "repetition_penalty": "Repetition penalty",
    "seed": "Seed (blank: random)",
    "longest": "Longest speech in seconds (0: all that fits)",
    "speak": "Speak",
    "clips": "Clips",
    "timing": "Time and real-time factor",
    "compare_pick": "Checkpoints to compare (2 to 4)",
    "compare_text": "One text, spoken by each",
    "compare": "Compare",
    "keep": "Keep this one",
    "kept": "Kept",
    "runs_table": "Runs",
    "codec_in": "Audio to pass through XCodec2",
    "codec_run": "Encode and decode",
    "codec_out": "What XCodec2 keeps",
    "codec_info": "Codes",
}

JA: dict[str, str] = {
    "title": "## Llasa ボイススタジオ",
    "intro": "学習した声で話す・チェックポイントを耳とスコアで比べる・良いものを残す。",
    "tab_speak": "話す",
    "tab_compare": "比較",
    "tab_runs": "学習一覧",
    "tab_codec": "コーデック",
    "run": "学習 (run)",
    "refresh": "更新",
    "checkpoint": "チェックポイント",
    "speaker": "話者",
    "text": "テキスト（1行ごとに1クリップ）",
    "text_placeholder": "話させたい文を入力。複数行なら1行ごとに1クリップ。",
    "voice_prompt": "ボイスプロンプト（任意）：まねたい声のクリップ",
    "voice_prompt_text": "ボイスプロンプトの書き起こし（空欄なら学習の音声認識モデルで書き起こし）",
    "sampling": "サンプリング",
    "temperature": "温度 (temperature)",
    "top_p": "Top-p",
    "repetition_penalty": "繰り返しペナルティ",
    "seed": "シード（空欄ならランダム）",
    "longest": "最長の音声（秒、0 は入るだけ）",
    "speak": "話す",
    "clips": "クリップ",
    "timing": "かかった時間と実時間比",
    "compare_pick": "比べるチェックポイント（2〜4個）",
    "compare_text": "全員が話す同じテキスト",
    "compare": "比較する",
    "keep": "これを残す",
    "kept": "残しました",
    "runs_table": "学習一覧",
    "codec_in": "XCodec2 に通す音声",
    "codec_run": "エンコードしてデコード",
    "codec_out": "XCodec2 が残す音",
    "codec_info": "コード",
}

LANGUAGES = {"en": EN, "ja": JA}


def missing_keys() -> dict[str, list[str]]:
    """Keys a language lacks (for the test that keeps the tables in step)."""
    return {lang: sorted(set(EN) - set(table)) for lang, table in LANGUAGES.items() if set(EN) - set(table)}
