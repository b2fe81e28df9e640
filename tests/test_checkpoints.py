"""Verified checkpoints: a damaged newest checkpoint is skipped with one line and the
run resumes from the newest one that verifies, ending exactly where an uninterrupted
run ends. Real Trainer, real PEFT, tiny model on the CPU."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from autotune import checkpoint_checks as C
from autotune.errors import AutotuneError
from test_reliability import args_for, losses, summary_of, train

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "examples" / "tiny" / "train.jsonl"
# Six steps, a checkpoint every two: a run "killed" after step 4 has checkpoint-2 and -4.
SHORT = ["--set", "training.max_steps=6", "--set", "training.save_steps=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    lines = TINY_DATA.read_text(encoding="utf-8").splitlines()[:12]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One uninterrupted run that every resumed run must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert train(args_for(data, out, *SHORT)) == 0
    return out


def killed_after_step_4(reference: Path, out: Path, manifests: bool = True) -> Path:
    """The reference run's folder as a kill after checkpoint-4 would leave it."""
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoint-6")
    for name in ("adapter_model.safetensors", "run_summary.json"):
        (out / name).unlink()
    if not manifests:  # as saved before manifests existed
        for manifest in out.glob("checkpoint-*/" + C.MANIFEST):
            manifest.unlink()
    return out


def squeezed(text: str) -> str:
    """Without whitespace: rich wraps long lines, and paths, anywhere."""
    return "".join(text.split())


def assert_same_as(reference: Path, out: Path) -> None:
    assert summary_of(out)["steps"] == 6
    want, got = load_file(str(reference / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert losses(out / "checkpoint-6") == losses(reference / "checkpoint-6")


# ------------------------------------------------------------- the damages ---

def edit_torch(file: Path, change) -> None:
    torch.save(change(torch.load(file, weights_only=True)), file)


def edit_state(path: Path, **changes) -> None:
    file = path / "trainer_state.json"
    state = json.loads(file.read_text())
    state.update(changes)
    file.write_text(json.dumps(state))


def edit_adapter(path: Path, change) -> None:
    file = path / "adapter_model.safetensors"
    save_file(change(load_file(str(file))), str(file), metadata={"format": "pt"})


def first_key(tensors: dict) -> str:
    return sorted(tensors)[0]


def rename_in_header(path: Path) -> None:
    file = path / "adapter_model.safetensors"
    raw = bytearray(file.read_bytes())
    at = raw.find(b"lora_A")
    raw[at:at + 6] = b"lora_X"  # same length: the file stays well-formed
    file.write_bytes(bytes(raw))


def flip_a_tensor_byte(path: Path) -> None:
    file = path / "adapter_model.safetensors"
    raw = bytearray(file.read_bytes())
    (header,) = struct.unpack("<Q", raw[:8])
    raw[8 + header + 4 * 37 + 3] ^= 0x7F  # the exponent byte of one float: a huge value, still finite
    file.write_bytes(bytes(raw))


DAMAGES = {
    "empty RNG state": (lambda p: torch.save({}, p / "rng_state.pth"), "rng_state.pth has no cpu, numpy, python state"),
    "empty optimizer state": (lambda p: torch.save({}, p / "optimizer.pt"), "optimizer.pt is not an optimizer state"),
    "no optimizer groups": (lambda p: edit_torch(p / "optimizer.pt", lambda s: {**s, "param_groups": []}),
                            "optimizer.pt has no parameter groups"),
    "empty scheduler state": (lambda p: torch.save({}, p / "scheduler.pt"), "scheduler.pt is not a scheduler state"),
    "unknown trainer_state key": (lambda p: edit_state(p, bogus=1), "trainer_state.json has keys a TrainerState does not: bogus"),
    "string global_step": (lambda p: edit_state(p, global_step="4"), "`global_step` = \"4\", not of type int"),
    "global_step 99": (lambda p: edit_state(p, global_step=99), "says step 99 but the folder is checkpoint-4"),
    "adapter tensor of another shape": (lambda p: edit_adapter(p, lambda t: {**t, first_key(t): torch.zeros(3, 5)}),
                                        "does not fit this model's adapter"),
    "renamed header key": (rename_in_header, "does not fit this model's adapter"),
    "adapter tensor deleted": (lambda p: edit_adapter(p, lambda t: {k: v for k, v in t.items() if k != first_key(t)}),
                               "does not fit this model's adapter (1 tensors missing"),
    "empty adapter": (lambda p: save_file({}, str(p / "adapter_model.safetensors")), "does not fit this model's adapter"),
    "bit flip in the adapter": (flip_a_tensor_byte, None),  # only a manifest can see it
}


def end_to_end(kinds, in_default_suite):
    """Each kind resumes a real run (a few seconds each): the default suite keeps one per
    mechanism, `-m slow` runs them all."""
    return [pytest.param(k, marks=() if k in in_default_suite else pytest.mark.slow) for k in kinds]


@pytest.mark.parametrize("kind", end_to_end(sorted(DAMAGES), {"bit flip in the adapter", "global_step 99"}))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_if_never_stopped(kind, reference, data, tmp_path,
                                                                                      capsys):
    out = killed_after_step_4(reference, tmp_path / "out")
    DAMAGES[kind][0](out / "checkpoint-4")
    capsys.readouterr()
    assert train(args_for(data, out, *SHORT, "--resume")) == 0   # no traceback: it returned
    printed = squeezed(capsys.readouterr().out)
    assert squeezed("--resume: skipping checkpoint-4:") in printed
    assert squeezed(f"resuming from {out / 'checkpoint-2'}") in printed
    assert_same_as(reference, out)


@pytest.mark.parametrize("kind", end_to_end(["adapter tensor of another shape", "renamed header key",
                                              "adapter tensor deleted", "empty adapter"], {"adapter tensor deleted"}))
def test_without_manifests_the_structure_and_the_model_catch_it(kind, reference, data, tmp_path, capsys):
    """Checkpoints saved before manifests: what needs the model is checked once it exists."""
    out = killed_after_step_4(reference, tmp_path / "out", manifests=False)
    damage, why = DAMAGES[kind]
    damage(out / "checkpoint-4")
    capsys.readouterr()
    assert train(args_for(data, out, *SHORT, "--resume")) == 0
    printed = squeezed(capsys.readouterr().out)
    assert squeezed("--resume: skipping checkpoint-4:") in printed and squeezed(why) in printed
    assert squeezed(f"resuming from {out / 'checkpoint-2'}") in printed
    assert squeezed("checkpoint-2 has no manifest (saved by an older version)") in printed
    assert_same_as(reference, out)


@pytest.mark.parametrize("kind", [k for k, (_, why) in sorted(DAMAGES.items()) if why and "adapter" not in why])
def test_structure_checks_name_the_damage_before_any_model_exists(kind, reference, tmp_path):
    out = killed_after_step_4(reference, tmp_path / "out", manifests=False)
    damage, why = DAMAGES[kind]
    assert C.verify_checkpoint(out / "checkpoint-4") is None
    damage(out / "checkpoint-4")
    problem = C.verify_checkpoint(out / "checkpoint-4")
    assert problem is not None and why in problem, problem


def test_the_manifest_finds_a_flipped_bit_in_any_file(reference, tmp_path):
    out = killed_after_step_4(reference, tmp_path / "out")
    checkpoint = out / "checkpoint-4"
    listed = json.loads((checkpoint / C.MANIFEST).read_text())["files"]
    on_disk = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.name != C.MANIFEST)
    assert sorted(listed) == on_disk and set(C.STATE_FILES) <= set(listed)
    for name in on_disk:
        copy = tmp_path / f"copy-{name}" / "checkpoint-4"
        shutil.copytree(checkpoint, copy)
        raw = bytearray((copy / name).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(raw))
        problem = C.verify_checkpoint(copy)
        assert problem is not None and problem.startswith(name), (name, problem)


def test_the_manifest_records_the_adapter_and_the_step(reference):
    record = json.loads((reference / "checkpoint-4" / C.MANIFEST).read_text())
    assert record["step"] == 4 and record["format"] == C.MANIFEST_FORMAT
    saved = load_file(str(reference / "checkpoint-4" / "adapter_model.safetensors"))
    assert record["adapter"]["file"] == "adapter_model.safetensors"
    assert {k: tuple(v["shape"]) for k, v in record["adapter"]["tensors"].items()} == {k: tuple(t.shape) for k, t in saved.items()}
    assert {v["dtype"] for v in record["adapter"]["tensors"].values()} == {"F32"}


def test_a_damaged_manifest_is_itself_a_reason(reference, tmp_path):
    out = killed_after_step_4(reference, tmp_path / "out")
    manifest = out / "checkpoint-4" / C.MANIFEST
    manifest.write_text(manifest.read_text()[:-10])
    assert C.verify_checkpoint(out / "checkpoint-4").startswith("manifest.json does not parse")
    manifest.write_text(json.dumps({"format": 1, "step": 4, "files": {}}))
    assert C.verify_checkpoint(out / "checkpoint-4") == "manifest.json does not list trainer_state.json"


def test_a_step_past_this_runs_end_and_a_foreign_optimizer_are_refused(reference):
    checkpoint = reference / "checkpoint-4"
    assert C.verify_checkpoint(checkpoint, C.Expected(max_steps=4)) is None
    assert C.verify_checkpoint(checkpoint, C.Expected(max_steps=3)) == "its step 4 is past this run's last step (3)"
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    shapes = [tuple(saved[k].shape) for k in sorted(saved)]
    problem = C.verify_checkpoint(checkpoint, C.Expected(optimizer_groups=[shapes[:-1], []]))
    assert problem.startswith("optimizer.pt has [") and "parameters per group; this model's optimizer has [" in problem


def test_no_checkpoint_verifies_so_it_starts_from_step_0(reference, data, tmp_path, capsys):
    out = killed_after_step_4(reference, tmp_path / "out")
    for step in (2, 4):
        torch.save({}, out / f"checkpoint-{step}" / "rng_state.pth")
    capsys.readouterr()
    assert train(args_for(data, out, *SHORT, "--resume")) == 0
    printed = squeezed(capsys.readouterr().out)
    assert "skippingcheckpoint-4" in printed and "skippingcheckpoint-2" in printed
    assert "nocompletecheckpoint" in printed and "startingfromstep0" in printed
    assert_same_as(reference, out)


def test_a_named_damaged_checkpoint_is_an_error(reference, data, tmp_path):
    out = killed_after_step_4(reference, tmp_path / "out")
    torch.save({}, out / "checkpoint-4" / "scheduler.pt")
    with pytest.raises(AutotuneError) as caught:
        train(args_for(data, out, *SHORT, "--resume", str(out / "checkpoint-4")))
    message = caught.value.one_line()
    assert "is not a complete checkpoint (scheduler.pt" in message and caught.value.exit_code == 2


def test_a_named_checkpoint_that_does_not_fit_the_model_is_an_error_without_fallback(reference, tmp_path):
    """`resume_fallback = False` (a checkpoint the user named): the model's check raises, one line."""
    from types import SimpleNamespace

    from autotune.training.trainer import LlasaTrainer

    out = killed_after_step_4(reference, tmp_path / "out", manifests=False)
    edit_adapter(out / "checkpoint-4", lambda t: {k: v for k, v in t.items() if k != first_key(t)})
    saved = load_file(str(reference / "checkpoint-4" / "adapter_model.safetensors"))
    expected = C.Expected(adapter={k: tuple(t.shape) for k, t in saved.items()})
    fake = SimpleNamespace(checkpoint_expectations=lambda: expected, resume_fallback=False, console=None,
                           args=SimpleNamespace(output_dir=str(out)))
    with pytest.raises(AutotuneError, match="cannot resume from .*checkpoint-4.*1 tensors missing"):
        LlasaTrainer.verified_resume(fake, str(out / "checkpoint-4"))
    fake.resume_fallback = True
    fake._note_unmanifested = lambda path: None
    assert LlasaTrainer.verified_resume(fake, str(out / "checkpoint-4")) == str(out / "checkpoint-2")


# ------------------------------------------------------------- best model ---

@pytest.fixture(scope="module")
def data_with_validation(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data-val")
    lines = TINY_DATA.read_text(encoding="utf-8").splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    (folder / "val.jsonl").write_text("\n".join(lines[12:14]) + "\n", encoding="utf-8")
    return folder


# The best checkpoint is the first evaluation's (the metric is "greater is better" on a falling loss).
BEST_FIRST = [*SHORT, "--set", "training.eval_strategy=steps", "--set", "training.eval_steps=2",
              "--set", "training.load_best_model_at_end=true", "--set", "training.greater_is_better=true"]


@pytest.mark.slow
def test_a_verified_best_checkpoint_is_loaded_at_the_end(data_with_validation, tmp_path):
    out = tmp_path / "out"
    assert train(args_for(data_with_validation, out, *BEST_FIRST)) == 0
    best = Path(summary_of(out)["best_checkpoint"])
    assert best.name == "checkpoint-2"
    final, kept = load_file(str(out / "adapter_model.safetensors")), load_file(str(best / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], kept[k]) for k in kept)


def test_a_damaged_best_checkpoint_is_not_loaded(data_with_validation, tmp_path, monkeypatch, capsys):
    """Damaged after it was saved (here right after the run's last save): found before loading."""
    from transformers import TrainerCallback

    from autotune.training import trainer as T

    class DamageBestAtTheEnd(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                torch.save({}, Path(state.best_model_checkpoint) / "optimizer.pt")

    real = T.build_trainer

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(DamageBestAtTheEnd())   # after the publisher: the checkpoints are in place
        return trainer

    monkeypatch.setattr(T, "build_trainer", build)
    out = tmp_path / "out"
    capsys.readouterr()
    assert train(args_for(data_with_validation, out, *BEST_FIRST)) == 0
    printed = squeezed(capsys.readouterr().out)
    assert squeezed("! not loading the best checkpoint checkpoint-2: optimizer.pt has") in printed
    assert squeezed("keeping the final weights") in printed
    final, last = load_file(str(out / "adapter_model.safetensors")), load_file(str(out / "checkpoint-6" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in last)
    summary = summary_of(out)
    assert summary["best_checkpoint"] is None and summary["best_checkpoint_refused"].startswith("checkpoint-2: ")


def test_a_non_finite_evaluation_is_never_the_best_and_every_checkpoint_verifies(data_with_validation, tmp_path,
                                                                                 monkeypatch):
    """The first evaluation NaN (no best yet), the second -inf (which a lower-is-better comparison
    would take), the third finite: only the third is the best, and the checkpoints saved before
    it record no best metric rather than an infinity (which `--resume` would take for damage)."""
    from autotune.training import trainer as T

    real = T.LlasaTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = real(self, model, inputs, return_outputs, num_items_in_batch)
        bad = {2: float("nan"), 4: float("-inf")}.get(self.state.global_step)
        if model.training or bad is None:
            return out
        loss, outputs = out if return_outputs else (out, None)
        loss = loss * 0 + bad
        return (loss, outputs) if return_outputs else loss

    monkeypatch.setattr(T.LlasaTrainer, "compute_loss", compute_loss)
    out = tmp_path / "out"
    assert train(args_for(data_with_validation, out, *SHORT, "--set", "training.eval_strategy=steps",
                          "--set", "training.eval_steps=2", "--set", "training.load_best_model_at_end=true")) == 0
    assert Path(summary_of(out)["best_checkpoint"]).name == "checkpoint-6"
    for step, best in ((2, None), (4, None)):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["best_metric"] is best and C.verify_checkpoint(out / f"checkpoint-{step}") is None
