"""RADAI_PIPELINE: the default is the pipeline the unseen-patient report shows better, and a name
that is no pipeline is refused at start, not on the first study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from radai.settings import DEFAULT_PIPELINE, Settings
from tests.kit.paths import REPO
from workers.pipeline.analysers import PIPELINES, BaselineAnalyser, make_analyser


def test_default_is_the_one_the_unseen_patient_evaluation_chose(monkeypatch):
    monkeypatch.delenv("RADAI_PIPELINE", raising=False)
    assert Settings().pipeline == DEFAULT_PIPELINE
    unseen = json.loads(Path(REPO / "docs" / "models" / "unseen.json").read_text())
    assert unseen["verdict"]["default"] == DEFAULT_PIPELINE


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_is_accepted(monkeypatch, name):
    monkeypatch.setenv("RADAI_PIPELINE", name)
    assert Settings().pipeline == name


def test_an_unknown_pipeline_is_refused(monkeypatch):
    monkeypatch.setenv("RADAI_PIPELINE", "magic")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(ValueError, match="unknown pipeline"):
        make_analyser("magic")


def test_baseline_needs_no_model_files():
    assert isinstance(make_analyser("baseline"), BaselineAnalyser)


def test_cad_loads_its_candidate_classifier_from_the_registry():
    from workers.pipeline.analysers import CadAnalyser

    analyser = make_analyser("cad")
    assert isinstance(analyser, CadAnalyser) and analyser.model.task == "cad"
    # The second stage decides which nodules are reported: the SR names it as the scorer.
    assert analyser.reranker is not None and analyser.reranker.task == "cad-rerank"
    assert analyser.screening_algorithm == (analyser.reranker.name, analyser.reranker.version)
    assert analyser.tag.startswith("cad-")


def test_the_cad_outliner_default_is_the_registrys_and_radai_models_shows_it(monkeypatch, capsys):
    from ml.runtime import registry
    from radai.cli import cmd_models

    monkeypatch.delenv("RADAI_CAD_OUTLINER", raising=False)
    assert Settings().cad_outliner == registry.CAD_OUTLINER == registry.DEFAULT_REFS["outline"]
    assert cmd_models(None, Settings()) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "radai-nodule-outline-unet@1.0.0  task=outline" in out
    assert "cad-outliner=radai-nodule-outline-unet@1.0.0" in out
    monkeypatch.setenv("RADAI_CAD_OUTLINER", "classical")
    assert cmd_models(None, Settings()) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "cad-outliner=classical" in out


def test_the_cad_second_stage_default_is_the_registrys_and_none_turns_it_off(monkeypatch, capsys):
    from ml.runtime import registry
    from radai.cli import cmd_models

    monkeypatch.delenv("RADAI_CAD_RERANKER", raising=False)
    assert Settings().cad_reranker == registry.CAD_RERANKER
    assert cmd_models(None, Settings()) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "radai-nodule-cad-rerank@1.0.0  task=cad-rerank" in out
    assert "cad-reranker=radai-nodule-cad-rerank@1.0.0" in out
    monkeypatch.setenv("RADAI_CAD_RERANKER", "none")
    monkeypatch.setenv("RADAI_PIPELINE", "cad")
    analyser = make_analyser("cad", cad_reranker=Settings().cad_reranker)
    assert analyser.reranker is None
