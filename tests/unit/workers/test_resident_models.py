"""A worker process loads its models once and keeps them (on their device) for every study; the
analyser passes the batch size of RADAI_INFER_BATCH, or the device's, to the inference."""

from __future__ import annotations

import numpy as np
import pytest

from ml.runtime import inference, registry
from workers.models import load_grader
from workers.pipeline.analysers import ModelsAnalyser, make_analyser

REFS = registry.DEFAULT_REFS["segment"], registry.DEFAULT_REFS["screen"]


def test_a_worker_loads_its_models_once_and_keeps_them() -> None:
    first = make_analyser("models", *REFS, "cpu")
    again = make_analyser("models", *REFS, "cpu", batch=8)  # the next study's
    assert isinstance(first, ModelsAnalyser) and isinstance(again, ModelsAnalyser)
    assert again.models.segmenter.net is first.models.segmenter.net  # not loaded again
    assert again.models.screener.net is first.models.screener.net
    grader = load_grader(registry.DEFAULT_REFS["malignancy"], "cpu")
    assert grader is load_grader(registry.DEFAULT_REFS["malignancy"], "cpu")


class _Seen(Exception):
    """Raised by the stand-in inference: the batch it was given is all this test needs."""


def test_the_analyser_runs_the_models_in_its_batches(monkeypatch) -> None:
    seen: list[int] = []

    def fake_analyse(volume, spacing, segmenter, screener, batch=0):  # noqa: ANN001, ANN202
        seen.append(batch)
        raise _Seen

    monkeypatch.setattr(inference, "analyse", fake_analyse)
    vol = np.zeros((2, 8, 8), dtype=np.float32)
    for setting, expected in ((0, inference.CPU_BATCH), (8, 8)):
        analyser = make_analyser("models", *REFS, "cpu", batch=setting)
        with pytest.raises(_Seen):
            analyser.analyse(vol, (1.0, 1.0, 1.0))
        assert seen[-1] == expected


def test_a_cad_worker_draws_with_the_configured_outliner_or_classically() -> None:
    ref = registry.DEFAULT_REFS["outline"]
    drawn = make_analyser("cad", cad_outliner=ref)
    assert drawn.outliner is not None and drawn.outliner.task == "outline"
    assert drawn.versions == {
        "radai-nodule-cad-cnn": "2.2.0",
        "radai-nodule-outline-unet": "1.0.0",
        "radai-nodule-cad-rerank": "1.0.0",
    }
    assert make_analyser("cad", cad_outliner=ref).outliner is drawn.outliner  # loaded once
    assert make_analyser("cad").reranker is drawn.reranker
    classical = make_analyser("cad", cad_outliner="classical", cad_reranker="none")
    assert classical.outliner is None and classical.reranker is None
    assert list(classical.versions) == ["radai-nodule-cad-cnn"]
    with pytest.raises(registry.ModelError, match="not outline"):
        make_analyser("cad", cad_outliner=registry.DEFAULT_REFS["cad"])
    with pytest.raises(registry.ModelError, match="not cad-rerank"):
        make_analyser("cad", cad_reranker=registry.DEFAULT_REFS["cad"])
