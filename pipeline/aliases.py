"""Versions of the registered model and its aliases, moved safely while other promotes run.

On the local sqlite store one promote at a time holds a file lock beside the store. A remote
tracking server offers no lock: a decision is applied only if the champion is still the one it was
made against, and checked again after the aliases moved; otherwise the promote decides again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pipeline.registry import CANDIDATE, CHAMPION

SOURCE_RUN_TAG = "source_run_id"


def version_of_run(client, name: str, run_id: str):
    """The existing version registered from `run_id` (the oldest, should there be several), or None."""
    matches = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if v.run_id == run_id or (v.tags or {}).get(SOURCE_RUN_TAG) == run_id
    ]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import unreachable

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:  # no such alias (or no such registered model yet)
        if unreachable(err):  # a server that went away is not "no champion"
            raise
        return None


def alias_number(client, name: str, alias: str) -> int | None:
    version = alias_version(client, name, alias)
    return None if version is None else int(version.version)


def register(client, name: str, model_uri: str, tags: dict[str, str]) -> tuple[Any, bool]:
    """(version, newly registered?): the training run's existing version, else a new one."""
    import mlflow

    version = version_of_run(client, name, tags[SOURCE_RUN_TAG])
    if version is None:
        version = mlflow.register_model(model_uri, name, tags=tags)
        return client.get_model_version(name, str(version.version)), True
    for key, value in tags.items():  # the candidate's figures as evaluated now
        client.set_model_version_tag(name, str(version.version), key, value)
    return client.get_model_version(name, str(version.version)), False


@contextlib.contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """One promote at a time per registered model, across processes, on the local sqlite store. A
    remote tracking server has no lock to take: `apply_aliases` re-reads the champion instead."""
    from filelock import FileLock

    from pipeline.tracking import store_dir, tracking_uri

    if not tracking_uri().startswith("sqlite:///"):
        yield
        return
    with FileLock(str(store_dir() / f".promote-{name}.lock")):
        yield


def apply_aliases(client, name: str, record: dict[str, Any], replayed: bool) -> bool:
    """Set the aliases `record` decided if the champion is still the one it was decided against, and
    check afterwards that it stayed so; False: another promote moved it meanwhile, decide again."""
    number = record["version"]
    expected = record["champion_version"] if replayed else record["previous_champion_version"]
    if alias_number(client, name, CHAMPION) != expected:
        return False
    client.set_registered_model_alias(name, CANDIDATE, str(number))
    if record["promoted"] and not replayed:
        client.set_registered_model_alias(name, CHAMPION, str(number))
    return alias_number(client, name, CHAMPION) == record["champion_version"]
