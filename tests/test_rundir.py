"""tljob.rundir is the one module that spells a run file's name or a status field; its records round-trip.

No TensorFlow: the scan reads the sources, and the records are plain dataclasses.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from tljob import rundir
from tljob.errors import ConfigError

SRC = Path(rundir.__file__).parent
FILE_NAMES = ("status.json", "state.json", "history.json", "params.yaml", "metrics.json", "metadata.json",
              "_SUCCESS", "curves.png", "model.keras", "evaluation.json", "confusion.png", "labels.txt",
              "README.md", "model.tflite")
# The status fields that nothing but status.json has. "phase", "epoch", "images_per_second", "num_workers" are
# also the keys of a history record (one epoch, built by the trainer's progress callback); "name", "metrics" and
# "state" are common words (a Kubernetes object's name, Keras' compile(metrics=...), a row of `tljob status`).
SHARED = {"phase", "epoch", "images_per_second", "num_workers", "name", "metrics", "state"}
STATUS_FIELDS = {f.name for f in dataclasses.fields(rundir.Status)} - SHARED


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes: prose may name a file; code may not."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spelled(source: str) -> list[str]:
    """The run-file names (inside any string literal) and status fields (as a whole literal) in `source`."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            hits += [f"line {node.lineno}: {name}" for name in FILE_NAMES if name in node.value]
            if node.value in STATUS_FIELDS:
                hits.append(f"line {node.lineno}: status field {node.value!r}")
    return hits


def test_no_module_but_rundir_spells_a_run_file_or_status_field() -> None:
    found = {p.name: spelled(p.read_text()) for p in sorted(SRC.glob("*.py")) if p.name != "rundir.py"}
    assert not {k: v for k, v in found.items() if v}, "use the names in tljob.rundir"


def test_the_scan_finds_what_the_modules_wrote_before_rundir() -> None:
    """Lines as train.py and status.py had them: the scan must catch each, and leave docstrings alone."""
    before = '''
"""Writes status.json."""
STATE = "state.json"
log.info("run %s is already finished (_SUCCESS exists): not retraining", output)
write_json(path, {"state": "running", "eta_s": round(eta, 1), "updated_at": now()})
eta = status.get("eta_s")
'''
    assert {h.split(": ", 1)[1] for h in spelled(before)} == {
        "state.json", "_SUCCESS", "status field 'eta_s'", "status field 'updated_at'"}


def test_the_scan_would_fail_on_main() -> None:
    """The modules of the commit before rundir existed spell names the scan catches."""
    repo = SRC.parent.parent
    try:
        old = subprocess.run(["git", "-C", str(repo), "show", "b8f72c6:src/tljob/status.py"], capture_output=True,
                             text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("no git history here (an installed package)")
    assert any("status.json" in h for h in spelled(old)) and any("'eta_s'" in h for h in spelled(old))


def test_status_round_trips_and_tolerates_other_versions(tmp_path: Path) -> None:
    history = [{"epoch": 1, "phase": "feature_extraction", "loss": 0.5, "accuracy": 0.7, "val_loss": 0.4,
                "val_accuracy": 0.8, "seconds": 3.0, "images_per_second": 12.3}]
    written = rundir.Status.after(history, state="running", eta_s=9.04, total_epochs=4, started_at="t0",
                                  name="cats", num_workers=2)
    files = rundir.RunFiles(tmp_path, str(tmp_path))
    files.write_status(written)
    assert rundir.read_status(str(tmp_path)) == written
    saved = json.loads((tmp_path / rundir.STATUS).read_text())
    assert list(saved) == [f.name for f in dataclasses.fields(rundir.Status)]  # the file's key order is the record's
    assert saved["metrics"] == {"loss": 0.5, "accuracy": 0.7, "val_loss": 0.4, "val_accuracy": 0.8}
    assert saved["eta_s"] == 9.0 and saved["epoch"] == 1 and saved["images_per_second"] == 12.3
    (tmp_path / rundir.STATUS).write_text(json.dumps({"state": "running", "epoch": 3, "added_later": True}))
    assert rundir.read_status(str(tmp_path)) == rundir.Status(state="running", epoch=3)
    assert rundir.read_status(str(tmp_path / "missing")) is None
    (tmp_path / rundir.STATUS).write_text("[1]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        rundir.read_status(str(tmp_path))


def test_status_of_a_run_without_epochs() -> None:
    status = rundir.Status.after([], state="succeeded", eta_s=0.0, total_epochs=0, started_at="t0", name="n",
                                 num_workers=1)
    assert (status.phase, status.epoch, status.metrics, status.eta_s) == (None, None, {}, 0.0)


def test_state_and_history_round_trip(tmp_path: Path) -> None:
    files = rundir.RunFiles(tmp_path, str(tmp_path))
    assert files.state() == rundir.State() and files.history() == []
    files.write_state(rundir.State(attempts=2, completed_phases=("feature_extraction",)))
    assert files.state() == rundir.State(2, ("feature_extraction",))
    # state.json as the trainer wrote it before it always wrote completed_phases
    (tmp_path / rundir.STATE).write_text('{"attempts": 1}')
    assert files.state() == rundir.State(attempts=1)
    files.write_history([{"epoch": 1}])
    assert files.history() == [{"epoch": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.HISTORY, rundir.STATE], "no temporary files left"


def test_finished_means_the_marker_exists(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.json").write_text("[]")
    assert not rundir.is_finished(str(tmp_path / "run"))
    listing = rundir.RunFiles(tmp_path / "run", str(tmp_path / "out")).publish()
    assert rundir.is_finished(str(tmp_path / "out")) and set(listing["files"]) == {"history.json"}
    (tmp_path / "dir" / rundir.SUCCESS).mkdir(parents=True)
    assert not rundir.is_finished(str(tmp_path / "dir")), "a folder of that name is not the marker"
