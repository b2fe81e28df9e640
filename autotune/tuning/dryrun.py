"""The dry run: measure plans with the training's own step, down the ladder until one fits.

Each attempt trains the plan with the same `build_trainer` training uses (optimizer
construction, loss, collator, callbacks), for `autotune.dry_run_steps` optimizer steps: the
first on the longest rows the data holds (what decides the peak), the rest on rows of median
length (what a step costs in steady state, timed), and one more median step whose kernel
launches are counted (`autotune.launches`; that step is not timed). Then one evaluation on the longest
validation rows and one short sample generation, because training does both and they count
towards its peak. The measured peak is then the training's peak.

The base model is loaded once per weight format and kept; each attempt adds LoRA, trains,
and removes it again, so a ladder costs seconds, not reloads.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from autotune.batches import ExampleDataset
from autotune.config import Config
from autotune.errors import AutotuneError
from autotune.memory import free_memory
from autotune.plan import Plan
from autotune.tuning.ladder import DryRunResult, Measurement, search

# A sample's speech in the dry run: enough new tokens to hold the generation's cache and
# logits on the device, few enough to cost a second.
SAMPLE_TOKENS = 8


class LaunchCount:
    """Kernel launches of the dry run's last step and the tokens it trained, from a TrainerCallback
    (`autotune.launches`): that step is counted, not timed."""

    def __init__(self, trainer: Any, device: str, step: int):
        from autotune.launches import launch_counter

        self.trainer = trainer
        self.step = step
        self.counter = launch_counter(device)
        self.tokens = 0
        self._tokens_before = 0

    def per_1000_tokens(self) -> float | None:
        return round(1000 * self.counter.launches / self.tokens, 1) if self.tokens else None

    def callback(self):
        from transformers import TrainerCallback

        count = self

        class _Count(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step + 1 == count.step:
                    count._tokens_before = count.trainer.tokens_seen
                    count.counter.start()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == count.step:
                    count.counter.stop()
                    count.tokens = count.trainer.tokens_seen - count._tokens_before

        return _Count()


@dataclass
class StepTimer:
    """Seconds of each optimizer step, the device synchronised at both ends (the dry run
    only: training itself never waits for the device between steps)."""

    cuda: bool
    seconds: list[float] = field(default_factory=list)
    _started: float = 0.0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._sync()
                timer._started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer._sync()
                timer.seconds.append(time.perf_counter() - timer._started)

        return _Timer()


class TrainerMeasure:
    """`measure(plan) -> Measurement` for `ladder.search`, by training the plan for real."""

    def __init__(self, *, config: Config, load_base: Callable[[str, bool], Any], examples: list[dict[str, list[int]]],
                 val_examples: list[dict[str, list[int]]], collator_for: Callable[[Config], Any], device: str,
                 tokenizer: Any = None,
                 sample_text: str | None = None, workdir: Path | None = None):
        self.config = config
        self.load_base = load_base
        self.examples = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
        self.val_examples = sorted(val_examples, key=lambda e: len(e["input_ids"]), reverse=True)
        self.collator_for = collator_for   # the collator a plan trains with (compiled plans pad to buckets)
        self.device = device
        self.tokenizer = tokenizer
        self.sample_text = sample_text
        self.workdir = workdir
        self._base: dict[tuple[str, bool], Any] = {}

    # -- the rows ---------------------------------------------------------------

    def rows(self, plan: Plan, steps: int) -> list[dict[str, list[int]]]:
        """One optimizer step of the longest rows that fit the plan's max length, then
        `steps - 1` steps of median-length rows, in that order (a sequential sampler)."""
        per_step = plan.micro_batch_size * plan.accumulation_steps
        fitting = [e for e in self.examples if len(e["input_ids"]) <= plan.max_length]
        if not fitting:
            raise AutotuneError(f"no sample is shorter than max_length {plan.max_length}")
        longest = _fill(fitting[:per_step], per_step)
        middle = len(fitting) // 2
        lo = max(0, middle - per_step // 2)
        median = _fill(fitting[lo:lo + per_step], per_step)
        return longest + median * max(0, steps - 1)

    def base(self, plan: Plan):
        key = (plan.precision, plan.load_in_4bit)
        if key not in self._base:
            # Keep one weight format in memory at a time.
            self._base.clear()
            free_memory()
            self._base[key] = self.load_base(plan.precision, plan.load_in_4bit)
        return self._base[key]

    def config_for(self, plan: Plan, steps: int) -> Config:
        """The run's config with the plan, trained for `steps` steps: no saving, no loggers,
        no schedule warm-up, in order; evaluation and speech are measured after it."""
        config = plan.apply(self.config)
        t = config.training.model_copy(update=dict(
            max_steps=steps, save_strategy="no", eval_strategy="no", report_to=["none"], warmup_ratio=0.0,
            logging_steps=steps, load_best_model_at_end=False, use_early_stopping=False, group_by_length=False))
        return config.model_copy(update={"training": t})

    # -- one attempt ------------------------------------------------------------

    def __call__(self, plan: Plan) -> Measurement:
        import torch

        from autotune.generation import generate_codes
        from autotune.model import apply_lora, set_gradient_checkpointing
        from autotune.training.trainer import build_trainer

        steps = max(1, self.config.autotune.dry_run_steps)
        counted = steps + 1   # one more median step, for its kernel launches
        config = self.config_for(plan, counted)
        base = self.base(plan)
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        lora = config.lora
        model = apply_lora(base, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                           target_modules=list(lora.target_modules), bias=lora.bias,
                           gradient_checkpointing=config.training.gradient_checkpointing, quantized=plan.load_in_4bit)
        trainer = None
        try:
            rows = self.rows(plan, counted)
            evaluation = [e for e in self.val_examples if len(e["input_ids"]) <= plan.max_length]
            per_eval = config.training.per_device_eval_batch_size or plan.micro_batch_size
            with tempfile.TemporaryDirectory(dir=self.workdir, prefix=".dry-run-") as folder:
                trainer = build_trainer(config, model, train_set=ExampleDataset(rows),
                                        val_set=ExampleDataset(evaluation[:per_eval]) if evaluation else None,
                                        collator=self.collator_for(config), output_dir=Path(folder), use_cpu=not cuda,
                                        progress=False, sequential=True)
                timer = StepTimer(cuda)
                trainer.add_callback(timer.callback())
                launches = LaunchCount(trainer, self.device, counted)
                trainer.add_callback(launches.callback())
                started = time.perf_counter()
                trainer.train()
                if evaluation:
                    trainer.evaluate()
                if self.tokenizer is not None and self.sample_text:
                    generate_codes(model, self.tokenizer, self.sample_text, max_new_tokens=SAMPLE_TOKENS, seed=0)
                seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() if cuda else None
            timer.seconds = timer.seconds[:steps]             # the counted step's time is the probe's
            timed = timer.seconds[1:] or timer.seconds       # the first step warms up
            median_rows = rows[-plan.micro_batch_size * plan.accumulation_steps:]
            tokens = sum(len(e["input_ids"]) for e in median_rows)
            step = statistics.median(timed) if timed else 0.0
            # The first step's extra time (compilation, above all) is paid once per run.
            overhead = max(0.0, timer.seconds[0] - step) if timer.seconds else 0.0
            return Measurement(peak, tokens / step if step > 0 else 0.0, seconds, overhead_seconds=overhead,
                               launches_per_1000_tokens=launches.per_1000_tokens())
        finally:
            del trainer
            set_gradient_checkpointing(model, False)
            self._base[(plan.precision, plan.load_in_4bit)] = model.unload()


def _fill(rows: list[dict[str, list[int]]], count: int) -> list[dict[str, list[int]]]:
    """`count` rows: tiny data sets repeat what they have."""
    out = list(rows)
    while len(out) < count:
        out.append(rows[len(out) % len(rows)])
    return out


# ----------------------------------------------------------------- the run ---

def apply_vram_limit(config: Config, device: str, fraction_of_limit: float = 1.0) -> int | None:
    """Cap the process's share of the GPU; returns the cap in bytes (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    limit = config.autotune.vram_limit_gib
    cap = min(total, int(limit * 2**30)) if limit else total
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * fraction_of_limit / total), index)
    return int(cap * fraction_of_limit)


def dry_run(config: Config, start: Plan, *, pinned: set[str], examples, val_examples, collator_for, device: str,
            tokenizer: Any, sample_text: str | None, workdir: Path, run_tokens: float | None = None,
            log: Callable | None = None,
            announce: Callable[[str], None] = lambda text: None) -> DryRunResult:
    """Down the ladder from `start` until a plan fits under `autotune.memory_fraction` of the
    card, then (on a GPU) up to the fastest that fits."""
    from autotune.loss import liger_available
    from autotune.model import load_base_model
    from autotune.profiles import bitsandbytes_installed

    budget = apply_vram_limit(config, device, config.autotune.memory_fraction)

    def load_base(precision: str, four_bit: bool):
        return load_base_model(config.model.name_or_path, precision=precision,
                               attn_implementation=config.model.attn_implementation,
                               trust_remote_code=config.model.trust_remote_code, load_in_4bit=four_bit, device=device)

    measure = TrainerMeasure(config=config, load_base=load_base, examples=examples, val_examples=val_examples,
                             collator_for=collator_for, device=device, tokenizer=tokenizer, sample_text=sample_text,
                             workdir=workdir)
    cuda = device.startswith("cuda")
    longest = max(len(e["input_ids"]) for e in examples)
    announce(f"[bold]Dry run[/bold] on {device}: longest batch {longest} tokens per row"
             + (f", budget {budget / 2**30:.1f} GiB ({config.autotune.memory_fraction:.0%})" if budget else ""))
    try:
        return search(start, measure, pinned=pinned, max_attempts=config.autotune.max_attempts,
                      time_plans=config.autotune.time_plans and cuda,
                      ctx={"cuda": cuda, "bitsandbytes": cuda and bitsandbytes_installed(), "longest_tokens": longest,
                           # compiling pays on a GPU over a run; on a CPU it costs minutes for little
                           "compile": cuda, "cuda_graphs": cuda, "liger": cuda and liger_available(),
                           "run_tokens": run_tokens},
                      budget_bytes=budget, log=log)
    finally:
        del measure
        free_memory()
        if cuda:
            apply_vram_limit(config, device, 1.0)  # training gets the whole (limited) card back
