"""Each stage reads exactly the params its dvc.yaml entry declares (docs/architecture.md, rules of the
house): a key a stage reads and does not declare is a dependency DVC never sees (changing it would not
re-run the stage); a key it declares and never reads re-runs it for nothing.

What a stage reads is recorded, not guessed from its source. Every stage of the table (pipeline/stages.py, from
which dvc.yaml is generated) runs for real, as dvc.yaml runs it (``graftline <stage>`` through
pipeline.cli.main in this process, so the adapter's own reads count: seeds, devices), in the table's order, on
a small project: 3 classes x 12 shared flower photos packed as an archive and served over loopback, so that
download fetches it; MobileNetV2 alpha 0.35 at 96 px with the shared weights; a few epochs; no TFLite. The
Params the command loads comes back wrapped (``recorded``): each field read is logged by its dotted key
(params.fine_tune.epochs -> "fine_tune.epochs"), and a section handed to a library function records the fields
that function reads.

Declared sections are checked field by field (dvc.yaml's ``- data`` makes every data.* key a dependency).
A field that a stage reads only on another branch is read by the second configuration below, or listed in
ONLY_ON_ANOTHER_BRANCH with the reason; a declared field that no run reads and no entry explains fails.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from conftest import FLOWERS, REPO, SHARED, require_shared
from drawing import make_tar, tree_members
from pipeline import params as params_mod
from pipeline import stages

pytestmark = pytest.mark.e2e

WEIGHTS_035 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
CLASSES = ("daisy", "roses", "tulips")
PER_CLASS = 12
EVERYTHING = "params.yaml:"  # a dvc.yaml params entry naming the whole file (evaluate's)

# (stage, key) -> why no run below reads a key the stage declares. Each entry must name a declared key that
# really goes unread here (test_the_branch_list_is_current), so a key that is never read anywhere still fails.
ONLY_ON_ANOTHER_BRANCH: dict[tuple[str, str], str] = {
    ("bottleneck", "bottleneck.dask_address"):
        "read only with bottleneck.runner: dask (an existing scheduler; tests/test_bottleneck_dask.py runs it)",
}


# ------------------------------------------------------------------ the recorder


def leaf_keys(obj=None, prefix: str = "") -> set[str]:
    """Every param's dotted key (evaluate.thresholds is one: a mapping is a value)."""
    obj = params_mod.Params() if obj is None else obj
    keys = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        keys |= leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
    return keys


LEAVES = leaf_keys()
RECORDED_TYPES: dict[type, type] = {}


def recorded(section, prefix: str, reads: dict[str, set[str]]):
    """``section`` (Params or one of its sections) as an instance of a subclass that records in ``reads`` the
    dotted key of each field read ("read"); a section field comes back recorded in turn.

    A subclass, so that stage code sees the class it knows (isinstance, dataclasses.fields, and ingest's
    ``type(data)()`` for the defaults). Special cases, each on purpose:
    - ``type(section)(...)`` makes a plain section: its defaults are not a read of params;
    - dataclasses.replace and dataclasses.asdict read every field through getattr, so every field is recorded
      (its value is copied somewhere; the copy itself is plain, which loses nothing: all was recorded);
    - Params.to_dict() returns a RecordedDict: what is taken out of it is recorded ("to_dict");
    - repr shows the values without recording them.
    """
    cls = type(section)
    if cls not in RECORDED_TYPES:
        fields = frozenset(f.name for f in dataclasses.fields(cls))

        def __getattribute__(self, name):
            value = object.__getattribute__(self, name)
            original, prefix, reads = object.__getattribute__(self, "__dict__")["_recorder"]
            if name in fields:
                if dataclasses.is_dataclass(value):
                    return recorded(value, f"{prefix}{name}.", reads)
                reads.setdefault(f"{prefix}{name}", set()).add("read")
            elif name == "to_dict":
                return lambda: RecordedDict(original.to_dict(), prefix, reads)
            return value

        RECORDED_TYPES[cls] = type(f"Recorded{cls.__name__}", (cls,), {
            "__new__": lambda kind, *args, **kwargs: cls(*args, **kwargs),
            "__getattribute__": __getattribute__,
            "__repr__": lambda self: f"recorded({object.__getattribute__(self, '__dict__')['_recorder'][0]!r})",
        })
    instance = object.__new__(RECORDED_TYPES[cls])
    object.__getattribute__(instance, "__dict__").update(section.__dict__, _recorder=(section, prefix, reads))
    return instance


class RecordedDict(dict):
    """Params.to_dict() of recorded params (fine_tune's resume fingerprint hashes sections of it): a value taken
    out (by key, get, items, values, copy, or dict(...) and {**...}, which go through keys and __getitem__ once
    __iter__ is overridden) records every leaf under it, marked "to_dict"."""

    def __init__(self, plain: dict, prefix: str, reads: dict[str, set[str]]):
        super().__init__(plain)
        self._prefix, self._reads = prefix, reads

    def _record(self, key: str, value) -> None:
        if key in LEAVES or not isinstance(value, dict):
            self._reads.setdefault(key, set()).add("to_dict")
        else:
            for sub, inner in value.items():
                self._record(f"{key}.{sub}", inner)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self._record(f"{self._prefix}{key}", value)
        return value

    def __iter__(self):
        return iter(list(super().keys()))

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return [(k, self[k]) for k in super().keys()]

    def values(self):
        return [self[k] for k in super().keys()]

    def copy(self):
        return dict(self.items())


# ------------------------------------------------------------------ declarations


def covered(key: str, declared: tuple[str, ...]) -> bool:
    """Whether a dvc.yaml params list covers ``key``: the key itself, a section above it, or all of params.yaml."""
    return any(d == EVERYTHING or key == d or key.startswith(d + ".") for d in declared)


# ------------------------------------------------------------------ the runs


def photo_archive(served: Path, name: str, conflict: bool = False) -> Path:
    """PER_CLASS shared photos of each class as served/<name> (photos/<class>/<file>); ``conflict``: one daisy
    photo also under roses (the same bytes under two classes: a label conflict)."""
    members = {}
    for cls in CLASSES:
        for path in sorted((FLOWERS / cls).glob("*.jpg"))[:PER_CLASS]:
            members[f"photos/{cls}/{path.name}"] = path.read_bytes()
    if conflict:
        first = sorted((FLOWERS / CLASSES[0]).glob("*.jpg"))[0]
        members[f"photos/{CLASSES[1]}/{first.name}"] = first.read_bytes()
    served.mkdir(exist_ok=True)
    return make_tar(served / name, members)


def write_project(root: Path, url: str, sha256: str) -> None:
    """The repo's params.yaml made small, data.source downloaded from ``url``; the repo's data/exclude.txt."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in {
        "data": {"source": "data/download/photos.tgz", "url": url, "sha256": sha256, "val_percent": 25,
                 "test_percent": 25},
        "base": {"model": "mobilenet_v2", "alpha": 0.35, "image_size": 96, "weights": str(WEIGHTS_035)},
        "train_head": {"epochs": 8},
        "fine_tune": {"epochs": 2},
        "export": {"tflite": []},
        "audit": {"folds": 3},
    }.items():
        params[section].update(values)
    params["fine_tune_at"] = 100  # one base, fine-tuned: fine-tune reads everything it declares
    (root / "data").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / params_mod.DataParams().exclude, root / params_mod.DataParams().exclude)


def record_stages(root: Path, names: list[str], monkeypatch) -> dict[str, dict[str, set[str]]]:
    """Run ``graftline <name>`` for each stage name, in ``root``; the params keys each one read, and how."""
    from pipeline import cli

    reads, current = {}, {}
    load = params_mod.load
    monkeypatch.setattr(params_mod, "load", lambda path="params.yaml": recorded(load(path), "", current))
    monkeypatch.chdir(root)
    for name in names:
        current.clear()
        code = cli.main([name])
        assert code == 0, f"graftline {name} exited {code} in {root} (its error is printed above)"
        reads[name] = {key: set(how) for key, how in current.items()}
    return reads


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, dict[str, set[str]]]]:
    """{configuration: {stage: {key read: how}}}."""
    require_shared()
    from loopback import serve

    base = tmp_path_factory.mktemp("params-declared")
    archives = {"default": photo_archive(base / "served", "photos.tgz"),
                "conflict": photo_archive(base / "served", "conflict.tgz", conflict=True)}
    server = serve(base / "served")
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    sigterm = signal.getsignal(signal.SIGTERM)  # cli.main installs its own
    results = {}
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
                monkeypatch.delenv(var, raising=False)
            monkeypatch.setenv("KERAS_HOME", str(base / "keras"))
            for config, archive in archives.items():
                write_project(base / config, url + archive.name, hashlib.sha256(archive.read_bytes()).hexdigest())
            # Every stage, in the table's order (download fetches the archive).
            results["default"] = record_stages(base / "default", list(stages.STAGES), monkeypatch)
            # A bare `graftline ingest` (TFX too) downloads data.source itself when it is not there yet (data.url);
            # a photo under two classes reads data.label_conflicts.
            results["ingest without download, a label conflict"] = record_stages(base / "conflict", ["ingest"],
                                                                                monkeypatch)
    finally:
        server.shutdown()
        signal.signal(signal.SIGTERM, sigterm)
    for config, run in results.items():  # shown when a check fails
        for name, found in run.items():
            print(f"{config}: {name} read {json.dumps({k: sorted(v) for k, v in sorted(found.items())})}")
    return results


def reads_of(runs: dict, stage: str, counted=("read", "to_dict")) -> set[str]:
    return {key for run in runs.values() for key, how in run.get(stage, {}).items() if how & set(counted)}


def unread_declared(runs: dict) -> dict[tuple[str, str], str]:
    """(stage, key) -> the declared entry, for every declared leaf that no run read (in a computation: a value
    that only goes into fine_tune's resume fingerprint does not count). "params.yaml:" (evaluate: every command
    validates all of params.yaml first) needs one read, not all."""
    found = {}
    for name, stage in stages.STAGES.items():
        read = reads_of(runs, name, counted=("read",))
        for entry in stage.params:
            under = [k for k in LEAVES if covered(k, (entry,))]
            if entry == EVERYTHING:
                if not read:
                    found[(name, entry)] = entry
                continue
            found.update({(name, key): entry for key in under if key not in read})
    return found


# ------------------------------------------------------------------ the checks


def test_every_stage_of_the_table_ran(runs):
    assert list(runs["default"]) == list(stages.STAGES)


def test_every_param_a_stage_reads_is_declared_in_its_dvc_yaml_entry(runs):
    undeclared = {name: sorted(k for k in reads_of(runs, name) if not covered(k, stage.params))
                  for name, stage in stages.STAGES.items()}
    undeclared = {name: keys for name, keys in undeclared.items() if keys}
    assert not undeclared, (
        "these stages read params that their dvc.yaml entry does not declare, so DVC would not re-run them when "
        f"one changes; declare them in pipeline/stages.py (or stop reading them): {undeclared}")


def test_every_declared_param_is_read(runs):
    unread = {}
    for (name, key), entry in sorted(unread_declared(runs).items()):
        if (name, key) not in ONLY_ON_ANOTHER_BRANCH:
            unread.setdefault(name, []).append(key if key == entry else f"{key} (declared as {entry})")
    assert not unread, (
        "declared in dvc.yaml but never read by the stage, so a change re-runs it for nothing: drop the key from "
        "pipeline/stages.py, or, when another branch reads it, run that branch here or list it in "
        f"ONLY_ON_ANOTHER_BRANCH with the reason: {unread}")


def test_the_branch_list_is_current(runs):
    unread = unread_declared(runs)
    stale = {entry: reason for entry, reason in ONLY_ON_ANOTHER_BRANCH.items() if entry not in unread}
    assert not stale, f"ONLY_ON_ANOTHER_BRANCH lists keys that are read here or not declared (remove them): {stale}"
