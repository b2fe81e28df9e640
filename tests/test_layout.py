"""The package's shape: every module in a layer, no module importing one above it, no cycles.
Imports inside functions count too. (Length is no rule: a module that is one idea may be long;
`../shared/tools/layout_check.py` names long modules as places to look for a seam.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autotune"

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS: list[set[str]] = [
    # facts, errors, printing, files
    {"errors", "console", "signals", "rundir", "llasa", "loading", "compat", "dotted", "textnorm", "files", "resume_rules",
     "memory", "batching", "webui_text"},
    # the probe's path (no torch): hardware, profiles, config, the command line
    {"hardware", "config_yaml", "config", "plan", "profiles", "cli", "request", "probe_report", "diagnosis",
     "distributed"},
    # reading files and audio, the run folders a user has, counting what a step launches
    {"reading", "audio", "replica", "runs", "launches"},
    # corpora, the codec, the model, the loss, batches
    {"layouts", "corpora", "codec", "xcodec2_convert", "codec_cache", "model", "loss", "batches", "adapters"},
    # the data set, speech, checkpoints, the plan and its ladder, what a run reports
    {"data", "generation", "checkpoint_checks", "checkpoints", "tuning.plan", "tuning.ladder", "model_card",
     "report", "scores", "scorers_tiny", "describe", "metrics", "tables", "voice", "speech_api", "webui"},
    # training
    {"training.callbacks", "training.trainer", "training.samples", "training.scoring", "training.outputs",
     "training.recovery"},
    # the dry run measures with the training's trainer
    {"tuning.dryrun"},
    # the driver
    {"resuming", "run_summary", "pipeline"},
    # sweeps run the driver per trial
    {"sweep.grid", "sweep.children", "sweep.sharing", "sweep.pool", "sweep.local"},
    # the command lines
    {"commands.train", "commands.probe", "commands.synthesize", "commands.serve", "commands.app"},
]
# Packages whose __init__ only names them; `profiles` is a package for its YAML files, and a module.
PACKAGES = {"", "training", "tuning", "sweep", "commands"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every `autotune.x` a module imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autotune"):
            if node.module == "autotune":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.removeprefix("autotune."))
                # `from autotune.training import trainer` imports a module too
                found |= {f"{node.module.removeprefix('autotune.')}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("autotune.") for a in node.names if a.name.startswith("autotune.")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(modules)
    return {name: {m for m in imports_of(path) if m in known and m != name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    layered = set().union(*LAYERS)
    modules = set(graph()) - PACKAGES
    assert modules - layered == set(), "place these modules in LAYERS"
    assert layered - modules == set(), "these modules are gone: take them out of LAYERS"


def test_no_module_imports_one_above_it():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = [f"{a} (layer {layer[a]}) imports {b} (layer {layer[b]})"
              for a, targets in graph().items() if a in layer for b in targets
              if b in layer and layer[b] > layer[a]]
    assert upward == []


def test_there_are_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from autotune.pipeline import run\n    from autotune import rundir\n")
    assert imports_of(sample) >= {"pipeline", "rundir"}


def test_probe_path_imports_no_torch():
    """probe.py's modules (layers 0 and 1) never import torch or transformers at module level."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name in LAYERS[0] | LAYERS[1] | {"commands.probe"}:
        tree = ast.parse(files[name].read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        heavy = [ast.unparse(n) for n in top
                 if any(m.split(".")[0] in ("torch", "transformers", "peft") for m in
                        ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]))]
        assert heavy == [], name
