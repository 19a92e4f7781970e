"""The models edited for the device: pixels normalised there (the same float input to the
bit), the recogniser's classes reduced there (the same text and scores from ~1/6000 of the
bytes); the edited models cached by the source's hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw, ImageFont

from daemon.config import OcrSettings
from daemon.hardware.nvml import probe_nvml
from daemon.hardware.providers import CPU, CUDA_EP, ProviderChoice, ort_providers_for
from daemon.hardware.sessions import create_session, provider_name
from daemon.ocr import buckets, graphs
from daemon.ocr.graphs import REC_INDEX_OUTPUT, REC_PAD, REC_SCORE_OUTPUT, det_model, rec_model
from daemon.ocr.host import ctc_decode, det_lut, normalise_rec, rec_lut, resize_rec
from daemon.ocr.models import load_rapidocr_config, resolve_model_paths
from daemon.results import Image as BgrImage
from tests.rendering import random_lines, render_page

FONT = Path(__file__).parent / "fonts" / "DroidSansFallback-test-subset.ttf"
CUDA_READY = CUDA_EP in ort.get_available_providers() and bool(probe_nvml().gpus)


def chinese_line(text: str) -> BgrImage:
    font = ImageFont.truetype(str(FONT), 40)
    image = Image.new("RGB", (40 * len(text) + 20, 56), "white")
    ImageDraw.Draw(image).text((10, 4), text, fill="black", font=font)
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def line_images() -> list[BgrImage]:
    """Rendered single lines of several lengths, Latin and Chinese."""
    lines = [render_page([text], width=40 + 19 * len(text), font_size=32, margin=6)
             for text in random_lines(7, 6)]
    lines += [chinese_line("请把包裹送到北门"), chinese_line("七位灯塔守护者数紫色的浪")]
    return lines


def choice_for(provider: str, ocr: OcrSettings) -> ProviderChoice:
    if provider == "cpu":
        return CPU
    return ProviderChoice("cuda", ort_providers=ort_providers_for("cuda", ocr))


def rec_batches(images: list[BgrImage]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The lines as RapidOCR feeds them (normalised float32, zero-padded) and as the edited
    recogniser takes them (uint16 pixels, REC_PAD-padded)."""
    needed = [buckets.rec_needed_width(im.shape[0], im.shape[1]) for im in images]
    width = max(needed)
    floats = np.zeros((len(images), 3, buckets.REC_HEIGHT, width), np.float32)
    pixels = np.full((len(images), buckets.REC_HEIGHT, width, 3), REC_PAD, np.uint16)
    for k, (image, w) in enumerate(zip(images, needed, strict=True)):
        resize_rec(image, w, pixels[k])
        floats[k, :, :, :w] = normalise_rec(pixels[k, :, :w].astype(np.uint8))
    return floats, pixels


PROVIDERS = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not CUDA_READY, reason="needs an NVIDIA GPU and onnxruntime-gpu")]),
]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_edited_recogniser_gives_the_same_text_and_scores(provider: str, tmp_path: Path) -> None:
    from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

    ocr = OcrSettings(lang="ch")
    source = resolve_model_paths(ocr).rec
    choice = choice_for(provider, ocr)
    full = create_session(source, choice, ocr)
    reduced = create_session(rec_model(source, rec_lut(), tmp_path), choice, ocr)
    assert provider_name(reduced) == provider
    assert [o.name for o in reduced.get_outputs()] == [REC_INDEX_OUTPUT, REC_SCORE_OUTPUT]
    character = full.get_modelmeta().custom_metadata_map["character"].splitlines()
    decoder = CTCLabelDecode(character=character)

    floats, pixels = rec_batches(line_images())
    (probs,) = full.run(None, {"x": floats})
    want, _ = decoder(probs)  # what RapidOCR's CTCLabelDecode gives from the probabilities
    best, best_prob = reduced.run(None, {"x": pixels})
    got = ctc_decode(decoder.character, best, best_prob)  # what the engine decodes

    assert got == want
    assert "包裹送到北门" in want[-2][0] and all(text for text, _ in want)
    assert probs.nbytes > 5000 * (best.nbytes + best_prob.nbytes)


def _float_types(path: Path) -> set[int]:
    """The element types of a model's floating-point weights."""
    import onnx

    return {t.data_type for t in onnx.load(str(path)).graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_half_precision_models_read_the_same_text(provider: str, tmp_path: Path) -> None:
    """`ocr.gpu_precision = "fp16"`: both models in float16 inside, taking and giving the same
    types; the recogniser reads the same text with scores within 0.01, the detector's map
    differs by float16's rounding only."""
    import onnx
    from rapidocr.ch_ppocr_det.utils import DetPreProcess

    ocr = OcrSettings(lang="ch")
    paths = resolve_model_paths(ocr)
    choice = choice_for(provider, ocr)
    rec32 = rec_model(paths.rec, rec_lut(), tmp_path)
    rec16 = rec_model(paths.rec, rec_lut(), tmp_path, fp16=True)
    assert rec16 != rec32 and rec16.parent == rec32.parent  # cached under its own name
    assert _float_types(rec32) == {onnx.TensorProto.FLOAT}
    assert _float_types(rec16) == {onnx.TensorProto.FLOAT16}
    full, half = (create_session(path, choice, ocr) for path in (rec32, rec16))
    assert provider_name(half) == provider
    assert [o.type for o in half.get_outputs()] == [o.type for o in full.get_outputs()]
    characters = full.get_modelmeta().custom_metadata_map["character"].splitlines()
    from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

    decoder = CTCLabelDecode(character=characters)
    _, pixels = rec_batches(line_images())
    want = ctc_decode(decoder.character, *full.run(None, {"x": pixels}))
    got = ctc_decode(decoder.character, *half.run(None, {"x": pixels}))
    assert [text for text, _ in got] == [text for text, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True)) < 0.01

    det = load_rapidocr_config(ocr).Det
    pre = DetPreProcess(det.limit_side_len, det.limit_type, det.mean, det.std)
    det16 = det_model(paths.det, det_lut(pre), tmp_path, fp16=True)
    assert onnx.TensorProto.FLOAT16 in _float_types(det16)
    page = pre.resize(render_page(random_lines(3, 5), width=640, font_size=30))[None]
    (map32,) = create_session(det_model(paths.det, det_lut(pre), tmp_path), choice,
                              ocr).run(None, {"x": page})
    (map16,) = create_session(det16, choice, ocr).run(None, {"x": page})
    assert map16.dtype == np.float32 and map16.shape == map32.shape
    assert float(np.abs(map16 - map32).mean()) < 0.005
    assert ((map16 > 0.3) == (map32 > 0.3)).mean() > 0.995  # the text regions the boxes follow


def test_batch_ctc_decoding_gives_rapidocrs_text_and_scores_exactly() -> None:
    """The engine's batch CTC decoder against RapidOCR's per-line one, float for float: lines
    of blanks, repeats, characters far into the dictionary, and scores on the half-way
    points of 5-decimal rounding (x/64: 0.015625 rounds half-even to 0.01562)."""
    from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

    decoder = CTCLabelDecode(character=[chr(0x4E00 + i) for i in range(18708)])
    rng = np.random.default_rng(3)
    for _ in range(100):
        n, t = int(rng.integers(1, 40)), int(rng.integers(1, 120))
        best = rng.integers(0, 6, (n, t)) * rng.integers(0, 3, (n, t))
        best = np.where(rng.random((n, t)) < 0.3, rng.integers(0, 18710, (n, t)), best)
        best[0] = 0  # a line with no text: score 0.0
        best_prob = rng.random((n, t)).astype(np.float32)
        ties = rng.random((n, t)) < 0.3
        best_prob[ties] = rng.integers(1, 64, int(ties.sum())) / 64
        want, _ = decoder.decode(best, best_prob, remove_duplicate=True)
        assert ctc_decode(decoder.character, best.astype(np.int64), best_prob) == want


def test_the_edited_model_is_cached_by_the_source_hash(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_model_paths(OcrSettings()).rec
    first = rec_model(source, rec_lut(), tmp_path)
    assert first.parent == tmp_path / "models" and first.is_file()

    def no_edit(_source: Path, _edit: object) -> bytes:
        raise AssertionError("an unchanged model must be read back from the cache")

    monkeypatch.setattr(graphs, "_apply", no_edit)
    assert rec_model(source, rec_lut(), tmp_path) == first

    monkeypatch.undo()
    import onnx

    model = onnx.load(str(source))
    model.doc_string = "a retrained model under the same name"
    changed = tmp_path / source.name
    onnx.save(model, str(changed))
    second = rec_model(changed, rec_lut(), tmp_path)
    assert second != first and second.is_file()


def test_an_unwritable_cache_falls_back_to_a_private_folder(tmp_path: Path) -> None:
    source = resolve_model_paths(OcrSettings()).rec
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    path = rec_model(source, rec_lut(), blocked)
    assert path.is_file() and blocked not in path.parents
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [REC_INDEX_OUTPUT, REC_SCORE_OUTPUT]


def test_an_unwritable_cache_leaves_nothing_behind(tmp_path: Path) -> None:
    """Each `ocr-daemon ocr` with an unwritable cache left ~30 MB of edited models in /tmp.
    Now a process's private folder goes when it exits, and one left by a killed process is
    removed by the next."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(blocked), "TMPDIR": str(temp)}
    env.pop("CACHE_DIRECTORY", None)
    script = textwrap.dedent("""
        import sys, time
        from daemon.config import OcrSettings
        from daemon.ocr.graphs import rec_model
        from daemon.ocr.host import rec_lut
        from daemon.ocr.models import resolve_model_paths
        print(rec_model(resolve_model_paths(OcrSettings()).rec, rec_lut()), flush=True)
        if sys.argv[1:] == ["hang"]:
            time.sleep(60)
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and temp in Path(done.stdout.strip()).parents, done.stderr
    assert list(temp.iterdir()) == []  # gone with the process
    killed = subprocess.Popen([sys.executable, "-c", script, "hang"], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert killed.stdout is not None
    left = Path(killed.stdout.readline().strip()).parent
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(10)
    assert left.is_dir()  # a killed process cannot clean up
    again = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert list(temp.iterdir()) == []  # the next one removed it


@pytest.mark.parametrize("provider", PROVIDERS)
def test_edited_detector_sees_the_same_input(provider: str, tmp_path: Path) -> None:
    from rapidocr.ch_ppocr_det.utils import DetPreProcess

    ocr = OcrSettings()
    det = load_rapidocr_config(ocr).Det
    pre = DetPreProcess(det.limit_side_len, det.limit_type, det.mean, det.std)
    source = resolve_model_paths(ocr).det
    choice = choice_for(provider, ocr)
    full = create_session(source, choice, ocr)
    edited = create_session(det_model(source, det_lut(pre), tmp_path), choice, ocr)
    rng = np.random.default_rng(5)
    page = render_page(random_lines(3, 5), width=640, font_size=30)
    page[:40, :40] = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)  # every pixel value
    resized = pre.resize(page)
    (want,) = full.run(None, {"x": pre(page)})  # RapidOCR's own pre-processing on the host
    (got,) = edited.run(None, {"x": resized[None]})
    assert np.array_equal(got, want)
    assert edited.get_inputs()[0].type == "tensor(uint8)"
