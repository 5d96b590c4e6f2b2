"""`tljob` with TFDS's mock data (tfds.testing.mock_data), for worker processes: no download, and every call of
download_and_prepare recorded as a line of the file $TLJOB_TEST_PREPARE_LOG, then held for
$TLJOB_TEST_PREPARE_S seconds, as a real preparation takes a while (the other workers must wait for it)."""

from __future__ import annotations

import os
import sys
import time
from unittest import mock

import tljob  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow_datasets as tfds

from tljob.cli import main


def main_with_mock_tfds() -> int:
    with tfds.testing.mock_data(num_examples=int(os.environ.get("TLJOB_TEST_TFDS_EXAMPLES", "32"))):
        mocked = tfds.core.DatasetBuilder.download_and_prepare  # the mock's no-op

        def recorded(self: tfds.core.DatasetBuilder, *args: object, **kwargs: object) -> None:
            with open(os.environ["TLJOB_TEST_PREPARE_LOG"], "a") as f:
                f.write(f"pid {os.getpid()} {self.name}\n")
            time.sleep(float(os.environ.get("TLJOB_TEST_PREPARE_S", "0")))
            mocked(self, *args, **kwargs)

        with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", recorded):
            return main()


if __name__ == "__main__":
    sys.exit(main_with_mock_tfds())
