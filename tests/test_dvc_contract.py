"""dvc.yaml and the code must name the same files and the same params."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from conftest import REPO
from pipeline.config import Params, to_flat_dict
from pipeline.paths import Paths

PATHS = Paths(REPO)


def stages() -> dict[str, dict]:
    """dvc.yaml's stages with `foreach` expanded, keyed like DVC names them (`train@dp`)."""
    expanded = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage:
            expanded[name] = stage
            continue
        for item in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${item}", item)
            expanded[f"{name}@{item}"] = yaml.safe_load(text)
    return expanded


def declared_files(stage: dict, key: str) -> set[Path]:
    files = set()
    for entry in stage.get(key, []):
        files.add(REPO / (entry if isinstance(entry, str) else next(iter(entry))))
    return files


def test_stage_outputs_are_the_paths_the_code_writes():
    s = stages()
    assert declared_files(s["fetch"], "outs") == {PATHS.raw}
    assert declared_files(s["preprocess"], "outs") == {PATHS.shards}
    for strategy in ("dp", "ddp"):
        assert declared_files(s[f"train@{strategy}"], "outs") == {PATHS.model_dir(strategy)}
        assert declared_files(s[f"train@{strategy}"], "metrics") == {PATHS.train_metrics(strategy)}
        assert declared_files(s[f"train@{strategy}"], "plots") == {PATHS.train_curve(strategy)}
        assert declared_files(s[f"evaluate@{strategy}"], "metrics") == {PATHS.eval_metrics(strategy)}
        assert declared_files(s[f"evaluate@{strategy}"], "plots") == {PATHS.eval_predictions(strategy), PATHS.eval_confusion_png(strategy)}
    assert declared_files(s["promote"], "outs") == {PATHS.promotion}
    assert declared_files(s["promote"], "metrics") == {PATHS.promote_metrics}


def test_every_declared_param_exists():
    known = set(to_flat_dict(Params()))
    for name, stage in stages().items():
        for key in stage.get("params", []):
            assert key in known or any(k.startswith(key + ".") for k in known), f"{name}: unknown param {key}"


def test_every_stage_depends_on_its_own_module():
    for name, stage in stages().items():
        module = f"pipeline/{name.split('@')[0]}.py"
        assert module in stage["deps"], f"{name} must rerun when {module} changes"
        assert stage["cmd"].startswith(f"python -m pipeline {name.split('@')[0]}")
        for dep in stage["deps"]:
            assert (REPO / dep).exists() or dep.startswith(("data/", "models/", "metrics/")), f"{name}: {dep} does not exist"


def test_shipped_params_file_holds_every_declared_param():
    """DVC refuses to run a stage whose declared params are missing from params.yaml."""
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in stages().items():
        for key in stage.get("params", []):
            node = shipped
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params.yaml lacks {key}"
                node = node[part]


# Modules that shape no output: plumbing every stage shares. A change to them must not rerun the
# pipeline; any other pipeline module a stage imports decides what it writes.
PLUMBING = {
    "pipeline/errors.py", "pipeline/paths.py", "pipeline/config.py", "pipeline/tracking.py", "pipeline/abandoned_runs.py", "pipeline/cli.py",
    "pipeline/__init__.py",
}  # fmt: skip


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """`pipeline/*.py` files that `module` imports, directly or through each other (lazy imports too)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse((REPO / module).read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
        for name in names:
            path = name.replace(".", "/") + ".py"
            if name.startswith("pipeline.") and (REPO / path).is_file() and path not in seen:
                seen.add(path)
                imported_modules(path, seen)
    return seen


def test_every_stage_depends_on_the_code_it_runs():
    for name, stage in stages().items():
        module = f"pipeline/{name.split('@')[0]}.py"
        needed = (imported_modules(module) | {module}) - PLUMBING
        missing = needed - set(stage["deps"])
        assert not missing, f"{name}: add {sorted(missing)} to its deps in dvc.yaml"
