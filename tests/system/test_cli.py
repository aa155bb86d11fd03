"""The `radai` command as a person runs it: subprocesses, environment settings, real sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from dicom_node.samples import sample_study_uid
from tests.conftest import free_port, wait_for

RADAI = [sys.executable, "-m", "radai"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    env.update(
        {
            "RADAI_HOME": str(home),
            "RADAI_DICOM_PORT": str(free_port()),
            "RADAI_DICOMWEB_PORT": str(free_port()),
            **extra,
        }
    )
    return env


def _radai(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(RADAI + args, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands():
    out = _radai(["--help"], _env(Path("/nonexistent"))).stdout
    for command in (
        "up",
        "node",
        "worker",
        "dashboard",
        "user",
        "retry",
        "release",
        "measure",
        "demo",
        "send",
        "db",
        "studies",
        "sample",
        "train",
        "evaluate",
        "models",
        "audit",
        "token",
    ):
        assert command in out
    assert "NOT FOR CLINICAL USE" in out


def test_demo_processes_samples_and_studies_json_shows_findings(tmp_path):
    env = _env(tmp_path / "home", RADAI_STABLE_SECONDS="1")
    demo = _radai(["demo", "--exit"], env, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "sent sample study lung2: 61 of 61 instances stored" in demo.stdout
    assert "dashboard: http://127.0.0.1:" in demo.stdout
    assert f"DICOMweb: http://127.0.0.1:{env['RADAI_DICOMWEB_PORT']}/dicomweb" in demo.stdout
    assert "NOT FOR CLINICAL USE" in demo.stdout
    assert "demo login: user 'demo', password '" in demo.stdout
    assert "SEG: " in demo.stdout and "SR: " in demo.stdout

    listing = _radai(["studies", "--json"], env)
    assert listing.returncode == 0, listing.stderr
    studies = {s["study_uid"]: s for s in json.loads(listing.stdout)}
    for case, n in (("lung1", 48), ("lung2", 61)):
        row = studies[sample_study_uid(case)]
        assert row["state"] == "DONE" and row["instances"] == n
        assert row["findings"]["lesions"] and row["priority"] in (1, 2)
        assert {o["modality"] for o in row["outputs"]} == {"SEG", "SR"}
        assert all(Path(o["path"]).exists() for o in row["outputs"])
        assert row["model_versions"] and row["error"] is None
        assert row["flags"] == [] and row["findings"]["pipeline"] in ("models", "baseline")
        lesion = row["findings"]["lesions"][0]
        assert lesion["volume_mm3"] > 0 and lesion["max_2d_axial_diameter_mm"] > 0
    # Patient data stays out of the logs.
    logs = {p.name: p.read_text() for p in (tmp_path / "home" / "logs").glob("*.log")}
    assert set(logs) >= {"demo.log", "worker.log"}
    for text in logs.values():
        assert "DEMO^LUNG" not in text and "RADAI-DEMO" not in text
    assert "stable with 61 instances" in logs["demo.log"]
    assert "DONE: p=" in logs["worker.log"]


def test_node_and_send_commands(tmp_path, samples):
    env = _env(tmp_path / "home", RADAI_STABLE_SECONDS="30", RADAI_AE_TITLE="TRIAGE")
    port = env["RADAI_DICOM_PORT"]
    node = subprocess.Popen(RADAI + ["node"], env=env, stderr=subprocess.PIPE, text=True)
    try:

        def listening() -> bool:
            r = subprocess.run(
                ["/usr/bin/echoscu", "-aec", "TRIAGE", "127.0.0.1", port], capture_output=True
            )
            return r.returncode == 0

        wait_for(listening, timeout=60, interval=0.3)
        sent = _radai(
            ["send", str(samples["lung1"][0].parent), "--to", f"TRIAGE@127.0.0.1:{port}"], env
        )
        assert sent.returncode == 0, sent.stderr
        assert "sent 48 of 48" in sent.stdout
        wrong = _radai(["send", str(samples["lung1"][0]), "--to", f"OTHER@127.0.0.1:{port}"], env)
        assert wrong.returncode == 1 and "association rejected" in wrong.stderr
        table = _radai(["studies"], env).stdout
        assert sample_study_uid("lung1") in table and "RECEIVING" in table

        # DICOMweb beside the node: refused without a token, answering with one.
        web = f"http://127.0.0.1:{env['RADAI_DICOMWEB_PORT']}/dicomweb/studies"
        assert requests.get(web, timeout=30).status_code == 401
        added = subprocess.run(
            RADAI + ["user", "add", "reader", "--role", "radiologist", "--password-stdin"],
            env=env, input="reader-password\n", capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        created = _radai(["token", "create", "reader"], env)
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        found = requests.get(web, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert found.status_code == 200
        assert [s["0020000D"]["Value"][0] for s in found.json()] == [sample_study_uid("lung1")]
        listed = _radai(["token", "list"], env)
        assert "reader" in listed.stdout and token not in listed.stdout
        assert _radai(["token", "revoke", "1"], env).returncode == 0
        refused = requests.get(web, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert refused.status_code == 401
    finally:
        node.terminate()
        node.wait(timeout=30)
    assert node.returncode == 0


def test_bad_settings_are_reported(tmp_path):
    bad = _radai(["studies"], _env(tmp_path, RADAI_EXPORT_TO="not-a-destination"))
    assert bad.returncode != 0
    assert "AET@HOST:PORT" in bad.stderr


@pytest.mark.parametrize("args", [["db", "upgrade"], ["studies"], ["studies", "--json"]])
def test_commands_work_on_an_empty_home(tmp_path, args):
    out = _radai(args, _env(tmp_path / "h"))
    assert out.returncode == 0, out.stderr
    if "--json" in args:
        assert json.loads(out.stdout) == []


def test_studies_json_reads_findings_written_before_their_schema(tmp_path):
    """A job's findings as the worker wrote them before db/findings.py (schema 1: no "schema"
    or "pipeline", lesions without a screener probability) list in today's shape."""
    from db import Job, Study, StudyState
    from db.findings import SCHEMA_VERSION
    from db.session import Database

    env = _env(tmp_path / "home")
    assert _radai(["db", "upgrade"], env).returncode == 0
    lesion = {
        "label": 1,
        "slice_index": 20,
        "volume_mm3": 1361.2,
        "max_3d_diameter_mm": 21.3,
        "max_2d_axial_diameter_mm": 16.6,
        "centroid_zyx": [20.0, 100.5, 200.25],
        "mean_hu": -12.0,
        "location": "left lung, lower zone",
    }
    stored = {
        "screening_probability": 0.91,
        "priority": 1,
        "lung_volume_ml": 5100.0,
        "lesions": [lesion],
        "series_uid": "1.2.3.4.5",
    }
    db = Database(f"sqlite:///{tmp_path / 'home' / 'radai.sqlite'}")
    with db.session() as s:
        study = Study(study_uid="1.2.826.0.1.3680043.8.498.55", state=StudyState.DONE)
        study.instance_count, study.priority = 48, 1
        s.add(study)
        s.flush()
        s.add(
            Job(
                study_id=study.id,
                pipeline="radai-triage",
                pipeline_version="0.9.0",
                input_hash="x",
                state=StudyState.DONE,
                findings=stored,
                model_versions={"radai-lung-lesion-unet": "1.0.0"},
            )
        )
    db.dispose()
    listing = _radai(["studies", "--json"], env)
    assert listing.returncode == 0, listing.stderr
    [row] = json.loads(listing.stdout)
    assert {
        "study_uid",
        "state",
        "instances",
        "priority",
        "findings",
        "outputs",
        "model_versions",
        "error",
        "flags",
    } <= set(row)
    assert (row["state"], row["instances"], row["priority"]) == ("DONE", 48, 1)
    findings = row["findings"]
    assert findings["schema"] == SCHEMA_VERSION and findings["pipeline"] is None
    assert findings["screening_probability"] == 0.91 and findings["series_uid"] == "1.2.3.4.5"
    [listed] = findings["lesions"]
    # what a schema-1 row never had reads as absent (null), not invented
    absent = ("screening_probability", "malignancy_score", "tracking_uid", "tracking_id", "change")
    assert listed == {**lesion, **dict.fromkeys(absent)}
    assert findings["prior_study_uid"] is None and findings["follow_up"] == {}
    assert row["model_versions"] == {"radai-lung-lesion-unet": "1.0.0"} and row["flags"] == []
    table = _radai(["studies"], env)
    assert table.returncode == 0 and "1.2.826.0.1.3680043.8.498.55" in table.stdout


# pyradiomics 3.0.1's published values for the expert masks (data/samples, see its README).
REFERENCE = {
    "lung1": {
        "voxel_volume_mm3": 1361.20,
        "max_3d_diameter_mm": 21.34,
        "max_2d_axial_diameter_mm": 16.63,
        "mesh_volume_mm3": 1330.98,
    },
    "lung2": {
        "voxel_volume_mm3": 48434.11,
        "max_3d_diameter_mm": 68.98,
        "max_2d_axial_diameter_mm": 55.80,
        "mesh_volume_mm3": 48292.52,
    },
}


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_measure_command_matches_pyradiomics(tmp_path, case):
    from dicom_node.samples import SAMPLES_DIR

    out = _radai(
        [
            "measure",
            str(SAMPLES_DIR / f"{case}_image.nrrd"),
            str(SAMPLES_DIR / f"{case}_label.nrrd"),
            "--json",
        ],
        _env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    [region] = json.loads(out.stdout)
    for key, expected in REFERENCE[case].items():
        assert region[key] == pytest.approx(expected, rel=0.01), key
    assert -1000 < region["mean_hu"] < 200
    text = _radai(
        [
            "measure",
            str(SAMPLES_DIR / f"{case}_image.nrrd"),
            str(SAMPLES_DIR / f"{case}_label.nrrd"),
        ],
        _env(tmp_path),
    )
    assert text.returncode == 0 and text.stdout.startswith("label 1: volume ")


def test_retry_refuses_unknown_study(tmp_path):
    out = _radai(["retry", "1.2.3.4"], _env(tmp_path / "h"))
    assert out.returncode == 1 and "no study 1.2.3.4" in out.stderr


def test_user_add_and_dashboard_serves(tmp_path):
    import urllib.request

    env = _env(tmp_path / "h", RADAI_DASHBOARD_PORT=str(free_port()))
    add = subprocess.run(
        RADAI + ["user", "add", "alice", "--role", "radiologist", "--password-stdin"],
        input="correct horse battery\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert add.returncode == 0 and "user alice added" in add.stdout, add.stderr
    again = subprocess.run(
        RADAI + ["user", "add", "alice", "--role", "admin", "--password-stdin"],
        input="another password\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1
    dash = subprocess.Popen(
        RADAI + ["dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{env['RADAI_DASHBOARD_PORT']}/_stcore/health"
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as rsp:
                    return rsp.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=60, interval=0.5)
    finally:
        dash.terminate()
        dash.wait(timeout=30)


def test_train_on_a_folder_without_the_real_data_is_a_clear_error(tmp_path):
    env = _env(tmp_path)
    args = ["train", "segment", "--data", str(tmp_path / "nothing"), "--anatomies", "lung1"]
    r = _radai([*args, "--registry", str(tmp_path / "registry"), "--quiet"], env)
    assert r.returncode != 0
    assert "radai train: no such background file" in r.stderr and "Traceback" not in r.stderr
    r = _radai(["train", "segment", "--anatomies", "lung9", "--quiet"], env)
    assert r.returncode != 0 and "unknown anatomies" in r.stderr
    r = _radai(["train", "cad-rerank", "--data", str(tmp_path), "--anatomies", "lung9"], env)
    assert r.returncode != 0 and "unknown anatomies" in r.stderr
    r = _radai(["train", "cad-rerank", "--data", str(tmp_path / "nothing")], env)
    assert r.returncode != 0 and "radai train:" in r.stderr and "Traceback" not in r.stderr
    r = _radai(
        ["train", "segment", "--device", "cuda:0", "--quiet"], env | {"CUDA_VISIBLE_DEVICES": ""}
    )
    assert r.returncode != 0 and "CUDA" in r.stderr


@pytest.mark.slow
# Two trainings (a shipped model and two folds each) and an evaluation, in subprocesses: minutes
# of CPU, past the suite's 300 s default when the machine's two cores are busy.
@pytest.mark.timeout(1200)
def test_train_then_evaluate_from_the_command_line(tmp_path):
    """A tiny run of both commands into a scratch registry: weights, cards, folds, report."""
    env = _env(tmp_path)
    registry = tmp_path / "registry"
    for task in ("segment", "screen"):
        r = _radai(
            ["train", task, "--source", "synthetic", "--steps", "3", "--studies", "4"]
            + ["--registry", str(registry), "--quiet"],
            env,
            600,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("wrote ") == 3  # shipped model and two held-out-patient folds
    cards = sorted(registry.glob("*/*/card.json"))
    assert len(cards) == 2
    for name in ("radai-lung-lesion-unet/1.0.0", "radai-lesion-screen-cnn/2.0.0"):
        log = registry / name / "training-all.jsonl"
        assert json.loads(log.read_text().splitlines()[-1])["step"] == 3
    out = tmp_path / "report"
    r = _radai(
        [
            "evaluate",
            "--registry",
            str(registry),
            "--out",
            str(out),
            "--studies",
            "2",
            "--robust",
            "0",
        ],
        env,
        900,
    )
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    assert {(row["case"], row["method"]) for row in results["real"]} == {
        (case, method)
        for case in ("lung1", "lung2")
        for method in ("model, patient held out", "shipped model", "baseline")
    }
    assert results["synthetic"]["clean"]["baseline"]["studies"] == 4
    report = (out / "report.md").read_text()
    assert "Real expert-labelled tumours" in report and "NOT FOR CLINICAL USE" in report
    for png in ("roc.png", "dice.png", "overlays.png"):
        assert (out / png).stat().st_size > 1000
    card = (registry / "radai-lung-lesion-unet/1.0.0/card.md").read_text()
    assert "synthetic held-out patient" in card and "NOT FOR CLINICAL USE" in card
    # Model settings are checked at start for the pipeline that uses them (and the malignancy
    # model for either pipeline), not on the first study.
    bad = _radai(["worker"], _env(tmp_path, RADAI_PIPELINE="models", RADAI_SEGMENT_MODEL="nope@0"))
    assert bad.returncode != 0 and "bad model setting" in bad.stderr
    bad = _radai(["worker"], _env(tmp_path, RADAI_MALIGNANCY_MODEL="nope@0"))
    assert bad.returncode != 0 and "bad model setting" in bad.stderr
