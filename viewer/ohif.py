"""OHIF's static build as Starlette routes: its files, radai's `app-config.js`, and index.html
for every other path (OHIF routes in the browser: `/viewer?StudyInstanceUIDs=...`)."""

from __future__ import annotations

import json
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

OHIF_VERSION = "3.13.2"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "var" / "ohif"

# The one data source: this origin's DICOMweb. Relative roots keep it right behind a proxy that
# serves radai under another host name. radai's WADO-RS answers /metadata and /frames, so OHIF
# need not guess (no static WADO, no fuzzy matching, includefield unsupported).
_DATA_SOURCE = {
    "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
    "sourceName": "radai",
    "configuration": {
        "friendlyName": "radai DICOMweb",
        "name": "radai",
        "qidoRoot": "{root}",
        "wadoRoot": "{root}",
        "wadoUriRoot": "{root}",
        "qidoSupportsIncludeField": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "staticWado": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
    },
}


# OHIF 3.13.2's SR loader (extension cornerstone-dicom-sr, `_checkIfCanAddMeasurementsToDisplaySet`)
# reads the image coordinates of every measurement group, and a group with none (radai's lung
# volume, its screening probability: nothing to draw) throws "Cannot read properties of undefined
# (reading 'ReferencedSOPSequence')", which takes the whole viewer down. Its
# `onBeforeSRAddMeasurement` hook runs just before that read: for such a measurement it returns
# a copy with an empty coordinate, which the loader passes over, and marks the measurement
# placed. Marked, it is not offered to the next display set either, where the loader would fail
# on a SEG whose overlay is shown ("Cannot destructure property 'SOPInstanceUID'", OHIF PR
# #6278) if any measurement were still waiting. Measurements with coordinates are untouched.
_SR_WITHOUT_COORDINATES = """\
window.config.customizationService.onBeforeSRAddMeasurement = {
  $set: function radaiSkipSRGroupsWithoutCoordinates({ measurement }) {
    if (measurement.coords && measurement.coords.length) {
      return measurement;
    }
    measurement.loaded = true; // nothing to draw: not offered to other display sets
    return Object.assign({}, measurement, { coords: [{}] });
  },
};
"""


def app_config_js(dicomweb_root: str = "/dicomweb") -> str:
    """OHIF's `window.config`: radai's DICOMweb as the only data source, the study list shown,
    nothing loaded from URLs (no dynamic config, no customization files); and one customization,
    so that OHIF's SR reader skips measurement groups without image coordinates instead of
    failing on them (see _SR_WITHOUT_COORDINATES)."""
    source = json.loads(json.dumps(_DATA_SOURCE).replace("{root}", dicomweb_root.rstrip("/")))
    config = {
        "name": "radai",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "radai",
        "dataSources": [source],
    }
    return (
        "// Written by radai (viewer/ohif.py): OHIF reads radai's DICOMweb on this origin.\n"
        f"window.config = {json.dumps(config, indent=2)};\n" + _SR_WITHOUT_COORDINATES
    )


def dist_of(ohif_dir: Path) -> Path | None:
    """The folder holding OHIF's index.html under `ohif_dir` (the unpacked package's dist/), or
    None when setup has not fetched it."""
    for candidate in (ohif_dir / "dist", ohif_dir):
        if (candidate / "index.html").is_file():
            return candidate
    return None


class _Spa(StaticFiles):
    """A file when there is one; otherwise index.html, since OHIF's paths are client routes."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            if exc.status_code != 404 or Path(path).suffix:
                raise
            return await super().get_response("index.html", scope)


def routes(dist: Path, dicomweb_root: str = "/dicomweb") -> list[BaseRoute]:
    """Routes to append after DICOMweb's: radai's config, then OHIF's files and client routes."""
    config = app_config_js(dicomweb_root)

    def app_config(_: Request) -> Response:
        return Response(config, media_type="text/javascript", headers={"Cache-Control": "no-store"})

    def licence(_: Request) -> Response:
        return FileResponse(dist.parent / "LICENSE", media_type="text/plain")

    static = _Spa(directory=dist, html=True)
    return [
        Route("/app-config.js", app_config, methods=["GET"]),
        Route("/ohif-LICENSE.txt", licence, methods=["GET"]),
        _CatchAll(static),
    ]


class _CatchAll(BaseRoute):
    """Every GET not matched before it goes to the static app (a Mount at "/" would also take
    /dicomweb's 404s and 405s, which must stay DICOMweb's)."""

    def __init__(self, app: StaticFiles) -> None:
        self.app = app

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            if path != "/dicomweb" and not path.startswith("/dicomweb/"):
                return Match.FULL, {}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
