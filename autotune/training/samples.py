"""Listen to the run: speech samples at each evaluation.

`SampleCallback` speaks a few validation texts (one per speaker in a multi-speaker set)
at each evaluation, or every `samples.every_n_steps` steps, with `generation.generate_codes`,
decodes them with the codec and writes `<output>/samples/step-N/<i>.wav` plus TensorBoard
audio. Generation is capped by the data, prints a progress line and stops at the next
token on a signal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback

from autotune.errors import AutotuneError
from autotune.generation import generate_codes
from autotune.memory import free_memory


# --------------------------------------------------------------- callback ---

@contextmanager
def own_random_state() -> Iterator[None]:
    """Speaking and scoring draw random numbers (sampling, a codec or scorer built on first use)
    that training must never see: every generator training uses (Python's, numpy's, torch's on
    the CPU and each GPU) is put back as it was. Without this, a run resumed after a stop would
    load the codec at another step than the uninterrupted run and drift from it."""
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@dataclass(frozen=True)
class SamplePrompt:
    """One text to speak at each sampling, in a speaker's voice when the data has speakers."""

    text: str
    speaker: str | None = None


@dataclass
class _Reference:
    audio: str
    text: str
    codes: list[int] | None = None


@dataclass(eq=False)
class SampleCallback(TrainerCallback):
    """Speaks the first validation texts at each evaluation, or every
    `every_n_steps` optimizer steps when that is set (main process only).

    Writes `<output_dir>/samples/step-N/<i>.wav` (16 kHz mono) and `codes.json`
    (texts, codes and counts), logs `samples/<i>` audio and the scalars
    `samples/generated_tokens` and `samples/dropped_ids` (totals over the texts)
    to TensorBoard when it is on. The codec is loaded once, on the CPU so the
    training's GPU memory plan holds, at the first sampling; if it cannot be
    loaded a single warning is printed and the codes are still generated,
    counted and written to codes.json. With evaluation off and no
    `every_n_steps`, the final step is sampled.
    """

    output_dir: Path
    tokenizer: Any
    texts: list[SamplePrompt | str]
    codec_id: str
    console: Any = None
    every_n_steps: int | None = None
    temperature: float = 0.8
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    reference: _Reference | None = None
    should_stop: Callable[[], bool] | None = None   # a signal arrived: end the generation at the next token
    tensorboard: Any = None          # transformers' TensorBoardCallback, whose tb_writer we borrow
    codec_device: str = "cpu"
    keeper: Any = None               # scoring.ScoreKeeper: scores each sampling, feeds the Trainer's metrics
    text_normalization: str = "none"  # the run's (autotune.textnorm): the samples speak what training saw
    codec: Any = field(default=None, init=False)
    codec_error: str | None = field(default=None, init=False)
    _codec_tried: bool = field(default=False, init=False)
    sampled_steps: list[int] = field(default_factory=list, init=False)
    interrupted_steps: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.texts = [t if isinstance(t, SamplePrompt) else SamplePrompt(t) for t in self.texts]

    # -- when ---------------------------------------------------------------

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        with own_random_state():
            if self.every_n_steps is None:
                self._sample(args, state, kwargs.get("model"))
            if self.keeper is not None and metrics is not None:
                # Every process needs the scores (the best checkpoint and early stopping are decided
                # on each); only the main one speaks and scores.
                self.keeper.fill_metrics(int(state.global_step), metrics, main=state.is_world_process_zero,
                                         args=args)

    def on_step_end(self, args, state, control, **kwargs):
        with own_random_state():
            self._on_step_end(args, state, control, **kwargs)

    def _on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.every_n_steps is not None:
            if step > 0 and step % self.every_n_steps == 0:
                self._sample(args, state, kwargs.get("model"))
        elif _evaluation_off(args) and (step >= state.max_steps or control.should_training_stop):
            # No evaluations to hang samples on: speak the final model once.
            self._sample(args, state, kwargs.get("model"))

    # -- what ---------------------------------------------------------------

    def _sample(self, args, state, model) -> None:
        step = int(state.global_step)
        if not state.is_world_process_zero or model is None or step in self.sampled_steps:
            return
        self.sampled_steps.append(step)
        codec = self._get_codec()
        folder = self.output_dir / "samples" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        writer = getattr(self.tensorboard, "tb_writer", None) if self.tensorboard is not None else None
        records = []
        seconds = 0.0
        self._say(f"samples at step {step}: speaking {len(self.texts)} text{'s' if len(self.texts) != 1 else ''}")
        for i, prompt in enumerate(self.texts):
            if self._stopping():
                records.append({"index": i, "text": prompt.text, "speaker": prompt.speaker, "skipped": "interrupted"})
                continue
            try:
                record, wave = self._speak(model, codec, prompt, i, folder, seed=_sample_seed(args.seed, step, i))
            except Exception as exc:  # noqa: BLE001 - a failed sample must not end an hours-long run
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                records.append({"index": i, "text": prompt.text, "speaker": prompt.speaker,
                                "error": f"{type(exc).__name__}: {reason}"})
                self._warn(f"samples: text {i} at step {step} failed ({type(exc).__name__}: {reason}); "
                           "training goes on")
                free_memory()
                continue
            records.append(record)
            if wave is not None:
                from autotune.llasa import SAMPLING_RATE

                seconds += wave.size / SAMPLING_RATE
                if writer is not None and wave.size:
                    import numpy as np
                    import torch

                    clipped = torch.from_numpy(np.clip(wave, -1.0, 1.0)).reshape(1, -1)
                    writer.add_audio(f"samples/{i}", clipped, step, sample_rate=SAMPLING_RATE)
                    writer.add_text(f"samples/{i}/text", prompt.text, step)
        interrupted = self._stopping()
        if interrupted:
            self.interrupted_steps.append(step)
        done = [r for r in records if "error" not in r and "skipped" not in r]
        total_generated = sum(r["generated_tokens"] for r in done)
        total_dropped = sum(r["dropped_ids"] for r in done)
        payload = {"step": step, "codec": self.codec_id, "decoded": codec is not None,
                   "reference_audio": self.reference.audio if self._reference_codes() else None,
                   "interrupted": interrupted, "samples": records}
        from autotune.rundir import write_json

        write_json(folder / "codes.json", payload)
        if writer is not None and done:
            writer.add_scalar("samples/generated_tokens", total_generated, step)
            writer.add_scalar("samples/dropped_ids", total_dropped, step)
            writer.flush()
        if self.console is not None and done:
            heard = f"{seconds:.1f} s of audio" if codec is not None else "codes only (no codec)"
            plural = "s" if len(done) != 1 else ""
            self.console.print(f"samples at step {step}: {len(done)} text{plural}, {heard}, {total_generated} "
                               f"tokens generated, {total_dropped} non-speech dropped -> {folder}")
        if self.keeper is not None and not interrupted:
            try:
                self.keeper.after_sampling(step, folder, records, codec, writer, state)
            except Exception as exc:  # noqa: BLE001 - scoring must never end a training run
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                self._warn(f"scores: step {step} not scored ({type(exc).__name__}: {reason}); training goes on")

    def _reference_codes(self) -> list[int] | None:
        return self.reference.codes if self.reference is not None and self.reference.codes else None

    def _speak(self, model, codec, prompt: SamplePrompt, index: int, folder: Path, *, seed: int):
        """One text: generate, decode when there is a codec, write `<index>.wav`."""
        reference_codes = self._reference_codes()
        shown = [0.0]

        def progress(done: int, budget: int) -> None:
            # A line every 10 s: long generation on a slow machine must not look like a hang.
            now = time.monotonic()
            if now - shown[0] >= 10.0:
                if shown[0]:
                    self._say(f"  sample {index + 1}/{len(self.texts)}: {done} of at most {budget} tokens")
                shown[0] = now

        codes, dropped, generated = generate_codes(
            model, self.tokenizer, prompt.text, temperature=self.temperature, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
            reference_text=self.reference.text if reference_codes else None, reference_codes=reference_codes,
            speaker=prompt.speaker, seed=seed, text_normalization=self.text_normalization,
            should_stop=self._stopping, on_token=progress)
        record = {"index": index, "text": prompt.text, "speaker": prompt.speaker, "generated_tokens": generated,
                  "dropped_ids": dropped, "codes": codes, "wav": None}
        if codec is None:
            return record, None
        from autotune.audio import write_wav
        from autotune.llasa import SAMPLING_RATE

        wave = codec.decode(codes)
        path = folder / f"{index}.wav"
        write_wav(path, wave, SAMPLING_RATE)
        record["wav"] = path.name
        return record, wave

    def _stopping(self) -> bool:
        return bool(self.should_stop is not None and self.should_stop())

    def _say(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, markup=False, highlight=False)

    def _get_codec(self):
        if self._codec_tried:
            return self.codec
        self._codec_tried = True
        from autotune.audio import load_audio
        from autotune.codec import load_codec

        try:
            self.codec = load_codec(self.codec_id, device=self.codec_device)
        except AutotuneError as exc:
            self.codec_error = exc.one_line()
            self._warn(f"samples: {self.codec_error}; training goes on, and samples are kept as codes "
                       "(samples/step-N/codes.json) without audio")
            return None
        if self.reference is not None:
            try:
                self.reference.codes = self.codec.encode(load_audio(self.reference.audio))
            except AutotuneError as exc:
                self._warn(f"samples: the reference clip is not used ({exc.one_line()})")
        return self.codec

    def _warn(self, message: str) -> None:
        if self.console is None:
            return
        from rich.markup import escape

        self.console.print(f"[yellow]! {escape(message)}[/yellow]")


def _evaluation_off(args) -> bool:
    strategy = getattr(args, "eval_strategy", "no")
    return getattr(strategy, "value", strategy) == "no"


def _sample_seed(seed: int, step: int, index: int) -> int:
    """A fixed seed per (run seed, step, text): samples are reproducible and the
    training's own random stream is never touched."""
    return (int(seed) * 1_000_003 + step * 1_009 + index) % (2**32)


# ------------------------------------------------------------------ wiring ---

def _find_tensorboard(trainer: Any) -> Any:
    try:
        from transformers.integrations import TensorBoardCallback
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            return callback
    return None


def check_reference(samples: Any) -> None:
    """Fail on a bad voice-prompt clip before any model loads (the driver calls this early)."""
    _reference(samples)


def _reference(samples: Any) -> _Reference | None:
    audio, text = samples.reference_audio, samples.reference_text
    if not audio and not text:
        return None
    if audio and not (text and text.strip()):
        raise AutotuneError(f"`samples.reference_audio` ({audio}) needs its transcript: "
                            "`--set samples.reference_text=\"...\"`")
    if text and not audio:
        raise AutotuneError("`samples.reference_text` is set without `samples.reference_audio`: "
                            "give the clip too, or remove the transcript")
    from autotune.audio import load_audio

    try:
        load_audio(audio)  # fails now on a missing or unreadable clip, not mid-training
    except AutotuneError as exc:
        raise AutotuneError(f"`samples.reference_audio`: {exc.one_line()}") from None
    return _Reference(audio=str(audio), text=text.strip())


MAX_SAMPLED_SPEAKERS = 8


def choose_prompts(samples_config: Any, val: Sequence[Any], train: Sequence[Any] = ()) -> tuple[list[SamplePrompt], str | None]:
    """What to speak at each sampling, and a note when speakers were left out.

    Without speakers: `samples.texts` if set, else the first `num_texts` validation texts.
    With speakers: every speaker (the first `MAX_SAMPLED_SPEAKERS` by amount of audio), each
    with its first validation text (a training text when it has none in validation), or with
    each of `samples.texts`."""
    if samples_config.num_texts <= 0:
        return [], None
    fixed = [t.strip() for t in samples_config.texts if t and t.strip()]
    pool = list(val) + list(train)
    seconds: dict[str, int] = {}
    for sample in pool:
        if sample.prompt_speaker is not None:
            seconds[sample.prompt_speaker] = seconds.get(sample.prompt_speaker, 0) + len(sample.codes)
    if not seconds:
        texts = fixed or [s.text for s in val if s.text and s.text.strip()][: samples_config.num_texts]
        return [SamplePrompt(t) for t in texts], None
    speakers = sorted(seconds, key=lambda name: (-seconds[name], name))
    note = None
    if len(speakers) > MAX_SAMPLED_SPEAKERS:
        note = (f"samples: {len(speakers)} speakers; the {MAX_SAMPLED_SPEAKERS} with the most audio are spoken "
                "at each sampling")
        speakers = speakers[:MAX_SAMPLED_SPEAKERS]
    prompts = []
    for name in speakers:
        if fixed:
            prompts += [SamplePrompt(t, name) for t in fixed]
        else:
            own = next((s.text for s in pool if s.prompt_speaker == name and s.text.strip()), None)
            if own:
                prompts.append(SamplePrompt(own, name))
    return prompts, note


def auto_max_new_tokens(val: Sequence[Any], train: Sequence[Any] = ()) -> int | None:
    """About 1.5 times the longest validation sample's speech (training's when there is no
    validation): a random or early model that never says END stops there, not at 2,048."""
    lengths = [len(s.codes) for s in (val or train) if s.codes is not None]
    return max(16, (3 * max(lengths)) // 2) if lengths else None


def maybe_add_sample_callback(trainer, config, output_dir, tokenizer, val, console, *, train=(),
                              should_stop: Callable[[], bool] | None = None,
                              keeper: Any = None) -> SampleCallback | None:
    """Add a `SampleCallback` when `samples.num_texts > 0` and there is something to speak;
    with a `scoring.ScoreKeeper`, each sampling is scored and the scores join the metrics.

    Raises:
        AutotuneError: the reference clip is set without a transcript (or the
            reverse), or it is missing or unreadable.
    """
    s = config.samples
    prompts, note = choose_prompts(s, val, train)
    if not prompts or tokenizer is None:
        return None
    if note and console is not None:
        console.print(f"[yellow]! {note}[/yellow]")
    callback = SampleCallback(
        output_dir=Path(output_dir), tokenizer=tokenizer, texts=prompts, codec_id=config.data.codec, console=console,
        every_n_steps=s.every_n_steps, temperature=s.temperature, top_p=s.top_p,
        repetition_penalty=s.repetition_penalty, max_new_tokens=s.max_new_tokens or auto_max_new_tokens(val, train),
        reference=_reference(s), tensorboard=_find_tensorboard(trainer), should_stop=should_stop, keeper=keeper,
        text_normalization=config.data.text_normalization)
    if keeper is not None:
        keeper.voice_prompt = callback.reference.audio if callback._reference_codes() else None
    # Before early stopping: the scores must be among the metrics when it (and then the
    # Trainer's choice of the best checkpoint) reads them.
    handler = trainer.callback_handler
    at = next((i for i, c in enumerate(handler.callbacks) if isinstance(c, EarlyStoppingCallback)), None)
    if at is None:
        trainer.add_callback(callback)
    else:
        handler.callbacks.insert(at, callback)
    return callback
