"""Exceptions that carry the process exit code; the Kubernetes failure policy is written from these codes.

| code | meaning | what the Job does |
|---|---|---|
| 0 | success (or the run was already finished) | complete |
| 1 | unexpected internal error (a bug) | retried up to backoffLimit |
| 2 | config error: bad key or value, missing input, output bucket not writable | fail the Job at once |
| 3 | data error: too many undecodable files, empty dataset | fail the Job at once |
| 75 | retryable: a peer died or froze, SIGTERM/eviction, transient storage outage | restart the pods; they resume from the backup |
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_RETRYABLE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"


class TljobError(Exception):
    """Base class: an error the job understands and reports with a fix."""

    exit_code = EXIT_INTERNAL


class ConfigError(TljobError):
    """A setting is wrong; the message names the key, the value and the fix."""

    exit_code = EXIT_CONFIG


class DataError(TljobError):
    """The data cannot be trained on (too many bad files, no images, unknown labels)."""

    exit_code = EXIT_DATA


class RetryableError(TljobError):
    """The run can continue from its last backup if the process is started again."""

    exit_code = EXIT_RETRYABLE
