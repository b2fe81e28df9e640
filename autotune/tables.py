"""The tables a run prints: the data, the first screen, the dry run's attempts, the summary.
Plain values in, rich tables out; nothing here decides anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.llasa import TINY
from autotune.rundir import REPORT


def data_table(console, summary: dict[str, Any], notes: list[str]) -> None:
    """`--check-data`: the layout, counts, hours, lengths, speakers and what was skipped."""
    from rich.table import Table

    table = Table(title="Data", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("layout", summary["layout"])
    table.add_row("samples", f"{summary['train_samples']} train, {summary['val_samples']} validation ({summary['val_source']})")
    table.add_row("audio", f"{summary['audio_seconds'] / 3600:.2f} h ({summary['audio_seconds']:.0f} s)")
    p = summary["token_percentiles"]
    table.add_row("tokens", f"p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {summary['max_tokens']}"
                  + ("" if summary["token_count_exact"] else " (estimated)"))
    if summary["longest"]:
        table.add_row("longest", f"{summary['longest']['source']} ({summary['longest']['tokens']} tokens)")
    if summary["speakers"]:
        shown = ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in list(summary["speakers"].items())[:8])
        more = len(summary["speakers"]) - 8
        table.add_row("speakers", f"{len(summary['speakers'])}: {shown}" + (f" and {more} more" if more > 0 else ""))
    table.add_row("skipped", str(len(summary["skipped"])))
    console.print(table)
    for item in summary["skipped"][:20]:
        console.print(f"  skipped {item['source']}: {item['reason']}", markup=False, highlight=False)
    for note in notes:
        console.print(f"! {note}", style="yellow", markup=False, highlight=False)


def first_screen(c, rec, data_summary: dict[str, Any], notes: list[str], plan_note: str) -> None:
    """What the run starts from: the GPUs, the profile's plan and why, and the data."""
    from autotune.probe_report import gpu_table, settings_table

    if rec.gpus:
        c.print(gpu_table(rec.gpus))
    else:
        c.print("[bold]No GPU[/bold]: training on the CPU (fine for `--model tiny`, far too slow for Llasa)")
    c.print(settings_table(rec, "Plan from the profile" + plan_note))
    for reason in rec.reasons:
        c.print(f"  - {reason}")
    for warning in rec.warnings + notes:
        c.print(f"  ! {warning}", style="yellow", markup=False, highlight=False)
    s = data_summary
    c.print(f"data: {s['train_samples']} train / {s['val_samples']} validation samples, "
            f"{s['audio_seconds'] / 60:.1f} min of audio, longest {s['max_tokens']} tokens, {len(s['skipped'])} skipped"
            + (f", {len(s['speakers'])} speakers" if s["speakers"] else ""))
    if rec.config.model.name_or_path == TINY:
        c.print("[yellow]--model tiny: a tiny random model for the offline demo; it produces no meaningful speech[/yellow]")


def attempts_table(console, result) -> None:
    """The dry run: every plan tried, with its peak and tokens/s, and the one chosen."""
    from rich.table import Table

    table = Table(title=f"Dry run: {len(result.attempts)} attempts in {result.seconds:.1f} s", title_justify="left")
    for column in ("#", "plan", "why", "fits", "peak GiB", "tokens/s", "error"):
        table.add_column(column)
    for i, a in enumerate(result.attempts, 1):
        table.add_row(str(i), a.plan.label(), a.why, "yes" if a.ok else "no",
                      f"{a.peak_bytes / 2**30:.2f}" if a.peak_bytes else "-",
                      f"{a.tokens_per_second:,.0f}" if a.tokens_per_second else "-", a.error or "")
    console.print(table)
    console.print(f"chosen: {result.reason}")


def final_table(console, output_dir: Path, summary: dict[str, Any], findings) -> None:
    """The run's end: steps, losses, scores, speed, memory, the plan, the diagnosis, the adapter."""
    from rich.markup import escape
    from rich.table import Table

    def fmt(value, spec=".4f"):
        return "-" if value is None else format(value, spec)

    table = Table(title="Run summary", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("output", str(output_dir))
    table.add_row("steps", f"{summary['steps']} of {summary['max_steps']}"
                  + (f" (early stop at {summary['stopped_early_at']})" if summary["stopped_early_at"] else ""))
    table.add_row("final train loss", fmt(summary["final_train_loss"]))
    table.add_row("final eval loss", fmt(summary["final_eval_loss"]))
    table.add_row("best eval loss", fmt(summary["best_eval_loss"]))
    metric = summary.get("metric_for_best_model")
    if summary.get("best_checkpoint"):
        table.add_row("best checkpoint", f"{Path(summary['best_checkpoint']).name} (by {metric or 'eval_loss'}"
                      + (f" {summary['best_metric']:.4g})" if summary.get("best_metric") is not None else ")"))
    scores = summary.get("scores") or {}
    for label, key in (("best scores", "best"), ("latest scores", "latest")):
        if scores.get(key):
            table.add_row(label, _scores_line(scores[key]))
    if scores and scores.get("median_seconds_per_evaluation") is not None:
        table.add_row("scoring", f"{scores['median_seconds_per_evaluation']:.1f} s per evaluation on "
                      f"{scores.get('device') or '-'}")
    steady = summary.get("steady_tokens_per_second")
    table.add_row("tokens/s", (f"{steady:,.0f} steady, " if steady else "")
                  + f"{fmt(summary['tokens_per_second'], ',.0f')} overall")
    table.add_row("peak GPU memory", "-" if summary["peak_gpu_bytes"] is None else f"{summary['peak_gpu_bytes'] / 2**30:.2f} GiB")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
    table.add_row("plan", summary["plan"]["label"] + f" ({summary['plan']['effective_batch_size']} effective)")
    console.print(table)
    for f in findings:
        console.print(f"[yellow]{f.kind}[/yellow]: {escape(f.message)}\n  try: {escape(' '.join(f.remedies))}")
    if (output_dir / REPORT).is_file():
        console.print(f"report: {output_dir}/report.html  (curves, and every evaluation's clips to listen to)",
                      markup=False, highlight=False)
    if summary.get("adapter_saved"):
        console.print(f"adapter: {output_dir}/adapter_model.safetensors  "
                      f"(PeftModel.from_pretrained(base, '{output_dir}'))", markup=False, highlight=False)


def _scores_line(scores: dict[str, Any]) -> str:
    """`step 40: CER 12.5 %, speaker similarity 0.812` from a summary's best or latest scores,
    worded as the report and the model card word them."""
    from autotune.describe import scores_in_words

    return f"step {scores.get('step')}: {scores_in_words(scores)}"
