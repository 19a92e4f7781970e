"""The faster DB post-processing against RapidOCR's own, box for box and score for score."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from rapidocr.ch_ppocr_det.utils import DBPostProcess

from daemon.config import OcrSettings
from daemon.ocr.boxes import FastDBPostProcess
from daemon.ocr.models import load_rapidocr_config


def probability_map(seed: int, h: int, w: int) -> np.ndarray:
    """A detector-like map: text-line blobs, upright and turned, long and tiny, some cut by
    the border, with soft edges and uneven strength, over faint noise."""
    rng = np.random.default_rng(seed)
    prob = (rng.random((h, w)) * 0.2).astype(np.float32)
    for _ in range(int(rng.integers(5, 60))):
        cx, cy = float(rng.uniform(-10, w + 10)), float(rng.uniform(-10, h + 10))
        length, thick = float(rng.uniform(2, w / 2)), float(rng.uniform(1, 30))
        angle = float(rng.choice([0.0, 0.0, 90.0, rng.uniform(-40, 40)]))
        corners = cv2.boxPoints(((cx, cy), (length, thick), angle)).astype(np.int32)
        cv2.fillPoly(prob, [corners], float(rng.uniform(0.35, 1.0)))
    prob = cv2.GaussianBlur(prob, (5, 5), 0)
    return prob[None, None]


@pytest.mark.parametrize("use_dilation", [False, True])
def test_fast_db_post_processing_gives_rapidocrs_boxes_and_scores(use_dilation: bool) -> None:
    det = load_rapidocr_config(OcrSettings()).Det
    params = {"thresh": det.thresh, "box_thresh": det.box_thresh,
              "max_candidates": det.max_candidates, "unclip_ratio": det.unclip_ratio,
              "use_dilation": use_dilation, "score_mode": det.score_mode}
    ours, theirs = FastDBPostProcess(**params), DBPostProcess(**params)
    found = turned = 0
    for seed in range(40):
        h, w = [(960, 448), (640, 960), (256, 256), (1408, 960)][seed % 4]
        prob = probability_map(seed, h, w)
        shape = (int(h * [1, 1.7, 0.6, 2.3][seed % 4]), int(w * [1, 1.3, 0.9, 2.1][seed % 4]))
        want_boxes, want_scores = theirs(prob, shape)
        got_boxes, got_scores = ours(prob, shape)
        assert got_boxes.shape == want_boxes.shape and np.array_equal(got_boxes, want_boxes)
        assert got_boxes.dtype == want_boxes.dtype
        assert got_scores == want_scores
        found += len(want_boxes)
        turned += sum(1 for box in want_boxes if len(set(box[:, 0].tolist())) > 2)
    assert found > 200 and turned > 20  # the maps did have text, upright and turned
