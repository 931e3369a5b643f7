"""The stages' cache policy (`ppoflow.tasks.common.IntactManifests`) over a stand-in result store: a stale
record sends the key on, deterministically, and the walk hashes each file once however long the chain."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prefect.cache_policies import INPUTS

from ppoflow import hashing
from ppoflow.hashing import sha256_file
from ppoflow.manifests import Manifest
from ppoflow.tasks.common import IntactManifests


class PartitionSeen(Manifest):
    """A manifest of one night: intact while the partition file still has the digest it read."""

    path: Path
    sha256: str

    def is_intact(self) -> bool:
        return sha256_file(self.path) == self.sha256


class Store:
    def __init__(self):
        self.records: dict[str, object] = {}

    def exists(self, key: str) -> bool:
        return key in self.records

    def read(self, key: str) -> SimpleNamespace:
        return SimpleNamespace(result=self.records[key])


def test_a_chain_of_stale_nights_is_walked_to_the_fresh_key_hashing_the_file_once(tmp_path, monkeypatch):
    partition = tmp_path / "prompts.jsonl"
    store, policy = Store(), IntactManifests(base=INPUTS)
    task_ctx = SimpleNamespace(result_store=store, task=SimpleNamespace(name="prepare_dataset"))
    inputs = {"plan": "the same config every night"}
    for night in range(5):  # five nights, each on a partition edited since: every record is stale now
        partition.write_text(f"night {night}\n")
        key = policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters={})
        assert key not in store.records
        store.records[key] = PartitionSeen(path=partition, sha256=sha256_file(partition))
    assert len(set(store.records)) == 5
    assert policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters={}) == key  # the newest night: a hit

    opened: list[str] = []
    real_open = open
    monkeypatch.setattr(
        hashing, "open", lambda path, *args: opened.append(str(path)) or real_open(path, *args), raising=False
    )
    partition.write_text("night 5\n")
    fresh = policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters={})
    assert fresh not in store.records and opened == [str(partition)]  # five stale records, one read of the file


def test_an_unreadable_record_is_never_a_hit():
    store, policy = Store(), IntactManifests(base=INPUTS)
    task_ctx = SimpleNamespace(result_store=store, task=SimpleNamespace(name="load_models"))
    inputs = {"plan": "p"}
    key = policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters={})
    # the same inputs, the same key
    assert policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters={}) == key
    store.records[key] = None
    store.read = lambda key: (_ for _ in ()).throw(ValueError("written by another serializer"))
    assert policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters={}) not in (key, None)
