"""dvc.yaml and the code must name the same files and the same params."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from pipeline.config import Params, to_flat_dict
from pipeline.paths import Paths

from conftest import REPO

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
    assert declared_files(s["fetch"], "outs") == {PATHS.raw, PATHS.raw_external}
    assert declared_files(s["preprocess"], "outs") == {PATHS.shards}
    for strategy in ("dp", "ddp"):
        assert declared_files(s[f"train@{strategy}"], "outs") == {PATHS.model_dir(strategy)}
        assert declared_files(s[f"train@{strategy}"], "metrics") == {PATHS.train_metrics(strategy)}
        assert declared_files(s[f"train@{strategy}"], "plots") == {PATHS.train_curve(strategy)}
        assert declared_files(s[f"evaluate@{strategy}"], "metrics") == {PATHS.eval_metrics(strategy)}
        assert declared_files(s[f"evaluate@{strategy}"], "plots") == {
            PATHS.eval_predictions(strategy),
            PATHS.eval_confusion_png(strategy),
            PATHS.external_predictions(strategy),
            PATHS.external_confusion_png(strategy),
        }
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
            assert (REPO / dep).exists() or dep.startswith(("data/", "models/", "metrics/")), (
                f"{name}: {dep} does not exist"
            )


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
    f"pipeline/{name}.py"
    for name in (
        "__init__", "errors", "paths", "config", "tracking", "abandoned_runs", "cli", "fileio", "devices",
        "workers",
    )
}  # fmt: skip


def _module_file(name: str) -> str | None:
    """`pipeline.a.b` -> `pipeline/a/b.py`, or the package's `__init__.py`; None outside pipeline/."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    path = name.replace(".", "/")
    for candidate in (f"{path}.py", f"{path}/__init__.py"):
        if (REPO / candidate).is_file():
            return candidate
    return None


def imported_modules(module: str, seen: set[str] | None = None, through_plumbing: bool = True) -> set[str]:
    """`pipeline/` files that `module` imports, directly or through each other (lazy imports too),
    with the `__init__.py` of every package on the way; not through PLUMBING unless asked."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse((REPO / module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                path = _module_file(".".join(parts[:depth]))
                if path is not None and path not in seen:
                    seen.add(path)
                    if through_plumbing or path not in PLUMBING:
                        imported_modules(path, seen, through_plumbing)
    return seen


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_every_stage_depends_on_the_code_it_runs():
    for name, stage in stages().items():
        module = f"pipeline/{name.split('@')[0]}.py"
        needed = (imported_modules(module, through_plumbing=False) | {module}) - PLUMBING
        missing = sorted(path for path in needed if not _covered(path, stage["deps"]))
        assert not missing, f"{name}: add {missing} to its deps in dvc.yaml"


STAGE_MODULES = {
    f"pipeline/{name}.py"
    for name in (
        "fetch", "sources", "synthetic", "preprocess", "split", "shards", "workers",
        "train", "trainer", "batches", "feed", "prefetch", "streaming", "loop", "strategy", "checkpoint",
        "evaluate", "promote", "scaling", "augment", "lineage", "champion", "gate", "aliases",
    )
}  # fmt: skip


def test_serving_code_imports_no_stage_module():
    for module in (
        "pipeline/predict.py",
        "pipeline/webapp.py",
        *sorted(str(p.relative_to(REPO)) for p in PATHS.root.glob("pipeline/serving/*.py")),
    ):
        reached = imported_modules(module) & STAGE_MODULES
        assert not reached, f"{module} imports the stage modules {sorted(reached)}"


def test_the_logged_model_code_needs_only_itself_and_errors():
    """The logged model ships pipeline/__init__.py, errors.py and serving/: nothing else may be imported."""
    for path in (REPO / "pipeline" / "serving").glob("*.py"):
        reached = imported_modules(str(path.relative_to(REPO)))
        outside = {m for m in reached if not m.startswith("pipeline/serving/")} - {
            "pipeline/__init__.py",
            "pipeline/errors.py",
        }
        assert not outside, f"{path.name} imports {sorted(outside)}, which the logged model does not ship"
