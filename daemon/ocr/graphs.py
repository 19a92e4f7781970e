"""Edits to the bundled models' graphs, made once at load and cached.

The recogniser ends in a Softmax over its whole dictionary (18,710 classes for PP-OCRv6): a run
hands back `[lines, W/8, 18710]` float32, ~190 MB for 32 lines 640 px wide, copied from the GPU
only for the host to keep the arg-max and the max of each time step. Appending an ArgMax and a
ReduceMax over the class axis, and making those the graph's only outputs, leaves two `[lines,
W/8]` tensors (12 bytes a time step instead of 74,840); onnxruntime then never materialises the
probabilities on the host. CTC decoding of the two (RapidOCR's `CTCLabelDecode.decode`, given
them) yields the same text and scores as decoding the full probabilities.

The edited model is written to the cache (`daemon.config.cache_dir()/models`) under a name
keyed by the source model's SHA-256, so a changed model is edited again and an unchanged one is
read back. A cache that cannot be written is not an error: the model goes to a private
temporary folder for this process instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from daemon.config import cache_dir
from daemon.errors import ConfigError

log = logging.getLogger(__name__)

REC_INDEX_OUTPUT = "ocr_daemon_argmax"  # int64 [N, T]: the most likely class per time step
REC_SCORE_OUTPUT = "ocr_daemon_max"  # float32 [N, T]: its probability
EDIT_VERSION = 1  # bump when the edit changes, so cached models are rebuilt


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def reduced_rec_model(source: Path, cache: Path | None = None) -> Path:
    """The recogniser at `source` with its output reduced on the device (see the module doc).

    Returns the path of the edited model, from the cache when it is there already.
    """
    key = f"{source.stem}.argmax-v{EDIT_VERSION}.{file_sha256(source)[:16]}.onnx"
    folder = (cache if cache is not None else cache_dir()) / "models"
    target = folder / key
    if target.is_file():
        return target
    data = _reduce_rec(source)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, data)
        log.info("recognition model %s reduced on the device, cached as %s", source.name, target)
        return target
    except OSError as exc:
        private = Path(tempfile.mkdtemp(prefix="ocr-daemon-models-")) / key
        _write_atomic(private, data)
        log.warning("model cache %s is not writable (%s); using %s for this run", folder,
                    exc.strerror or exc, private)
        return private


def _reduce_rec(source: Path) -> bytes:
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    graph = model.graph
    if len(graph.output) != 1:
        raise ConfigError(f"{source.name}: expected one output (the class probabilities), "
                          f"found {len(graph.output)}")
    probs = graph.output[0].name
    graph.node.extend([
        helper.make_node("ArgMax", [probs], [REC_INDEX_OUTPUT], axis=2, keepdims=0),
        helper.make_node("ReduceMax", [probs], [REC_SCORE_OUTPUT], axes=[2], keepdims=0),
    ])
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info(REC_INDEX_OUTPUT, onnx.TensorProto.INT64, ["N", "T"]),
        helper.make_tensor_value_info(REC_SCORE_OUTPUT, onnx.TensorProto.FLOAT, ["N", "T"]),
    ])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _write_atomic(target: Path, data: bytes) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
