"""tljob.storage against local folders and a real gcp-storage-emulator (tests/fixtures_gcs.py).

Faults come from a real proxy in front of the emulator (tests/gcs_fault_proxy.py) or from
stopping the emulator process; nothing in tljob.storage or the GCS client is replaced.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from pathlib import Path

import google_crc32c
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs

from fixtures_gcs import RestartableGcs
from gcs_fault_proxy import FaultProxy
from tljob import storage
from tljob.errors import EXIT_CONFIG, EXIT_RETRYABLE, ConfigError, RetryableError

FILES = {
    "model/saved_model.pb": b"graph" * 300,
    "model/variables/variables.data-00000-of-00001": os.urandom(70_000),
    "model/variables/variables.index": b"index",
    "metrics.json": b'{"accuracy": 0.97}',
    "empty.txt": b"",
}


def make_tree(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def gcs_client() -> gcs.Client:
    """A client of the test's own, to look at what tljob.storage left in the emulator."""
    return gcs.Client(project="tljob-test", credentials=AnonymousCredentials())


def uploads(proxy: FaultProxy) -> list[tuple[str, str]]:
    return [r for r in proxy.requests("forwarded") if r[1].startswith("/upload/")]


def downloads(proxy: FaultProxy) -> list[tuple[str, str]]:
    return [r for r in proxy.requests("forwarded") if r[1].startswith("/download/")]


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setenv(storage.DEADLINE_ENV, "1.5")
    return 1.5


@pytest.fixture(params=["local", "file", "gs"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same folder addressed the three ways the job accepts."""
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "file":
        return f"file://{tmp_path}/out"
    return request.getfixturevalue("gcs_bucket") + "/runs/r1"


# --- paths ----------------------------------------------------------------------------------


def test_join_and_is_remote() -> None:
    assert storage.join("gs://b", "a/", "/c") == "gs://b/a/c"
    assert storage.join("gs://b/x/", "", "y") == "gs://b/x/y"
    assert storage.join("file:///tmp/o", "m") == "file:///tmp/o/m"
    assert storage.join("/tmp/o", "m", "n") == os.path.join("/tmp/o", "m", "n")
    assert storage.is_remote("gs://b/x") and not storage.is_remote("file:///x")
    with pytest.raises(ConfigError, match="s3://b"):
        storage.read_bytes("s3://b/x")
    with pytest.raises(ConfigError, match="no bucket"):
        storage.read_bytes("gs:///x")


# --- single objects and listings ------------------------------------------------------------


def test_round_trip_listing_and_removal(base: str) -> None:
    target = storage.join(base, "deep/dir/blob.bin")
    assert not storage.exists(target)
    storage.write_bytes(target, b"\x00\x01payload")
    storage.write_text(storage.join(base, "notes.txt"), "héllo\n")
    storage.write_bytes(target, b"\x00\x01replaced")

    assert storage.read_bytes(target) == b"\x00\x01replaced"
    assert storage.read_text(storage.join(base, "notes.txt")) == "héllo\n"
    assert storage.exists(target) and storage.exists(storage.join(base, "deep"))
    # Atomic local writes leave no temporary files behind to be listed or published.
    assert storage.list_files(base) == {"deep/dir/blob.bin": 10, "notes.txt": 7}
    assert storage.list_files(storage.join(base, "deep")) == {"dir/blob.bin": 10}
    assert storage.list_files(storage.join(base, "absent")) == {}
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        storage.read_bytes(storage.join(base, "nothing-here"))

    storage.remove_tree(storage.join(base, "deep"))
    assert storage.list_files(base) == {"notes.txt": 7}
    storage.remove_tree(base)
    assert storage.list_files(base) == {} and not storage.exists(base)
    storage.remove_tree(base)  # absent is fine


def test_gs_missing_bucket_reads_as_absent(
    gcs_emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    assert not storage.exists("gs://tljob-no-such-bucket/x")
    with pytest.raises(FileNotFoundError, match="tljob-no-such-bucket"):
        storage.read_bytes("gs://tljob-no-such-bucket/x")
    with pytest.raises(ConfigError, match="gs://tljob-no-such-bucket does not exist"):
        storage.write_bytes("gs://tljob-no-such-bucket/x", b"1")


# --- trees ----------------------------------------------------------------------------------


def test_upload_and_download_tree_verify_and_skip_unchanged(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    src = make_tree(tmp_path / "src")
    uri = gcs_bucket + "/backup"
    assert storage.upload_tree(str(src), uri) == len(FILES)
    assert storage.list_files(uri) == {rel: len(data) for rel, data in FILES.items()}

    fault_proxy.clear_log()
    assert storage.upload_tree(str(src), uri) == 0
    assert uploads(fault_proxy) == []  # unchanged files cost one listing, no upload
    (src / "metrics.json").write_bytes(b'{"accuracy": 0.98}')  # same size, new content
    (src / "ckpt-2.index").write_bytes(b"new")
    assert storage.upload_tree(str(src), uri) == 2

    dst = tmp_path / "dst"
    assert storage.download_tree(uri, str(dst)) == len(FILES) + 1
    assert storage.list_files(str(dst)) == storage.list_files(str(src))
    assert all(
        (dst / rel).read_bytes() == (src / rel).read_bytes() for rel in storage.list_files(str(src))
    )
    fault_proxy.clear_log()
    assert storage.download_tree(uri, str(dst)) == 0
    assert downloads(fault_proxy) == []
    # A local file that differs only in content (same size) fails the CRC32C check: fetched again.
    (dst / "model/variables/variables.index").write_bytes(b"XXXXX")
    assert storage.download_tree(uri, str(dst)) == 1
    assert (dst / "model/variables/variables.index").read_bytes() == b"index"
    assert storage.download_tree(gcs_bucket + "/absent", str(tmp_path / "none")) == 0
    assert storage.upload_tree(str(tmp_path / "absent"), uri) == 0


def test_large_files_download_in_concurrent_ranged_chunks(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thresholds scaled down so a 1 MiB file takes the chunked path in milliseconds.
    monkeypatch.setattr(storage, "LARGE_FILE_BYTES", 256 * 1024)
    monkeypatch.setattr(storage, "CHUNK_BYTES", 128 * 1024)
    big = os.urandom(2**20 + 5)
    src = make_tree(tmp_path / "src", {"ckpt.data": big, "small": b"s"})
    uri = gcs_bucket + "/big"
    # Against the emulator the large file goes up resumably (it lacks the XML multipart API).
    assert storage.upload_tree(str(src), uri) == 2

    fault_proxy.clear_log()
    assert storage.download_tree(uri, str(tmp_path / "dst")) == 2
    assert (tmp_path / "dst/ckpt.data").read_bytes() == big
    big_gets = [p for _, p in downloads(fault_proxy) if "ckpt.data" in p]
    assert len(big_gets) == math.ceil(len(big) / (128 * 1024))


def test_corrupted_downloads_are_rejected_and_leave_no_file(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    storage.upload_tree(str(make_tree(tmp_path / "src")), gcs_bucket + "/t")
    fault_proxy.corrupt_next_downloads(1)
    with pytest.raises(RetryableError, match="CRC32C"):
        storage.download_tree(gcs_bucket + "/t", str(tmp_path / "dst"))
    assert len(fault_proxy.requests("corrupted")) == 1
    # Verified files were renamed into place; the corrupt one and partial temp files are gone.
    assert len(storage.list_files(str(tmp_path / "dst"))) < len(FILES)
    assert not [p for p in (tmp_path / "dst").rglob("*") if p.name.startswith(".tljob-tmp-")]
    assert storage.download_tree(gcs_bucket + "/t", str(tmp_path / "dst")) >= 1
    assert storage.list_files(str(tmp_path / "dst")) == {rel: len(d) for rel, d in FILES.items()}

    fault_proxy.corrupt_next_downloads(1)
    with pytest.raises(RetryableError, match=r"checksum mismatch .*metrics\.json"):
        storage.read_bytes(gcs_bucket + "/t/metrics.json")


def test_remove_tree_on_gs_deletes_prefix_only(tmp_path: Path, gcs_bucket: str) -> None:
    storage.upload_tree(str(make_tree(tmp_path / "a")), gcs_bucket + "/run")
    storage.write_bytes(gcs_bucket + "/run-other/keep", b"k")
    storage.remove_tree(gcs_bucket + "/run")
    assert storage.list_files(gcs_bucket) == {"run-other/keep": 1}


# --- publish --------------------------------------------------------------------------------


def test_publish_writes_success_last_listing_real_crc32c(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    src = make_tree(tmp_path / "run")
    out = gcs_bucket + "/runs/r1"
    storage.write_text(storage.join(out, "_SUCCESS"), "stale")
    (src / "_SUCCESS").write_text("left over from an in-place publish")

    document = storage.publish(str(src), out, "_SUCCESS")

    expected = {rel: {"size": len(d), "crc32c": crc32c_b64(d)} for rel, d in FILES.items()}
    assert document == {"files": expected}
    assert json.loads(storage.read_text(storage.join(out, "_SUCCESS"))) == document
    listed = storage.list_files(out)
    assert listed.pop("_SUCCESS") > 0 and listed == {rel: m["size"] for rel, m in expected.items()}
    assert storage.is_file(storage.join(out, "_SUCCESS"))
    # The emulator stamps each object's generation with its creation time in ns.
    blobs = {
        b.name: b.generation for b in gcs_client().list_blobs(gcs_bucket.removeprefix("gs://"))
    }
    success_generation = blobs.pop("runs/r1/_SUCCESS")
    assert success_generation > max(blobs.values())

    fault_proxy.clear_log()
    assert storage.publish(str(src), out, "_SUCCESS") == document  # idempotent
    assert len(uploads(fault_proxy)) == 1  # only the new _SUCCESS


def test_publish_to_local_output_matches_gcs_checksums(tmp_path: Path, gcs_bucket: str) -> None:
    src = make_tree(tmp_path / "run")
    in_place = storage.publish(str(src), str(src), "_SUCCESS")
    copied = storage.publish(str(src), f"file://{tmp_path}/copy", "_SUCCESS")
    remote = storage.publish(str(src), gcs_bucket + "/r", "_SUCCESS")
    assert in_place == copied == remote  # google-crc32c locally == what GCS reports
    assert storage.is_file(f"{src}/_SUCCESS") and storage.is_file(f"{tmp_path}/copy/_SUCCESS")
    assert storage.list_files(str(tmp_path / "copy")).keys() == set(FILES) | {"_SUCCESS"}


def test_interrupted_publish_leaves_no_success_and_rerun_completes(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy, short_deadline: float
) -> None:
    src = make_tree(tmp_path / "run")
    out = gcs_bucket + "/r"
    storage.write_text(storage.join(out, "_SUCCESS"), "stale success of an earlier attempt")
    # Let the stale _SUCCESS delete, the listing and two uploads through, then drop everything.
    fault_proxy.drop_next(math.inf, skip=4)
    started = time.monotonic()
    with pytest.raises(RetryableError, match=r"gs://.*/r/") as failure:
        storage.publish(str(src), out, "_SUCCESS")
    assert time.monotonic() - started < short_deadline + 5
    assert failure.value.exit_code == EXIT_RETRYABLE

    fault_proxy.heal()
    assert not storage.is_file(storage.join(out, "_SUCCESS"))
    assert len(storage.list_files(out)) == 2

    fault_proxy.clear_log()
    document = storage.publish(str(src), out, "_SUCCESS")
    assert storage.is_file(storage.join(out, "_SUCCESS")) and set(document["files"]) == set(FILES)
    assert len(uploads(fault_proxy)) == len(FILES) - 2 + 1  # the missing files, then _SUCCESS


def test_emulator_outage_is_retryable_and_restart_recovers(
    tmp_path: Path, restartable_gcs: RestartableGcs, short_deadline: float
) -> None:
    src = make_tree(tmp_path / "run")
    out = restartable_gcs.bucket + "/r"
    storage.upload_tree(str(src / "model"), storage.join(out, "model"))
    restartable_gcs.emulator.stop()
    started = time.monotonic()
    with pytest.raises(RetryableError, match=storage.DEADLINE_ENV):
        storage.publish(str(src), out, "_SUCCESS")
    assert time.monotonic() - started < short_deadline + 5

    restartable_gcs.emulator.start()  # same port, same data on disk
    assert not storage.is_file(storage.join(out, "_SUCCESS"))
    assert set(storage.list_files(storage.join(out, "model"))) == {
        rel.removeprefix("model/") for rel in FILES if rel.startswith("model/")
    }
    storage.publish(str(src), out, "_SUCCESS")
    assert storage.is_file(storage.join(out, "_SUCCESS"))


# --- retries --------------------------------------------------------------------------------


def test_transient_errors_and_dropped_connections_are_survived(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    fault_proxy.fail_next(2, status=503)
    storage.write_bytes(gcs_bucket + "/a", b"A")
    fault_proxy.fail_next(1, status=429)
    fault_proxy.drop_next(1)
    assert storage.read_bytes(gcs_bucket + "/a") == b"A"
    fault_proxy.drop_next(2)
    assert storage.upload_tree(str(make_tree(tmp_path / "src")), gcs_bucket + "/t") == len(FILES)
    assert storage.list_files(gcs_bucket + "/t") == {rel: len(d) for rel, d in FILES.items()}
    assert len(fault_proxy.requests("status")) == 3
    assert len(fault_proxy.requests("dropped")) == 3


def test_exhausted_retries_raise_retryable_error_naming_the_object(
    gcs_bucket: str, fault_proxy: FaultProxy, short_deadline: float
) -> None:
    fault_proxy.fail_next(math.inf, status=503)
    with pytest.raises(RetryableError, match=f"{gcs_bucket}/obj") as failure:
        storage.write_bytes(gcs_bucket + "/obj", b"x")
    assert failure.value.exit_code == EXIT_RETRYABLE
    assert len(fault_proxy.requests("status")) >= 2  # it did retry


def test_bad_deadline_setting_is_a_config_error(
    gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.DEADLINE_ENV, "soon")
    with pytest.raises(ConfigError, match=f"{storage.DEADLINE_ENV}='soon'"):
        storage.write_bytes(gcs_bucket + "/x", b"x")


# --- preflight and credentials --------------------------------------------------------------


def test_preflight_accepts_writable_outputs_and_leaves_nothing(
    tmp_path: Path, gcs_bucket: str
) -> None:
    storage.preflight(gcs_bucket + "/runs/r1")
    assert storage.list_files(gcs_bucket) == {}
    storage.preflight(str(tmp_path / "new" / "out"))
    assert (tmp_path / "new" / "out").is_dir() and storage.list_files(str(tmp_path / "new")) == {}


def test_preflight_missing_bucket_fails_fast(
    gcs_emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="gs://tljob-missing-bucket does not exist") as failure:
        storage.preflight("gs://tljob-missing-bucket/runs/r1")
    assert time.monotonic() - started < 3
    assert failure.value.exit_code == EXIT_CONFIG and "buckets create" in str(failure.value)


def test_preflight_forbidden_bucket_fails_fast(gcs_bucket: str, fault_proxy: FaultProxy) -> None:
    fault_proxy.forbid_bucket(gcs_bucket.removeprefix("gs://"))
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"permission denied .*{gcs_bucket}") as failure:
        storage.preflight(gcs_bucket + "/runs/r1")
    assert time.monotonic() - started < 3
    assert "roles/storage.objectAdmin" in str(failure.value)
    assert len(fault_proxy.requests("forbidden")) == 1  # not retried


def test_preflight_unwritable_local_output(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"a-file/out.*not writable"):
        storage.preflight(str(tmp_path / "a-file" / "out"))


def test_missing_credentials_is_a_config_error_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    with pytest.raises(ConfigError, match="gcloud auth application-default login") as failure:
        storage.preflight("gs://any-bucket/out")
    assert "Workload Identity" in str(failure.value) and failure.value.exit_code == EXIT_CONFIG


# --- staging and mirroring ------------------------------------------------------------------


def test_stage_input_copies_once_and_reuses(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    storage.upload_tree(str(make_tree(tmp_path / "src")), gcs_bucket + "/data/train")
    cache = tmp_path / "cache"
    staged = storage.stage_input(gcs_bucket + "/data/train", str(cache))
    assert storage.list_files(staged) == {rel: len(d) for rel, d in FILES.items()}
    fault_proxy.clear_log()
    assert storage.stage_input(gcs_bucket + "/data/train", str(cache)) == staged
    assert downloads(fault_proxy) == []

    weights = storage.stage_input(gcs_bucket + "/data/train/metrics.json", str(cache))
    assert Path(weights).read_bytes() == FILES["metrics.json"]
    assert storage.stage_input(str(tmp_path / "src"), str(cache)) == str(tmp_path / "src")
    assert storage.stage_input(f"file://{tmp_path}/src", str(cache)) == str(tmp_path / "src")
    with pytest.raises(ConfigError, match="data/nope"):
        storage.stage_input(gcs_bucket + "/data/nope", str(cache))


def test_stage_matching_globs_one_segment_like_the_shell(tmp_path: Path, gcs_bucket: str) -> None:
    files = {"d/a-0.rec": b"0", "d/a-1.rec": b"1", "d/b-0.rec": b"b", "d/.a-2.rec": b"h", "d/sub/a-3.rec": b"3"}
    src = make_tree(tmp_path / "src", files)
    storage.upload_tree(str(src), gcs_bucket + "/in")
    cache = tmp_path / "cache"
    for base in (str(src), f"file://{src}", gcs_bucket + "/in"):
        staged = storage.stage_matching(base + "/d/a-*.rec", str(cache))
        assert [Path(p).read_bytes() for p in staged] == [b"0", b"1"], base
        assert [Path(p).name for p in storage.stage_matching(base + "/*/a-?.rec", str(cache))] == ["a-0.rec", "a-1.rec"], base
        assert storage.stage_matching(base + "/d/c-*.rec", str(cache)) == []
    assert all(str(p).startswith(str(cache)) for p in storage.stage_matching(gcs_bucket + "/in/d/*", str(cache)))
    assert storage.parent(gcs_bucket + "/in/d/a-*.rec") == gcs_bucket + "/in/d"
    assert storage.parent(f"{src}/d/a-*.rec") == f"{src}/d"


@pytest.mark.parametrize("remote_kind", ["local", "gs"])
def test_mirror_push_pull(tmp_path: Path, remote_kind: str, request: pytest.FixtureRequest) -> None:
    remote = (
        str(tmp_path / "remote")
        if remote_kind == "local"
        else request.getfixturevalue("gcs_bucket") + "/m"
    )
    staging = make_tree(tmp_path / "staging" / "backup")
    mirror = storage.Mirror(str(tmp_path / "staging"), remote)
    assert mirror.push("backup") == len(FILES)
    assert mirror.push("backup") == 0
    assert storage.list_files(storage.join(remote, "backup")) == storage.list_files(str(staging))

    fresh = storage.Mirror(str(tmp_path / "restarted"), remote)
    assert fresh.pull() == len(FILES)
    assert (tmp_path / "restarted/backup/metrics.json").read_bytes() == FILES["metrics.json"]

    (tmp_path / "staging" / "history.json").write_text('[{"epoch": 1}]')
    (tmp_path / "staging" / "status.json").write_text('{"state": "running"}')
    mirror.push_files("history.json", "status.json")
    assert storage.read_text(storage.join(remote, "history.json")) == '[{"epoch": 1}]'
    assert storage.read_text(storage.join(remote, "status.json")) == '{"state": "running"}'


def test_a_local_copy_leaves_out_what_an_upload_leaves_out(tmp_path: Path) -> None:
    """skip= holds for a local destination too: publish's marker, left in the staging folder by an earlier
    publish in place, must not reach the output before the other files."""
    src = make_tree(tmp_path / "src", {**FILES, "_SUCCESS": b"{}"})
    dst = tmp_path / "dst"
    assert storage.upload_tree(str(src), str(dst), skip=frozenset({"_SUCCESS"})) == len(FILES)
    assert storage.list_files(str(dst)) == {rel: len(data) for rel, data in FILES.items()}
    assert storage.download_tree(str(src), str(dst)) == 1  # a local "download" is a copy: only _SUCCESS is new


def test_mirror_onto_itself_is_a_no_op(tmp_path: Path) -> None:
    make_tree(tmp_path / "out")
    mirror = storage.Mirror(str(tmp_path / "out"), f"file://{tmp_path}/out/")
    assert mirror.push() == 0 and mirror.pull() == 0
    mirror.push_files("absent.json")  # nothing to copy, so nothing is read


def test_an_index_goes_up_only_after_the_files_it_names(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy, short_deadline: float
) -> None:
    """A backup's `checkpoint` index (last=) is sent after its data files, so a transfer cut off mid-way (a
    SIGKILL, an outage) never leaves an index in the bucket that points at files that are not there."""
    files = {f"chief/ckpt-1.data-{i:05d}-of-00012": os.urandom(2000) for i in range(12)}
    files |= {"chief/ckpt-1.index": b"index", "chief/checkpoint": b'model_checkpoint_path: "ckpt-1"\n'}
    src = make_tree(tmp_path / "src", files)
    uri = gcs_bucket + "/backup"
    fault_proxy.fail_after_match(r"ckpt-1\.data-00003")
    with pytest.raises(RetryableError):
        storage.upload_tree(str(src), uri, last=frozenset({"checkpoint"}))
    fault_proxy.heal()
    assert "chief/checkpoint" not in storage.list_files(uri), "the index went up before the files it names"
    # Everything after the index fails: with the index last, that is nothing.
    fault_proxy.fail_after_match(r"chief/checkpoint")
    assert storage.upload_tree(str(src), uri + "2", last=frozenset({"checkpoint"})) == len(files)
    fault_proxy.heal()
    assert set(storage.list_files(uri + "2")) == set(files)
