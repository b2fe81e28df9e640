"""The one typed config: schema, YAML loading, layering and `--set` overrides.

Layering, lowest first: built-in profile < `--config FILE.yaml` < `--set key=value`.
The keys under `training` are Hugging Face `TrainingArguments` names and the keys
under `lora` are PEFT `LoraConfig` names, as in the tuning guide. Keys set by the
user (file or `--set`) are "pinned": the auto-tuner never moves them.

This module must stay light: `probe.py` imports it, so no torch here.
"""

from __future__ import annotations

import copy
import difflib
import re
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from autotune.compat import translate_llasa_trainer
from autotune.config_yaml import load_yaml_file, parse_set, short  # noqa: F401 - the config's public API
from autotune.dotted import deep_merge, dotted_keys, set_dotted
from autotune.errors import AutotuneError
from autotune.resume_rules import HARMLESS_ON_RESUME, changed_keys  # noqa: F401 - the config's public API
from autotune.llasa import DEFAULT_CODEC, DEFAULT_MODEL

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# bitsandbytes' 8-bit optimizers, as `TrainingArguments.optim` names them (`adamw_8bit` is ours for `adamw_bnb_8bit`).
EIGHT_BIT_OPTIMIZERS = frozenset({"adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"})

# Integers reach torch, numpy and CUDA, which take at most 64 bits.
INT64_MAX = 2**63 - 1


class _Section(BaseModel):
    # `allow_inf_nan=False`: `inf` (YAML `.inf`, or `1e999`) is no learning rate, memory share or size.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `true` as 1 for a number; `--set lora.r=true` is a mistake, not rank 1.
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("must be a number, not true/false")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ValueError("is out of range (a 64-bit integer, -2**63 to 2**63 - 1)")
        return value


class ModelSection(_Section):
    name_or_path: str = Field(DEFAULT_MODEL, description="Hub id or local folder of the Llasa base model; `tiny` builds the offline demo model.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model repository. Off unless you trust it.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel.")
    load_in_4bit: bool = Field(False, description="Load the frozen base weights as bitsandbytes NF4 (QLoRA). Needs CUDA and bitsandbytes.")


class DataSection(_Section):
    codec: str = Field(DEFAULT_CODEC, description="XCodec2 hub id or local folder used to encode audio; `tiny` is the offline test codec.")
    max_length: int = Field(2048, gt=8, description="Longest sample in tokens, prompt included. Longer samples are skipped and listed, never truncated.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share held out for validation when no validation set is given.")
    split_seed: int = Field(42, description="Seed of the reproducible train/validation split.")
    packing: bool = Field(False, description="Padding-free batches: pack samples into rows without cross-sample attention.")
    token_budget: bool = Field(
        True, description="Split each optimizer step's samples into micro-batches by padded tokens (up to "
                          "`per_device_train_batch_size` rows of the longest sample) rather than by count: fewer, "
                          "fuller calls, the same samples per step and the same loss.")
    max_errors_shown: int = Field(50, gt=0, description="Cap on malformed lines listed before stopping.")
    allow_outside_paths: bool = Field(False, description="Read audio paths that lead outside the data folder (`../x.wav`, absolute paths).")
    ljspeech_column: Literal["raw", "normalized"] = Field(
        "raw", description="Which LJSpeech transcript trains: `raw` (column 2, what the official recipe and "
                           "every LJSpeech trainer use, and what synthesis is given) or `normalized` (column 3, "
                           "numbers and abbreviations spelled out).")
    text_normalization: Literal["auto", "none", "llasa-trainer", "nfkc"] = Field(
        "auto", description="How transcripts are normalised before they become prompts, the same in training, "
                            "`--check-data`, samples, scores and synthesis: `none`; `llasa-trainer` (its Japanese "
                            "rules: no spaces, half-width `?!` and alphanumerics, `ー` for wave dashes, only kana, "
                            "kanji, Latin letters, digits and `。、!?…♪♡○` kept); `nfkc`; `auto`: `llasa-trainer` for "
                            "NandemoGHS's Anime-Llasa models, `none` otherwise. The run records the choice.")


class TrainingSection(_Section):
    """Hugging Face `TrainingArguments` keys plus the guide's early-stopping extras."""

    per_device_train_batch_size: int = Field(1, gt=0, description="Micro-batch per GPU.")
    per_device_eval_batch_size: int | None = Field(None, gt=0, description="Eval micro-batch; defaults to the training micro-batch.")
    gradient_accumulation_steps: int = Field(8, gt=0, description="Micro-batches per optimizer step.")
    bf16: bool = Field(False, description="bfloat16 mixed precision (Ampere and newer, compute capability >= 8.0).")
    fp16: bool = Field(False, description="float16 mixed precision (Volta/Turing).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward: less memory, about a third slower.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = Field(
        "adamw_torch", description="Optimizer name as in `TrainingArguments.optim`.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule.")
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra schedule arguments, e.g. `{num_cycles: 2}` for cosine_with_restarts.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (L2 regularisation).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    num_train_epochs: float = Field(3.0, gt=0, description="Epochs to train (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Total optimizer steps; -1 means use num_train_epochs.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field("steps", description="When to validate (the guide's `evaluation_strategy`).")
    eval_steps: int = Field(50, gt=0, description="Validate every this many optimizer steps.")
    save_strategy: Literal["steps", "epoch", "no"] = Field(
        "steps", description="When to checkpoint. Without checkpoints (`no`) neither `--resume` nor the out-of-memory recovery can continue a run.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every this many optimizer steps.")
    save_total_limit: int | None = Field(3, gt=0, description="Checkpoints kept on disk (the best is always kept).")
    logging_steps: int = Field(10, gt=0, description="Log the loss every this many optimizer steps.")
    logging_dir: str | None = Field(None, description="TensorBoard folder; defaults to `<output>/logs`.")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], description="Loggers: `tensorboard` or `none`.")
    load_best_model_at_end: bool = Field(True, description="Restore the best checkpoint by `metric_for_best_model` at the end.")
    metric_for_best_model: Literal["eval_loss", "loss", "cer", "wer", "error_rate", "similarity"] = Field(
        "eval_loss", description="Metric that picks the best checkpoint and drives early stopping: `eval_loss`, or "
                                 "a score of the samples spoken at each evaluation (`cer`, `wer`, `error_rate`: "
                                 "each text's own, `similarity`; see `scores`).")
    greater_is_better: bool | None = Field(
        None, description="Whether a larger metric is better; default: true for `similarity`, false otherwise.")
    dataloader_num_workers: int = Field(0, ge=0, description="Data-loading worker processes.")
    dataloader_pin_memory: bool = Field(True, description="Pin host memory for faster GPU copies.")
    group_by_length: bool = Field(True, description="Batch samples of similar length together to reduce padding.")
    seed: int = Field(42, ge=0, lt=2**32, description="Training seed (0 to 2**32 - 1, numpy's range).")
    use_early_stopping: bool = Field(True, description="Stop when the metric stops improving (needs validation).")
    early_stopping_patience: int = Field(5, gt=0, description="Evaluations without improvement before stopping.")
    early_stopping_threshold: float = Field(0.001, ge=0, description="Smallest improvement that counts.")
    lean_loss: bool = Field(True, description="Speech-only chunked cross-entropy that never holds full fp32 logits.")
    lean_loss_chunk_size: int = Field(
        1024, ge=1, le=65536,
        description="Labelled tokens per chunk of the lean loss; a chunk holds its [tokens x 193,800] logits in "
                    "fp32 plus their gradient in half precision (1.1 GiB at 1024).")
    nan_patience: int = Field(3, gt=0, description="Consecutive non-finite steps before rolling back to the last good checkpoint.")
    torch_compile: bool = Field(
        False, description="Compile the model's step with `torch.compile` (HF's key); rows are padded to a few fixed "
                           "widths so recompiles stay bounded. The dry run tries it on a GPU and keeps it when it pays.")
    torch_compile_mode: Literal["reduce-overhead", "max-autotune"] | None = Field(
        None, description="`torch.compile`'s mode (HF's key); none is its default. `reduce-overhead` replays the "
                          "compiled step as CUDA graphs, which pays once rows are packed into a few bucketed "
                          "shapes: the dry run tries it on a GPU and keeps it when it pays.")
    use_liger_kernel: bool = Field(
        False, description="Liger's Llama kernels (RMSNorm, RoPE, SwiGLU) through HF's `use_liger_kernel`; needs "
                           "liger-kernel and CUDA. The dry run tries it when installed.")

    @field_validator("lr_scheduler_kwargs")
    @classmethod
    def _numeric_schedule_arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Every schedule offered here takes numbers (`num_cycles`, `power`, `lr_end`): a string
        # would only fail as a TypeError deep inside the first optimizer step.
        for key, item in value.items():
            if isinstance(item, bool) or not isinstance(item, (int, float)) or item != item or item in (
                    float("inf"), float("-inf")):
                raise ValueError(f"`{key}` must be a finite number, got {short(item)!r}")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        # `report_to: null` (llasa-trainer's files) means no reporting, as in `TrainingArguments`.
        return ["none"] if value is None else [value] if isinstance(value, str) else value

    @field_validator("metric_for_best_model", mode="before")
    @classmethod
    def _score_name(cls, value: Any) -> Any:
        # HF writes evaluation metrics as `eval_<name>`: `eval_cer` is the `cer` score.
        if isinstance(value, str) and value.startswith("eval_") and value[5:] in SCORE_METRICS:
            return value[5:]
        return value

    @property
    def higher_is_better(self) -> bool:
        """`greater_is_better` as set, else by the metric (similarity up, losses and error rates down)."""
        return self.greater_is_better if self.greater_is_better is not None else self.metric_for_best_model == "similarity"

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false; `TrainingArguments` spells it "no".
        return "no" if value is False else value

    @model_validator(mode="after")
    def _one_precision(self) -> "TrainingSection":
        if self.bf16 and self.fp16:
            raise ValueError("`training.bf16` and `training.fp16` are both true: choose one")
        return self


class LoraSection(_Section):
    """PEFT `LoraConfig` keys."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS), description="Linear layers that get adapters.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one module, e.g. [q_proj, v_proj]")
        return value


class AutotuneSection(_Section):
    memory_fraction: float = Field(0.9, gt=0, le=1, description="Planned peak must stay under this share of the GPU's memory.")
    dry_run_steps: int = Field(2, gt=0, description="Optimizer steps per dry-run attempt (the first warms up).")
    max_attempts: int = Field(12, gt=0, description="Upper bound on dry-run attempts.")
    time_plans: bool = Field(True, description="When several plans fit, time them and keep the fastest.")
    oom_retries: int = Field(2, ge=0, description="Mid-training out-of-memory recoveries before giving up.")
    vram_limit_gib: float | None = Field(None, gt=0, description="Cap this process's GPU memory (GiB), as if the card were smaller.")


class SamplesSection(_Section):
    """Audio samples spoken during training. Sampling follows the Llasa model card."""

    every_n_steps: int | None = Field(None, gt=0, description="Generate audio samples every N steps; default: at each evaluation.")
    num_texts: int = Field(2, ge=0, description="Validation texts spoken at each sampling (0 turns samples off); with speakers, one text per speaker.")
    texts: list[str] = Field(default_factory=list, description="Fixed texts to speak instead of validation texts (llasa-trainer's `test.text`).")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature (the Llasa model card's 0.8).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (the model card's 1.0).")
    repetition_penalty: float = Field(
        1.0, gt=0, description="Repetition penalty; 1.0 is none, as in the model card (the official LoRA example uses 1.2).")
    max_new_tokens: int | None = Field(
        None, gt=0, le=2048, description="Longest generated speech in tokens (50 per second); default about 1.5x the longest "
                                "validation sample. Prompt plus speech never pass Llasa's 2,048 positions.")
    reference_audio: str | None = Field(None, description="Optional speaker prompt clip (voice cloning).")
    reference_text: str | None = Field(None, description="Transcript of `reference_audio`.")

    @field_validator("texts", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else [] if value is None else value


DEFAULT_ASR_MODEL = "openai/whisper-large-v3-turbo"
DEFAULT_SPEAKER_MODEL = "microsoft/wavlm-base-plus-sv"
# The scores `training.metric_for_best_model` may name, and the scorer each needs.
SCORE_METRICS = {"cer": "asr_model", "wer": "asr_model", "error_rate": "asr_model", "similarity": "speaker_model"}


class ScoresSection(_Section):
    """Scores of the samples spoken at each evaluation (the seed-tts-eval protocol)."""

    asr_model: str = Field(
        DEFAULT_ASR_MODEL, description="Speech recogniser for intelligibility (CER for Japanese and Chinese, WER "
                                       "otherwise): a hub id or folder of a Whisper checkpoint, `tiny` (tests), or "
                                       "`none` to turn it off.")
    speaker_model: str = Field(
        DEFAULT_SPEAKER_MODEL, description="Speaker-verification model for similarity to real clips of the same "
                                           "speaker: a hub id or folder (`WavLMForXVector`), `tiny`, or `none`.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the scorers run; `auto`: the GPU when the plan leaves room for them, else the CPU.")
    references: int = Field(3, ge=1, le=16, description="Real validation clips per speaker that similarity is measured against.")

    @property
    def enabled(self) -> bool:
        return any(m.strip().lower() != "none" for m in (self.asr_model, self.speaker_model))


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    autotune: AutotuneSection = Field(default_factory=AutotuneSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)
    scores: ScoresSection = Field(default_factory=ScoresSection)
    eval_data_dir: str | None = Field(None, description="Validation set (file or folder); overrides the automatic split.")

    @property
    def precision(self) -> str:
        """"bf16", "fp16" or "fp32": the one name for the two `TrainingArguments` flags."""
        return precision_of(self.training.bf16, self.training.fp16)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------- precision ---

def precision_of(bf16: bool, fp16: bool) -> str:
    """The one rule from the two `TrainingArguments` flags to a precision name."""
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def precision_settings(precision: str) -> dict[str, bool]:
    """The two flags for a precision name (the inverse of `precision_of`)."""
    return {"training.bf16": precision == "bf16", "training.fp16": precision == "fp16"}


# ------------------------------------------------------------------- rules ---

def config_rule_problems(config: Config) -> list[str]:
    """Rules between keys that Hugging Face would only raise once training starts,
    each as a one-line problem with its fix. Checked before the dry run."""
    t = config.training
    problems = []
    evaluating = t.eval_strategy != "no"
    if t.load_best_model_at_end and evaluating:
        if t.save_strategy != t.eval_strategy:
            problems.append(f"`training.save_strategy` ({t.save_strategy}) must match `training.eval_strategy` "
                            f"({t.eval_strategy}) when `training.load_best_model_at_end` is true: "
                            f"`--set training.save_strategy={t.eval_strategy}`, or "
                            "`--set training.load_best_model_at_end=false`")
        elif t.eval_strategy == "steps" and t.save_steps % t.eval_steps:
            problems.append(f"`training.save_steps` ({t.save_steps}) must be a multiple of `training.eval_steps` "
                            f"({t.eval_steps}) when `training.load_best_model_at_end` is true: e.g. "
                            f"`--set training.save_steps={t.eval_steps * max(1, t.save_steps // t.eval_steps)}`")
    metric = t.metric_for_best_model
    if metric in SCORE_METRICS:
        needs = SCORE_METRICS[metric]
        if getattr(config.scores, needs).strip().lower() == "none":
            problems.append(f"`training.metric_for_best_model: {metric}` needs `scores.{needs}`, which is `none`: set "
                            f"a model, or `--set training.metric_for_best_model=eval_loss`")
        if not evaluating:
            problems.append(f"`training.metric_for_best_model: {metric}` scores the samples of each evaluation, and "
                            "`training.eval_strategy` is `no`: `--set training.eval_strategy=steps`")
        if config.samples.num_texts <= 0 or config.samples.every_n_steps is not None:
            problems.append(f"`training.metric_for_best_model: {metric}` needs samples at every evaluation: "
                            "`--set samples.num_texts=2` and no `samples.every_n_steps`")
    return problems


# ---------------------------------------------------------------- layering ---

class Resolved(BaseModel):
    """A validated config and which of its keys the user pinned."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    config: Config
    pinned: set[str]
    notes: list[str] = []


def resolve_config(profile_values: dict[str, Any] | None = None,
                   user_yaml: dict[str, Any] | None = None,
                   sets: list[str] | None = None) -> Resolved:
    """Layer profile < user YAML < `--set`, validate once, report every error together."""
    notes: list[str] = []
    user = _normalise_aliases(copy.deepcopy(user_yaml or {}), notes)
    user, _run_keys = translate_llasa_trainer(user, notes)  # those are the command line's (see `run_keys`)
    problems = read_guide_shorthand(user, notes)
    for item in sets or []:
        key, value = parse_set(item)
        if "." not in key and key not in Config.model_fields:
            shorthand = {key: value}
            problems += read_guide_shorthand(shorthand, notes, where="--set ")
            user = deep_merge(user, shorthand)
            continue
        set_dotted(user, _canonical_key(key, notes), value)
    problems += read_ranges(user, notes)
    if problems:
        raise AutotuneError(f"invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''})",
                            details=problems)
    _precision_choice_turns_other_off(user)
    merged = deep_merge(profile_values or {}, user)
    config = validate(merged)
    _decide_text_normalization(config, notes)
    pinned = dotted_keys(user)
    # Choosing one precision pins the other off, or the tuner could turn both on.
    if "training.bf16" in pinned or "training.fp16" in pinned:
        pinned |= {"training.bf16", "training.fp16"}
    _align_save_and_eval_steps(config, pinned, notes)
    return Resolved(config=config, pinned=pinned, notes=notes)


def _decide_text_normalization(config: Config, notes: list[str]) -> None:
    """`auto` becomes the model's choice here, so the run records what it trained with and
    synthesis of its adapter uses the same."""
    from autotune.textnorm import AUTO, resolve

    if config.data.text_normalization == AUTO:
        config.data.text_normalization = resolve(AUTO, config.model.name_or_path)
        if config.data.text_normalization != "none":
            notes.append(f"transcripts are normalised as `{config.data.text_normalization}` (the choice for "
                         f"`{config.model.name_or_path}`; `--set data.text_normalization=none` turns it off)")


def _align_save_and_eval_steps(config: Config, pinned: set[str], notes: list[str]) -> None:
    """The best checkpoint can only be one that was saved at an evaluation: when the user
    set one of the two intervals, the other (left to us) follows it."""
    t = config.training
    if t.save_steps % t.eval_steps == 0:
        return
    if "training.save_steps" in pinned and "training.eval_steps" not in pinned:
        t.eval_steps = t.save_steps
        notes.append(f"`training.eval_steps` follows your `save_steps`: {t.save_steps}")
    elif "training.eval_steps" in pinned and "training.save_steps" not in pinned:
        t.save_steps = t.eval_steps
        notes.append(f"`training.save_steps` follows your `eval_steps`: {t.eval_steps}")


def validate(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        training = tree.get("training") if isinstance(tree, dict) else None
        both = "`training`: `training.bf16` and `training.fp16` are both true: choose one"
        if isinstance(training, dict) and _true(training.get("bf16")) and _true(training.get("fp16")) \
                and both not in problems:
            # The section's own check runs only once its fields are valid; say it now too.
            problems.append(both)
        raise AutotuneError(f"invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''})",
                            details=problems) from None


def _true(value: Any) -> bool:
    """True as the schema's bool fields read it (`true`, `1`, "yes", ...)."""
    try:
        return TypeAdapter(bool).validate_python(value) is True
    except ValidationError:
        return False


ALIASES = {"training.evaluation_strategy": "training.eval_strategy"}  # the guide's old names


def _canonical_key(key: str, notes: list[str]) -> str:
    new = ALIASES.get(key)
    if new is None:
        return key
    old_name, new_name = key.rsplit(".", 1)[1], new.rsplit(".", 1)[1]
    notes.append(f"`{old_name}` is the old name of `{new_name}`; it was read as `{new_name}`.")
    return new


def _normalise_aliases(tree: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Old names in a file; the new name wins where a file has both."""
    for old, new in ALIASES.items():
        section, old_key = old.split(".")
        node = tree.get(section)
        if isinstance(node, dict) and old_key in node:
            value = node.pop(old_key)
            node.setdefault(_canonical_key(old, notes).split(".")[1], value)
    return tree



# ----------------------------------------------------------- the guide's shorthand ---

SECTIONS = ("model", "data", "training", "lora", "autotune", "samples", "scores")


def _homes(name: str) -> list[str]:
    """The dotted keys a bare name can mean: each section's field of that name (or old name)."""
    homes = []
    for section in SECTIONS:
        fields = Config.model_fields[section].annotation.model_fields
        if name in fields:
            homes.append(f"{section}.{name}")
        elif ALIASES.get(f"{section}.{name}", "").split(".")[-1] in fields:
            homes.append(ALIASES[f"{section}.{name}"])
    return homes


def read_guide_shorthand(tree: dict[str, Any], notes: list[str], where: str = "") -> list[str]:
    """The tuning guide writes `TrainingArguments` keys at the top level of its snippets
    (`optim: adamw_torch_fused`, `bf16: true`, `per_device_train_batch_size: 1`): a top-level key
    that names exactly one section's key is read as that key, in place, with one note; the
    section's own entry wins where a file has both. Returns the problems (an ambiguous name)."""
    moved, problems = [], []
    for name in [k for k in list(tree) if isinstance(k, str) and k not in Config.model_fields]:
        homes = _homes(name)
        if len(homes) == 1:
            section, key = homes[0].split(".")
            node = tree.setdefault(section, {})
            if not isinstance(node, dict):
                continue   # the schema says what is wrong with the section
            value = tree.pop(name)
            if key not in node:
                node[key] = value
            moved.append(f"`{where}{name}` as `{homes[0]}`")
        elif len(homes) > 1:
            problems.append(f"`{where}{name}` is a key of several sections: did you mean "
                            + " or ".join(f"`{h}`" for h in homes) + "?")
    if moved:
        notes.append("read the guide's top-level keys in their sections: " + ", ".join(moved))
    return problems


# `20-30` (the guide's `num_train_epochs: 20-30`): a range where one number belongs.
_RANGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[-~〜～]\s*(\d+(?:\.\d+)?)\s*$")


def read_ranges(tree: dict[str, Any], notes: list[str]) -> list[str]:
    """A range written for a number (`num_train_epochs: 20-30`) is read as its upper end, with a
    note: the guide pairs such ranges with early stopping, which ends the run sooner when it should."""
    problems = []
    for section in SECTIONS:
        node = tree.get(section)
        if not isinstance(node, dict):
            continue
        fields = Config.model_fields[section].annotation.model_fields
        for key, value in list(node.items()):
            field = fields.get(key)
            match = _RANGE.match(value) if isinstance(value, str) and field is not None else None
            if match is None:
                continue
            kinds = set(get_args(field.annotation)) | {field.annotation}
            if not kinds & {int, float}:
                continue
            low, high = float(match.group(1)), float(match.group(2))
            if low > high:
                problems.append(f"`{section}.{key}`: the range `{value}` runs backwards; write one number")
                continue
            upper = int(high) if int in kinds and high.is_integer() else high
            node[key] = upper
            notes.append(f"`{section}.{key}: {value}` is a range: read as its upper end, {upper:g} "
                         "(early stopping ends the run sooner when the metric stops improving)")
    return problems


def _precision_choice_turns_other_off(user: dict[str, Any]) -> None:
    # `fp16: true` alone must not collide with a profile's `bf16: true` (or the reverse).
    training = user.get("training")
    if isinstance(training, dict):
        for chosen, other in (("bf16", "fp16"), ("fp16", "bf16")):
            if training.get(chosen) is True and other not in training:
                training[other] = False


# Names people use for a field (PEFT's docs say "rank"); typos of these get a hint too.
_COMMON_NAMES = {("lora",): {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}}


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    key = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        options = _field_names(err["loc"][:-1])
        common = {k: v for k, v in _COMMON_NAMES.get(tuple(loc[:-1]), {}).items() if v in options}
        close = difflib.get_close_matches(str(err["loc"][-1]), options + list(common), n=1, cutoff=0.6)
        close = [".".join(loc[:-1] + [common.get(name, name)]) for name in close]
        if not close and len(loc) == 1:
            # A top-level typo of a section's key (`max_step`): look in every section.
            every = [f"{s}.{f}" for s in SECTIONS for f in Config.model_fields[s].annotation.model_fields]
            by_name = {name.split(".")[1]: name for name in every}
            close = [by_name[n] for n in difflib.get_close_matches(loc[0], list(by_name), n=1, cutoff=0.75)]
        hint = f" (did you mean `{close[0]}`?)" if close else (
            f" (allowed: {', '.join(options)})" if options else "")
        return f"unknown key `{key}`{hint}"
    value = err.get("input")
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    shown = "" if isinstance(value, dict) else f", got `{short(value)}`"
    return f"`{key}`: {message[0].lower() + message[1:]}{shown}"


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
