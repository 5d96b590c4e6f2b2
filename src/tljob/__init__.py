"""tljob: the TensorFlow transfer-learning recipe as a configurable, resumable, multi-worker job."""

import os

# Legacy Keras (tf-keras) must be chosen before TensorFlow is first imported anywhere: Keras 3's
# Model.fit fails under MultiWorkerMirroredStrategy in TF 2.21 and its BackupAndRestore is not
# multi-worker aware. setdefault would let a stray TF_USE_LEGACY_KERAS=0 select Keras 3, so force it.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ INFO lines (CUDA probing on CPU hosts) drown the job's own log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
