"""The sweep's ranking on an 80-column terminal (issue #28): every setting shown whole and every
rank numbered; the least needed columns give way instead."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from autotune.sweep.grid import build_grid, parse_sweeps, show


def render(width: int, scored: bool = False) -> str:
    axes = parse_sweeps(["training.learning_rate=1e-5,5e-5,1e-4", "lora.r=8,16,32"])
    trials = build_grid(axes)
    for i, t in enumerate(trials):
        t.status, t.eval_loss, t.train_loss = "ok", 3.0 - i / 10, 2.5 - i / 10
        t.tokens_per_second, t.peak_gpu_bytes = 41_234.5, int(37.9 * 2**30)
        if scored:
            t.scores = {"mean_error_rate": 0.1 + i / 100, "mean_similarity": 0.9}
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    ctx = SimpleNamespace(console=console, output_dir=__import__("pathlib").Path("/tmp/sweep"))
    record = {"ranked_by": "error_rate" if scored else "eval_loss", "pending": [], "best": None,
              "trials_per_hour": None}
    show(ctx, axes, trials, record)
    return console.export_text()


def test_at_80_columns_every_learning_rate_is_whole_and_every_rank_numbered():
    for scored in (False, True):
        text = render(80, scored)
        table = [line for line in text.splitlines() if line.startswith("│")]   # the rows (the header is ┃)
        assert len(table) == 9
        assert "…" not in text
        for value in ("1e-05", "5e-05", "0.0001"):
            assert sum(value in row for row in table) == 3
        for rank in range(1, 10):
            assert any(row.split("│")[1].strip() == str(rank) for row in table)
        assert max(len(line) for line in text.splitlines()) <= 80


def test_a_wide_terminal_keeps_every_column():
    text = render(160, scored=True)
    for header in ("train loss", "tokens/s", "peak GiB", "similarity"):
        assert header in text
