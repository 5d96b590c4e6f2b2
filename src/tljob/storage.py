"""Every byte the job reads from its remote inputs or writes to its outputs goes through here.

A path is a local path, `file:///abs/path` or `gs://bucket/prefix`. gs:// goes through
google-cloud-storage rather than tf.io.gfile: TensorFlow's GCS filesystem ignores
STORAGE_EMULATOR_HOST, so nothing written through it could be tested against an emulator.

Failure policy (exit codes from tljob.errors):
- transient (429, 5xx, timeouts, refused or dropped connections) is retried with exponential
  backoff until TLJOB_STORAGE_DEADLINE_S (default 300 s), then RetryableError (exit 75): the
  pods restart and resume from their last backup;
- 403/401, or 404 on a write (the bucket is missing), is ConfigError (exit 2): no restart fixes it;
- 404 on a read is FileNotFoundError naming the object, as for a local path.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fnmatch
import functools
import glob as globlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import google_crc32c
import requests
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import storage as gcs
from google.cloud.storage import transfer_manager
from google.cloud.storage.exceptions import DataCorruption
from google.cloud.storage.retry import DEFAULT_RETRY

from tljob.errors import ConfigError, RetryableError

_LOG = logging.getLogger(__name__)

DEADLINE_ENV = "TLJOB_STORAGE_DEADLINE_S"
DEFAULT_DEADLINE_S = 300.0
# One file above this size moves in concurrent chunks; below it, files move whole, many at once.
LARGE_FILE_BYTES = 32 * 2**20
CHUNK_BYTES = 32 * 2**20
# Transfers are network-bound, so threads beat processes (no pickling of clients or blobs).
MAX_WORKERS = 8
_THREADS = {"worker_type": transfer_manager.THREAD, "max_workers": MAX_WORKERS}
# Local partial files (atomic writes, downloads in flight) carry this prefix and are never listed,
# so a crash mid-write cannot leave a half file that a listing or a publish marker would count.
_TMP_PREFIX = ".tljob-tmp-"
_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_EMULATOR_PROJECT = "tljob-local"
_CRC_READ_BYTES = 4 * 2**20

# One file in a publish marker's listing: {"size": bytes, "crc32c": base64 as GCS reports it}.
FileEntry = dict[str, int | str | None]

# google-cloud-storage 3.x otherwise starts a background GET of each bucket's metadata only to
# label tracing spans this job never exports; it costs a request, needs storage.buckets.get
# (which object-level roles lack) and makes request counts nondeterministic.
os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")

# Failures that the retry policy retries; seeing one here means the deadline ran out.
_TRANSIENT: tuple[type[BaseException], ...] = (
    gexc.RetryError,
    gexc.ServerError,
    gexc.TooManyRequests,
    ConnectionError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
)


# ---------------------------------------------------------------------------------------------
# Paths


def is_remote(path: str) -> bool:
    """True for gs:// URIs; file:// and plain paths are local."""
    return path.startswith("gs://")


def join(base: str, *parts: str) -> str:
    """Join path segments under `base` with '/' for URIs and os.path.join for local paths."""
    segments = [part.strip("/") for part in parts if part.strip("/")]
    if "://" in base:
        return "/".join([base.rstrip("/"), *segments])
    return os.path.join(base, *segments)


def local_path(path: str) -> str:
    """The filesystem path of a local path or file:// URI (ConfigError for any other scheme)."""
    if path.startswith("file://"):
        # Split by hand: urllib's parser would read a glob's `?` as a query and drop the rest.
        host, slash, rest = path[len("file://") :].partition("/")
        if host not in ("", "localhost"):
            raise ConfigError(
                f"{path!r}: a file:// URI must be absolute (file:///dir), not name the host "
                f"{host!r}"
            )
        return unquote(slash + rest)
    if "://" in path:
        raise ConfigError(
            f"{path!r}: unsupported scheme; use a local path, file:///abs/path or gs://bucket/prefix"
        )
    return path


def parent(path: str) -> str:
    """The folder that holds `path` (a file, an object or a glob pattern)."""
    if is_remote(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(local_path(path).rstrip(os.sep)) or "."


def has_wildcards(path: str) -> bool:
    """True for a glob pattern: `*`, `?` or `[...]` anywhere in it."""
    return any(ch in path for ch in "*?[")


def _segment_matches(name: str, pattern: str) -> bool:
    # As the shell (and glob.glob for local paths): a wildcard never matches a leading dot.
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _split_gs(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ConfigError(f"{uri!r} names no bucket; write gs://BUCKET/prefix")
    return bucket, key.strip("/")


def _dir_prefix(key: str) -> str:
    return f"{key}/" if key else ""


def _same_local_dir(a: str, b: str) -> bool:
    return not is_remote(b) and os.path.realpath(local_path(a)) == os.path.realpath(local_path(b))


def _inside(root: str, rel: str) -> str:
    """Local path of `rel` under `root`; an object name must not climb out of the destination."""
    target = os.path.normpath(os.path.join(root, *rel.split("/")))
    if os.path.commonpath([os.path.abspath(root), os.path.abspath(target)]) != os.path.abspath(
        root
    ):
        raise ConfigError(
            f"object name {rel!r} would be written outside {root!r}; rename the object"
        )
    return target


# ---------------------------------------------------------------------------------------------
# Client, retries, error translation


def _deadline_s() -> float:
    raw = os.environ.get(DEADLINE_ENV)
    if raw is None:
        return DEFAULT_DEADLINE_S
    try:
        value = float(raw)
    except ValueError as err:
        raise ConfigError(
            f"{DEADLINE_ENV}={raw!r} is not a number of seconds; set e.g. 300"
        ) from err
    if not value > 0:
        raise ConfigError(f"{DEADLINE_ENV}={raw!r} must be a positive number of seconds, e.g. 300")
    return value


def _rpc() -> dict[str, Any]:
    """The retry policy and per-request HTTP timeout of every call to GCS (its `retry=` and `timeout=`)."""
    deadline = _deadline_s()
    # Full-jitter backoff from 0.5 s keeps short outages cheap; the deadline bounds the whole operation, so a
    # storage outage ends in exit 75 and a pod restart rather than a hang. No request outlasts the operation.
    return {"retry": DEFAULT_RETRY.with_delay(initial=0.5, maximum=30.0, multiplier=2.0).with_timeout(deadline),
            "timeout": min(60.0, deadline)}


def _client() -> gcs.Client:
    return _client_for(
        os.environ.get(_EMULATOR_ENV) or None, os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    )


@functools.cache
def _client_for(emulator_host: str | None, project: str | None) -> gcs.Client:
    # Keyed by the environment it was built from, so one client serves the process (its HTTP
    # pool is thread-safe) while tests may still point different cases at different emulators.
    if emulator_host:
        return gcs.Client(project=project or _EMULATOR_PROJECT, credentials=AnonymousCredentials())
    try:
        # project=None means "no project": object I/O needs none, and inferring one can fail.
        return gcs.Client(project=project)
    except DefaultCredentialsError as err:
        raise ConfigError(
            f"no Google Cloud credentials for gs:// paths ({err}). Fix: on a workstation run "
            "`gcloud auth application-default login`; on GKE bind the pod's Kubernetes service "
            "account to a Google service account (Workload Identity) or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a key file; for local tests set "
            f"{_EMULATOR_ENV} to an emulator"
        ) from err


def _blob(uri: str) -> gcs.Blob:
    bucket, key = _split_gs(uri)
    if not key:
        raise ConfigError(f"{uri!r} names a bucket, not an object; add the object's path")
    return _client().bucket(bucket).blob(key)


@contextlib.contextmanager
def _gcs_errors(uri: str, action: str, *, writing: bool) -> Iterator[None]:
    """Turn client exceptions into the job's exit-code classes, naming `uri` and the fix."""
    bucket = _split_gs(uri)[0]
    try:
        yield
    except (gexc.Forbidden, gexc.Unauthorized) as err:
        raise ConfigError(
            f"permission denied to {action} {uri} (HTTP {err.code}: {err.message}). Fix: grant "
            f"the job's service account roles/storage.objectAdmin on gs://{bucket}"
        ) from err
    except gexc.NotFound as err:
        if writing:
            raise ConfigError(
                f"bucket gs://{bucket} does not exist (while trying to {action} {uri}). Fix: "
                f"create it (gcloud storage buckets create gs://{bucket}) or correct the URI"
            ) from err
        raise FileNotFoundError(
            f"{uri} does not exist (nor perhaps its bucket gs://{bucket})"
        ) from err
    except DataCorruption as err:
        raise RetryableError(f"checksum mismatch while trying to {action} {uri}: {err}") from err
    except _TRANSIENT as err:
        raise RetryableError(
            f"storage did not answer while trying to {action} {uri} within {_deadline_s():g} s "
            f"({DEADLINE_ENV}); a restarted run resumes from its last backup: {err}"
        ) from err


def _raise_first_failure(
    uris: list[str], results: Iterable[object], action: str, *, writing: bool
) -> None:
    """Re-raise, translated, the first failure of a parallel batch (results align with uris)."""
    failures = [
        (uri, r) for uri, r in zip(uris, results, strict=True) if isinstance(r, BaseException)
    ]
    if not failures:
        return
    uri, first = failures[0]
    if len(failures) > 1:
        _LOG.error("%d objects failed to %s; the first was %s", len(failures), action, uri)
    with _gcs_errors(uri, action, writing=writing):
        raise first


# ---------------------------------------------------------------------------------------------
# Checksums and local files


def _file_crc32c(path: str) -> str:
    """Base64 of the file's big-endian CRC32C, the form GCS reports in object metadata."""
    # Hashed afresh every time: caching by (inode, size, mtime) is unsafe, because downloads set
    # mtime to the object's time and a freed inode is soon reused by the next file.
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CRC_READ_BYTES), b""):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode("ascii")


def _local_listing(root: str) -> dict[str, int]:
    listing: dict[str, int] = {}
    if not os.path.isdir(root):
        return listing
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.startswith(_TMP_PREFIX):
                continue
            full = os.path.join(dirpath, name)
            listing[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
    return dict(sorted(listing.items()))


def _temp_path_beside(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=parent)
    os.close(fd)
    # mkstemp creates 0600; outputs are meant to be read by other users (TensorBoard, humans).
    os.chmod(tmp, 0o644)
    return tmp


def _atomic_local(path: str, fill: Callable[[str], None]) -> None:
    """Let `fill` write a temporary file beside `path`, then rename it into place."""
    tmp = _temp_path_beside(path)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_file(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _local_matches(path: str, size: int, crc32c: str | Callable[[], str] | None) -> bool:
    """True if `path` holds `size` bytes with `crc32c` (a callable: hashed only if needed)."""
    if crc32c is None or not os.path.isfile(path) or os.path.getsize(path) != size:
        return False
    expected = crc32c if isinstance(crc32c, str) else crc32c()
    return _file_crc32c(path) == expected


def _log_transfer(verb: str, src: str, dst: str, sizes: dict[str, int], sent: Collection[str]) -> int:
    """Logs a tree transfer of the files `sent` out of `sizes` (relative path -> bytes); returns how many."""
    _LOG.info("%s %s -> %s: %d of %d files (%d bytes), %d unchanged", verb, src, dst, len(sent), len(sizes),
              sum(sizes[rel] for rel in sent), len(sizes) - len(sent))
    return len(sent)


# ---------------------------------------------------------------------------------------------
# Remote listings


@dataclass(frozen=True)
class _RemoteObject:
    size: int
    crc32c: str | None
    blob: gcs.Blob


def _remote_listing(uri: str, *, writing: bool = False) -> dict[str, _RemoteObject]:
    """Objects under `uri` treated as a folder, by path relative to it.

    `writing`: the listing precedes a write, so a missing bucket is a ConfigError.
    """
    bucket, key = _split_gs(uri)
    prefix = _dir_prefix(key)
    with _gcs_errors(uri, "list", writing=writing):
        blobs = list(_client().list_blobs(bucket, prefix=prefix, **_rpc()))
    # Names ending in '/' are folder placeholders made by consoles, not files.
    listing = {b.name[len(prefix):]: _RemoteObject(int(b.size or 0), b.crc32c, b)
               for b in blobs if not b.name.endswith("/")}
    return dict(sorted(listing.items()))


def _listing_with_crc(path: str) -> dict[str, tuple[int, str | None]]:
    if is_remote(path):
        return {rel: (obj.size, obj.crc32c) for rel, obj in _remote_listing(path).items()}
    root = local_path(path)
    return {
        rel: (size, _file_crc32c(_inside(root, rel))) for rel, size in _local_listing(root).items()
    }


# ---------------------------------------------------------------------------------------------
# Single objects


def exists(path: str) -> bool:
    """True if `path` is a file or object, or a folder/prefix holding at least one object."""
    if not is_remote(path):
        return os.path.exists(local_path(path))
    bucket_name, key = _split_gs(path)
    bucket = _client().bucket(bucket_name)
    with _gcs_errors(path, "check", writing=False):
        if not key:
            return bool(bucket.exists(**_rpc()))
        if bucket.blob(key).exists(**_rpc()):
            return True
        try:
            return any(True for _ in bucket.list_blobs(prefix=f"{key}/", max_results=1, **_rpc()))
        except gexc.NotFound:
            return False  # the bucket itself is missing


def is_file(path: str) -> bool:
    """True if `path` is a file or object (not a folder or prefix)."""
    if not is_remote(path):
        return os.path.isfile(local_path(path))
    with _gcs_errors(path, "check", writing=False):
        return bool(_blob(path).exists(**_rpc()))


def read_bytes(path: str) -> bytes:
    """Whole content of a file or object; FileNotFoundError when absent."""
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    with _gcs_errors(path, "read", writing=False):
        return _blob(path).download_as_bytes(checksum="crc32c", **_rpc())


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def _write(path: str, data: bytes, content_type: str) -> None:
    if not is_remote(path):
        _atomic_local(local_path(path), functools.partial(_write_file, data=data))
        return
    # One upload request: GCS makes the object visible only when it is complete.
    with _gcs_errors(path, "write", writing=True):
        _blob(path).upload_from_string(data, content_type=content_type, checksum="crc32c", **_rpc())


def write_bytes(path: str, data: bytes) -> None:
    """Atomic write: a reader sees the old content or the new, never a part."""
    _write(path, data, "application/octet-stream")


def write_text(path: str, text: str) -> None:
    _write(path, text.encode("utf-8"), "text/plain; charset=utf-8")


def _delete_object(uri: str) -> None:
    # Already gone is fine: an earlier attempt may have deleted it and lost the answer.
    with _gcs_errors(uri, "delete", writing=True), contextlib.suppress(gexc.NotFound):
        _blob(uri).delete(**_rpc())


# ---------------------------------------------------------------------------------------------
# Trees


def list_files(prefix: str) -> dict[str, int]:
    """Every file under the folder `prefix`, recursively: relative path -> size; {} if absent."""
    if is_remote(prefix):
        return {rel: obj.size for rel, obj in _remote_listing(prefix).items()}
    return _local_listing(local_path(prefix))


def remove_tree(path: str) -> None:
    """Delete a folder and everything under it (or a single file); absent is fine."""
    if not is_remote(path):
        local = local_path(path)
        if os.path.isdir(local) and not os.path.islink(local):
            shutil.rmtree(local)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)
        return
    uris = [join(path, rel) for rel in _remote_listing(path)]
    if _split_gs(path)[1]:
        uris.append(path.rstrip("/"))
    with concurrent.futures.ThreadPoolExecutor(MAX_WORKERS) as pool:
        futures = [pool.submit(_delete_object, uri) for uri in uris]
    _raise_first_failure(uris, [f.exception() for f in futures], "delete", writing=True)
    _LOG.info("removed %s: %d objects", path, len(uris))


def upload_tree(local_dir: str, uri: str, *, last: frozenset[str] = frozenset(),
                skip: frozenset[str] = frozenset()) -> int:
    """Copy local_dir's files but those named in `skip` to `uri` (gs:// or local), skipping those whose size and
    CRC32C already match there; returns how many were sent (none from a missing local_dir). Files whose base name
    is in `last` (an index that points at the others) go once the rest is there, so a process killed mid-upload
    leaves the previous index, whose files a sync never deletes, not one pointing nowhere.
    """
    src = local_path(local_dir)
    local = {rel: size for rel, size in _local_listing(src).items() if rel not in skip}
    if is_remote(uri):
        remote = _remote_listing(uri, writing=True) if local else {}
        todo = [rel for rel in local
                if not (rel in remote and _local_matches(_inside(src, rel), remote[rel].size, remote[rel].crc32c))]
    else:
        dst = local_path(uri)
        todo = [rel for rel, size in local.items()
                if not _local_matches(_inside(dst, rel), size, functools.partial(_file_crc32c, _inside(src, rel)))]
    for group in ([r for r in todo if posixpath.basename(r) not in last],
                  [r for r in todo if posixpath.basename(r) in last]):
        if is_remote(uri):
            _upload_files(src, uri, {rel: local[rel] for rel in group})
        else:
            for rel in group:
                _atomic_local(_inside(dst, rel), functools.partial(shutil.copyfile, _inside(src, rel)))
    return _log_transfer("upload" if is_remote(uri) else "copy", src, uri, local, todo)


def _upload_files(src: str, uri: str, sizes: dict[str, int]) -> None:
    """Uploads the files `sizes` names (relative to `src`) under `uri`: large ones in concurrent chunks."""
    bucket_name, key = _split_gs(uri)
    bucket = _client().bucket(bucket_name)
    # gcp-storage-emulator answers the XML multipart-upload API with 501 (checked on 2026.7.19), so against an
    # emulator large files take the resumable upload, which it implements.
    chunked = [rel for rel, size in sizes.items() if size > LARGE_FILE_BYTES and not os.environ.get(_EMULATOR_ENV)]
    whole = [rel for rel in sizes if rel not in chunked]
    results = transfer_manager.upload_many(
        [(_inside(src, rel), bucket.blob(_dir_prefix(key) + rel)) for rel in whole],
        upload_kwargs={**_rpc(), "checksum": "crc32c"}, raise_exception=False, **_THREADS)
    _raise_first_failure([join(uri, rel) for rel in whole], results, "upload", writing=True)
    for rel in chunked:
        with _gcs_errors(join(uri, rel), "upload", writing=True):
            transfer_manager.upload_chunks_concurrently(
                _inside(src, rel), bucket.blob(_dir_prefix(key) + rel), chunk_size=CHUNK_BYTES, **_rpc(), **_THREADS)


def _download_objects(uri: str, objects: dict[str, _RemoteObject], dst: str) -> int:
    """Fetch `objects` (name under `uri` -> listing entry) into `dst`, verified, atomically."""
    todo = {rel: obj for rel, obj in objects.items() if not _local_matches(_inside(dst, rel), obj.size, obj.crc32c)}
    temps = {rel: _temp_path_beside(_inside(dst, rel)) for rel in todo}
    try:
        whole = [rel for rel, obj in todo.items() if obj.size <= LARGE_FILE_BYTES]
        chunked = [rel for rel, obj in todo.items() if obj.size > LARGE_FILE_BYTES]
        # CRC32C is checked below against the listing, the same way for whole and chunked files.
        results = transfer_manager.download_many(
            [(todo[rel].blob, temps[rel]) for rel in whole],
            download_kwargs={**_rpc(), "checksum": None}, raise_exception=False, **_THREADS)
        _raise_first_failure([join(uri, rel) for rel in whole], results, "download", writing=False)
        for rel in chunked:
            with _gcs_errors(join(uri, rel), "download", writing=False):
                transfer_manager.download_chunks_concurrently(
                    todo[rel].blob, temps[rel], chunk_size=CHUNK_BYTES, crc32c_checksum=False,
                    download_kwargs=_rpc(), **_THREADS)
        for rel, obj in todo.items():
            if not _local_matches(temps[rel], obj.size, obj.crc32c):
                raise RetryableError(f"download of {join(uri, rel)} does not match its size {obj.size} and CRC32C "
                                     f"{obj.crc32c}; the network corrupted it, try again")
            os.replace(temps[rel], _inside(dst, rel))
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return _log_transfer("download", uri, dst, {rel: obj.size for rel, obj in objects.items()}, todo)


def download_tree(uri: str, local_dir: str) -> int:
    """Copy the objects under `uri` into local_dir, verifying CRC32C and skipping files that match.

    Returns how many files were fetched; an absent prefix fetches nothing.
    """
    if not is_remote(uri):
        return upload_tree(uri, local_dir)  # a local copy
    return _download_objects(uri, _remote_listing(uri), local_path(local_dir))


def _staged(cache_dir: str, bucket: str, key: str) -> str:
    """cache_dir/BUCKET/KEY: where gs://BUCKET/KEY is staged."""
    root = os.path.join(local_path(cache_dir), bucket)
    return _inside(root, key) if key else root


def stage_input(uri: str, cache_dir: str) -> str:
    """Local copy of a gs:// folder or file at cache_dir/BUCKET/PATH; a local path comes back as is.

    An existing copy is checked file by file (size and CRC32C) against the current listing, so
    a restarted pod fetches only what is missing or changed, and a damaged copy heals itself.
    """
    if not is_remote(uri):
        return local_path(uri)
    bucket, key = _split_gs(uri)
    target = _staged(cache_dir, bucket, key)
    objects = _remote_listing(uri)
    if objects:
        _download_objects(uri, objects, target)
        return target
    if not key or uri.endswith("/"):
        raise ConfigError(f"input folder {uri} holds no objects. Fix: correct the URI or upload the data")
    with _gcs_errors(uri, "stage", writing=False):
        blob = _client().bucket(bucket).get_blob(key, **_rpc())
    if blob is None:
        raise ConfigError(f"input {uri} does not exist (no object, no folder). Fix: correct the URI")
    single = {posixpath.basename(key): _RemoteObject(int(blob.size or 0), blob.crc32c, blob)}
    _download_objects(posixpath.dirname(uri), single, os.path.dirname(target))
    return target


def stage_matching(pattern: str, cache_dir: str) -> list[str]:
    """Local paths, sorted, of the files the glob `pattern` matches; [] when none does.

    Wildcards match within one path segment, as in a shell (`gs://b/d/*.tfrecord` does not match
    `gs://b/d/sub/x.tfrecord`). gs:// matches are staged as stage_input stages a folder, at
    cache_dir/BUCKET/PATH, in one parallel, checksummed transfer; local matches come back as they are.
    """
    if not is_remote(pattern):
        return sorted(p for p in globlib.glob(local_path(pattern))
                      if os.path.isfile(p) and not os.path.basename(p).startswith(_TMP_PREFIX))
    bucket, key = _split_gs(pattern)
    segments = key.split("/")
    # List from the deepest folder without wildcards: the fewest objects that can match.
    fixed = next((i for i, seg in enumerate(segments) if has_wildcards(seg)), len(segments) - 1)
    base_key = "/".join(segments[:fixed])
    base = f"gs://{bucket}/{base_key}" if base_key else f"gs://{bucket}"
    wanted = segments[fixed:]
    objects = {rel: obj for rel, obj in _remote_listing(base).items()
               if len(rel.split("/")) == len(wanted) and all(map(_segment_matches, rel.split("/"), wanted))}
    target = _staged(cache_dir, bucket, base_key)
    if objects:
        _download_objects(base, objects, target)
    return [_inside(target, rel) for rel in objects]


# ---------------------------------------------------------------------------------------------
# Run-level operations


def preflight(output: str) -> None:
    """Fail fast (ConfigError, exit 2) when `output` cannot be written, before any training."""
    if is_remote(output):
        # A probe write proves what training needs (create and delete objects) with object-level
        # permissions alone; a bucket GET would also demand storage.buckets.get.
        probe = join(output, f".tljob-preflight-{uuid.uuid4().hex}")
        _write(probe, b"", "application/octet-stream")
        _delete_object(probe)
        return
    local = local_path(output)
    try:
        os.makedirs(local, exist_ok=True)
        os.unlink(_temp_path_beside(os.path.join(local, "probe")))
    except OSError as err:
        raise ConfigError(
            f"output directory {local!r} is not writable ({err}). Fix: choose another --output "
            "or make it writable by this user"
        ) from err


def publish(local_dir: str, output: str, marker: str) -> dict[str, dict[str, FileEntry]]:
    """Publish a finished run: copy local_dir to `output`, then write the file `marker` LAST.

    `marker` holds {"files": {relative path: {"size": int, "crc32c": base64}}} for every
    file under `output` but itself, and is returned. Until it exists the run reads as
    unfinished, so a crash at any point leaves no false success; calling again completes it.
    """
    marker_path = join(output, marker)
    if is_remote(output):
        _delete_object(marker_path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(local_path(marker_path))
    if is_remote(output) or not _same_local_dir(local_dir, output):
        # A marker inside local_dir (from an earlier publish in place) must not go out early.
        upload_tree(local_dir, output, skip=frozenset({marker}))
    listing = {rel: v for rel, v in _listing_with_crc(output).items() if rel != marker}
    document = {"files": {rel: {"size": size, "crc32c": crc} for rel, (size, crc) in listing.items()}}
    write_text(marker_path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    _LOG.info("published %s: %d files, %d bytes", output, len(listing), sum(s for s, _ in listing.values()))
    return document


class Mirror:
    """A local staging folder kept in step with `remote` (gs:// or another local folder).

    Training writes backups to fast local disk; push copies them out, pull brings them back
    on a restarted pod. With `remote` the same folder as local_dir both are no-ops.
    """

    def __init__(self, local_dir: str, remote: str) -> None:
        self.local_dir = local_path(local_dir)
        self.remote = remote
        self._same = _same_local_dir(self.local_dir, remote)

    def push(self, subdir: str = "", last: frozenset[str] = frozenset()) -> int:
        """Upload local_dir/subdir to remote/subdir (base names in `last` after the rest); returns files sent."""
        if self._same:
            return 0
        return upload_tree(join(self.local_dir, subdir), join(self.remote, subdir), last=last)

    def push_files(self, *names: str) -> None:
        """Upload small files (history, status), each as a single object write."""
        if not self._same:
            for name in names:
                write_bytes(join(self.remote, name), read_bytes(join(self.local_dir, name)))

    def pull(self) -> int:
        """Download remote into local_dir; returns files fetched."""
        return 0 if self._same else download_tree(self.remote, self.local_dir)
