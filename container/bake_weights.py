"""Bakes ImageNet MobileNetV2 weights into the image (the Dockerfile's weights stages); standard library only.

    bake_weights.py KERAS_DIR download URL LOCAL_DIR [ALPHA_SIZE ...]   e.g. ... 1.0_160 1.0_224 from URL
    bake_weights.py KERAS_DIR local URL LOCAL_DIR [ALPHA_SIZE ...]      every Keras-named .h5 file of LOCAL_DIR

Either way the files land in KERAS_DIR/models under the names tf-keras asks for
(mobilenet_v2_weights_tf_dim_ordering_tf_kernels_<alpha>_<size>_no_top.h5; tljob.model looks there),
each checked to be HDF5, with KERAS_DIR/keras.json beside them. Keras publishes no checksums, so the
check is what stands between an error page or a truncated body and a pod that fails at start.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NAME_RE = re.compile(r"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_[0-9.]+_(96|128|160|192|224)_no_top\.h5")
KERAS_JSON = {"floatx": "float32", "epsilon": 1e-07, "backend": "tensorflow", "image_data_format": "channels_last"}


def file_name(alpha_size: str) -> str:
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha_size}_no_top.h5"


def check_hdf5(path: Path, origin: str) -> None:
    with path.open("rb") as f:
        if f.read(len(HDF5_MAGIC)) != HDF5_MAGIC:
            sys.exit(f"{origin}: not an HDF5 file (an error page or a truncated download?)")


def download(models: Path, url: str, pairs: list[str]) -> list[Path]:
    baked = []
    for pair in pairs:
        source = f"{url.rstrip('/')}/{file_name(pair)}"
        target = models / file_name(pair)
        try:
            urllib.request.urlretrieve(source, target)  # noqa: S310 - the URL is the build's own argument
        except (urllib.error.URLError, OSError) as exc:
            sys.exit(f"{source}: download failed ({exc}). Fix: check MOBILENET_V2_WEIGHTS_URL, or bake from a "
                     f"local folder (WEIGHTS_SOURCE=local) or none (MOBILENET_V2_WEIGHTS=)")
        check_hdf5(target, source)
        baked.append(target)
    return baked


def copy_local(models: Path, source_dir: Path) -> list[Path]:
    files = sorted(p for p in source_dir.iterdir() if p.is_file()) if source_dir.is_dir() else []
    wrong = [p.name for p in files if not NAME_RE.fullmatch(p.name)]
    if not files or wrong:
        sys.exit(f"WEIGHTS_SOURCE=local: {source_dir} holds {wrong or 'no files'}. Fix: put only .h5 files named like "
                 f"{file_name('1.0_160')} (the name Keras asks for at that alpha and input size) in container/weights/")
    baked = []
    for path in files:
        check_hdf5(path, str(path))
        baked.append(Path(shutil.copy(path, models / path.name)))
    return baked


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[1] not in ("download", "local"):
        sys.exit(__doc__)
    keras_dir, mode, url, local_dir, pairs = Path(argv[0]), argv[1], argv[2], Path(argv[3]), argv[4:]
    models = keras_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    (keras_dir / "keras.json").write_text(json.dumps(KERAS_JSON) + "\n")
    baked = download(models, url, pairs) if mode == "download" else copy_local(models, local_dir)
    print(f"baked {len(baked)} weights file(s): {' '.join(p.name for p in baked) or 'none'}")  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1:])
