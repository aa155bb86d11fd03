"""OHIF's routes beside a stand-in /dicomweb: radai's config, OHIF's files, its client routes, and
/dicomweb left alone."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from tests.kit.asgi import Client, serve
from viewer import ohif


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    dist = tmp_path / "ohif" / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<html>OHIF</html>")
    (dist / "app-config.js").write_text("window.config = {public: 'demo server'};")
    (dist / "assets" / "logo.svg").write_text("<svg/>")
    (tmp_path / "ohif" / "LICENSE").write_text("The MIT License (MIT)")
    assert ohif.dist_of(tmp_path / "ohif") == dist
    web = [Route("/studies", lambda r: PlainTextResponse("qido"), methods=["GET"])]
    app = Starlette(routes=[Mount("/dicomweb", routes=web), *ohif.routes(dist)])
    with serve(app) as c:
        yield c


def test_radai_config_replaces_the_packaged_one(client: Client) -> None:
    js = client.get("/app-config.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "demo server" not in js.text
    assert '"qidoRoot": "/dicomweb"' in js.text and '"wadoRoot": "/dicomweb"' in js.text
    assert '"defaultDataSourceName": "radai"' in js.text
    assert "dangerouslyUseDynamicConfig" not in js.text


def test_files_client_routes_and_the_licence(client: Client) -> None:
    assert client.get("/assets/logo.svg").text == "<svg/>"
    for path in ("/", "/viewer", "/segmentation?StudyInstanceUIDs=1.2.3"):
        page = client.get(path)
        assert page.status_code == 200 and page.text == "<html>OHIF</html>", path
    assert client.get("/missing.js").status_code == 404  # a missing file is not the app
    assert "MIT" in client.get("/ohif-LICENSE.txt").text


def test_dicomweb_paths_stay_dicomweb(client: Client) -> None:
    assert client.get("/dicomweb/studies").text == "qido"
    assert client.get("/dicomweb/nothing-here").status_code == 404
    assert client.post("/viewer").status_code in (404, 405)


def test_no_build_means_no_viewer(tmp_path: Path) -> None:
    assert ohif.dist_of(tmp_path) is None


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_config_makes_ohif_skip_sr_groups_without_image_coordinates(tmp_path: Path) -> None:
    # The config runs as OHIF would load it; its SR hook is then called as OHIF 3.13.2's loader
    # calls it, once with a drawable measurement and once with one that has no coordinates.
    script = tmp_path / "check.js"
    script.write_text(
        "const window = {};\n"
        + ohif.app_config_js()
        + """
const hook = window.config.customizationService.onBeforeSRAddMeasurement.$set;
const line = { loaded: false, coords: [{ GraphicType: 'POLYLINE' }] };
const lung = { loaded: false, coords: [], TrackingIdentifier: 'Lung' };
const seen = [hook({ measurement: line }), hook({ measurement: lung })];
console.log(JSON.stringify({ line, lung, seen, same: seen[0] === line }));
"""
    )
    run = subprocess.run([NODE, str(script)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    # Drawable: handed back as it is, still waiting for its image.
    assert out["same"] and out["line"] == {"loaded": False, "coords": [{"GraphicType": "POLYLINE"}]}
    # Not drawable: marked placed, so no other display set is offered it; the loader gets a
    # copy with one empty coordinate (no ReferencedSOPSequence: it moves on).
    assert out["lung"] == {"loaded": True, "coords": [], "TrackingIdentifier": "Lung"}
    assert out["seen"][1] == {"loaded": True, "coords": [{}], "TrackingIdentifier": "Lung"}
