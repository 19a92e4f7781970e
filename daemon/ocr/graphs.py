"""Edits to the bundled models' graphs, made once at load and cached.

Pre-processing on the device: detection and recognition inputs are normalised pixel by pixel
((v/255 - mean) / std) into float32 NCHW, which cost the host more than any other stage of
the GPU path (numpy in float64, on one core under the GIL) and sent 4 bytes per value to the
device. The edited models take the pixels themselves, NHWC as OpenCV holds them (detection
uint8, recognition uint16 where 256 marks padding), and look each value up in a table of the
host's own normalisation results, computed by the host code on every possible value: the
float32 input the original graph sees is identical to the bit.

Reduction on the device: the recogniser ends in a Softmax over its whole dictionary (18,710
classes for PP-OCRv6): a run hands back `[lines, W/8, 18710]` float32, ~190 MB for 32 lines
640 px wide, copied from the GPU only for the host to keep the arg-max and the max of each
time step. Appending an ArgMax and a ReduceMax over the class axis, and making those the
graph's only outputs, leaves two `[lines, W/8]` tensors (12 bytes a time step instead of
74,840). CTC decoding of the two (RapidOCR's `CTCLabelDecode.decode`, given them) yields the
same text and scores as decoding the full probabilities.

Edited models are written to the cache (`daemon.config.cache_dir()/models`) under names keyed
by the source model's SHA-256 and the edit, so a changed model is edited again and an
unchanged one is read back. A cache that cannot be written is not an error: the model goes to
a private temporary folder for this process instead.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from daemon.config import cache_dir
from daemon.errors import ConfigError
from daemon.files import write_atomic
from daemon.process_pool import alive

log = logging.getLogger(__name__)

REC_INDEX_OUTPUT = "ocr_daemon_argmax"  # int64 [N, T]: the most likely class per time step
REC_SCORE_OUTPUT = "ocr_daemon_max"  # float32 [N, T]: its probability
EDIT_VERSION = 2  # bump when an edit changes, so cached models are rebuilt
CACHE_MODE = 0o600  # the edited models cached under the daemon's own folder: its own
REC_PAD = 256  # the recogniser's input value for padding (normalised to 0.0, mid-grey)

FloatArray = npt.NDArray[np.float32]


def det_model(source: Path, lut: FloatArray, cache: Path | None = None, *,
              fp16: bool = False) -> Path:
    """The detector taking uint8 `[N, H, W, 3]` pixels; `lut[v, c]` is the host's normalised
    value of pixel value `v` in channel `c` (256 x 3). `fp16`: in half precision inside (the
    probability map still float32)."""
    def edit(model: Any) -> Any:
        _take_pixels(model, lut, uint16=False)
        return _half(model) if fp16 else model
    return _edited(source, "det-u8" + ("-fp16" if fp16 else ""), lut.tobytes(), edit, cache)


def rec_model(source: Path, lut: FloatArray, cache: Path | None = None, *,
              fp16: bool = False) -> Path:
    """The recogniser taking uint16 `[N, 48, W, 3]` pixels (`REC_PAD` = padding; `lut` is
    257 x 3) and returning arg-max and max per time step (see the module doc). `fp16`: in
    half precision inside (the outputs still int64 and float32)."""
    def edit(model: Any) -> Any:
        _take_pixels(model, lut, uint16=True)
        _reduce_classes(model, source)
        return _half(model) if fp16 else model
    name = "rec-u16-argmax" + ("-fp16" if fp16 else "")
    return _edited(source, name, lut.tobytes(), edit, cache)


def _edited(source: Path, edit_name: str, params: bytes, edit: Any,
            cache: Path | None) -> Path:
    """`source` edited by `edit`, from the cache when it is there (keyed by the source's
    SHA-256, the edit and its parameters)."""
    with open(source, "rb") as handle:
        source_hash = hashlib.file_digest(handle, "sha256").hexdigest()
    key_hash = hashlib.sha256(source_hash.encode() + params).hexdigest()[:16]
    key = f"{source.stem}.{edit_name}-v{EDIT_VERSION}.{key_hash}.onnx"
    folder = (cache if cache is not None else cache_dir()) / "models"
    target = folder / key
    if target.is_file():
        return target
    data = _apply(source, edit)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data, mode=CACHE_MODE)
        log.info("%s edited for the device (%s), cached as %s", source.name, edit_name, target)
        return target
    except OSError as exc:
        private = _private_folder() / key
        write_atomic(private, data, mode=CACHE_MODE)
        log.warning("model cache %s is not writable (%s); using %s for this run", folder,
                    exc.strerror or exc, private)
        return private


PRIVATE_PREFIX = "ocr-daemon-models-"
_private: Path | None = None
_private_lock = threading.Lock()


def _private_folder() -> Path:
    """This process's own folder for edited models when the cache is not writable: one a
    process (not one a model), removed when it exits; those of processes gone without
    removing theirs (killed) are removed by the next that makes one. Each start left ~30 MB
    in /tmp before."""
    global _private
    with _private_lock:
        if _private is None:
            temp = Path(tempfile.gettempdir())
            for stale in temp.glob(f"{PRIVATE_PREFIX}*-*"):
                pid = stale.name[len(PRIVATE_PREFIX):].split("-")[0]
                with contextlib.suppress(OSError):
                    if pid.isdigit() and not alive(int(pid)) and \
                            stale.stat().st_uid == os.getuid():
                        shutil.rmtree(stale, ignore_errors=True)
            _private = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-"))
            atexit.register(shutil.rmtree, _private, ignore_errors=True)
        return _private


def _apply(source: Path, edit: Any) -> bytes:
    """`source` loaded, `edit`ed (it returns the model, the same or a new one), checked."""
    import onnx

    model = edit(onnx.load(str(source)))
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _half(model: Any) -> Any:
    """The graph in float16: weights, tables and the tensors between nodes, with a cast after
    the inputs and before the outputs so that those keep their types (onnxconverter-common's
    conversion; the operators on its block list stay float32, in these models the
    detector's Resize)."""
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # it warns for every weight too small for float16 (those become 0 or its smallest)
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True)


def _take_pixels(model: Any, lut: FloatArray, *, uint16: bool) -> None:
    """Make the graph's input NHWC pixels: index = value * 3 + channel into the flattened
    table, gathered, transposed to the NCHW float32 input the original graph read."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    old = graph.input[0]
    name = old.name
    inner = f"{name}_normalised"
    for node in graph.node:  # the original graph now reads the normalised tensor
        node.input[:] = [inner if i == name else i for i in node.input]
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3:
        raise ConfigError(f"expected an [N, 3, H, W] input, found {dims}")
    pixel = onnx.TensorProto.UINT16 if uint16 else onnx.TensorProto.UINT8
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info(
        name, pixel, [dims[0], dims[2], dims[3], 3]))
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(lut, np.float32).reshape(-1),
                                "ocr_daemon_lut"),
        numpy_helper.from_array(np.array(3, np.int32), "ocr_daemon_three"),
        numpy_helper.from_array(np.array([0, 1, 2], np.int32), "ocr_daemon_channels"),
    ])
    nodes = [
        helper.make_node("Cast", [name], ["ocr_daemon_value"], to=onnx.TensorProto.INT32),
        helper.make_node("Mul", ["ocr_daemon_value", "ocr_daemon_three"], ["ocr_daemon_row"]),
        helper.make_node("Add", ["ocr_daemon_row", "ocr_daemon_channels"],
                         ["ocr_daemon_index"]),
        helper.make_node("Gather", ["ocr_daemon_lut", "ocr_daemon_index"],
                         ["ocr_daemon_nhwc"], axis=0),
        helper.make_node("Transpose", ["ocr_daemon_nhwc"], [inner], perm=[0, 3, 1, 2]),
    ]
    for position, node in enumerate(nodes):
        graph.node.insert(position, node)


def _reduce_classes(model: Any, source: Path) -> None:
    import onnx
    from onnx import helper

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

