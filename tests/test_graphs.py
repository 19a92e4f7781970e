"""The recogniser reduced on the device: the same text and scores as decoding the full
probabilities, from ~1/6000 of the bytes; the edited model cached by the source's hash."""

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
from daemon.ocr.batch import _resize_norm_rec
from daemon.ocr.graphs import REC_INDEX_OUTPUT, REC_SCORE_OUTPUT, reduced_rec_model
from daemon.ocr.models import resolve_model_paths
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


def rec_batch(images: list[BgrImage]) -> np.ndarray[Any, np.dtype[np.float32]]:
    needed = [buckets.rec_needed_width(im.shape[0], im.shape[1]) for im in images]
    batch = np.zeros((len(images), 3, buckets.REC_HEIGHT, max(needed)), np.float32)
    for k, (image, width) in enumerate(zip(images, needed, strict=True)):
        _resize_norm_rec(image, width, batch[k])
    return batch


@pytest.mark.parametrize("provider", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not CUDA_READY, reason="needs an NVIDIA GPU and onnxruntime-gpu")]),
])
def test_reduced_recogniser_gives_the_same_text_and_scores(provider: str, tmp_path: Path) -> None:
    from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

    ocr = OcrSettings(lang="ch")
    source = resolve_model_paths(ocr).rec
    choice = choice_for(provider, ocr)
    full = create_session(source, choice, ocr)
    reduced = create_session(reduced_rec_model(source, tmp_path), choice, ocr)
    assert provider_name(reduced) == provider
    assert [o.name for o in reduced.get_outputs()] == [REC_INDEX_OUTPUT, REC_SCORE_OUTPUT]
    character = full.get_modelmeta().custom_metadata_map["character"].splitlines()
    decoder = CTCLabelDecode(character=character)

    batch = rec_batch(line_images())
    (probs,) = full.run(None, {"x": batch})
    want, _ = decoder(probs)  # what RapidOCR's CTCLabelDecode gives from the probabilities
    best, best_prob = reduced.run(None, {"x": batch})
    got, _ = decoder.decode(best, best_prob, remove_duplicate=True)

    assert got == want
    assert "包裹送到北门" in want[-2][0] and all(text for text, _ in want)
    assert probs.nbytes > 5000 * (best.nbytes + best_prob.nbytes)


def test_the_edited_model_is_cached_by_the_source_hash(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_model_paths(OcrSettings()).rec
    first = reduced_rec_model(source, tmp_path)
    assert first.parent == tmp_path / "models" and first.is_file()

    def no_edit(_source: Path) -> bytes:
        raise AssertionError("an unchanged model must be read back from the cache")

    monkeypatch.setattr(graphs, "_reduce_rec", no_edit)
    assert reduced_rec_model(source, tmp_path) == first

    monkeypatch.undo()
    import onnx

    model = onnx.load(str(source))
    model.doc_string = "a retrained model under the same name"
    changed = tmp_path / source.name
    onnx.save(model, str(changed))
    second = reduced_rec_model(changed, tmp_path)
    assert second != first and second.is_file()


def test_an_unwritable_cache_falls_back_to_a_private_folder(tmp_path: Path) -> None:
    source = resolve_model_paths(OcrSettings()).rec
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    path = reduced_rec_model(source, blocked)
    assert path.is_file() and blocked not in path.parents
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [REC_INDEX_OUTPUT, REC_SCORE_OUTPUT]
