"""The DICOMweb ASGI app: routes under /dicomweb, authentication on each, and every client
error answered with its PS3.18 status and a plain-text reason (never a traceback).

Handlers that read the database or the archive are plain functions, which Starlette runs in its
thread pool; the log carries method, route, status and user, never a query string (it can hold
a patient's name).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from db import audit
from db.audit_actions import AuditAction
from db.session import Database
from dicomweb import index, multipart, qido, stow, wado
from dicomweb.auth import READ, STORE, Principal, identify, require
from dicomweb.errors import HttpError, bad_request, not_acceptable

log = logging.getLogger("radai.dicomweb")

ROOT = "/dicomweb"
DICOM_JSON = "application/dicom+json"


@dataclass
class Service:
    """What the routes need: the index, the node's store path and the access rule."""

    db: Database
    store: stow.Store | None
    anonymous: bool = False
    max_request_bytes: int = 2 * 1024**3
    public_url: str | None = None  # the root behind a proxy; None: as each request reached it


def _base(request: Request) -> str:
    """The service root as the client reached it, for RetrieveURLs and BulkDataURIs."""
    public = getattr(request.app.state, "public_url", None)
    if public:
        return str(public).rstrip("/")
    url = request.url
    port = url.port
    server = request.scope.get("server")
    if port is None and server:
        # Some clients (dicomweb-client among them) send a Host header without the port.
        port = server[1]
    default = {"http": 80, "https": 443}.get(url.scheme)
    netloc = url.hostname or "localhost"
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if port and port != default:
        netloc += f":{port}"
    return f"{url.scheme}://{netloc}{ROOT}"


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    return Response(body, status, headers=headers, media_type=DICOM_JSON)


def _check_json_accept(request: Request) -> None:
    accept = request.headers.get("accept")
    if not accept:
        return
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return
    raise not_acceptable(f"this resource is {DICOM_JSON}, not {accept!r}")


def _multipart(parts: list[multipart.Part], part_type: str) -> Response:
    body, content_type = multipart.build(parts, part_type)
    return Response(body, 200, headers={"Content-Type": content_type})


def _studies_named(answers: list[dict], study: str | None) -> list[str]:
    """The distinct Study Instance UIDs of QIDO answers (from the attribute, else the
    RetrieveURL), or the one the path names."""
    if study:
        return [study] if answers else []
    found: dict[str, None] = {}
    for doc in answers:
        uid = (doc.get("0020000D", {}).get("Value") or [None])[0]
        if uid is None:
            url = (doc.get("00081190", {}).get("Value") or [""])[0]
            _, sep, rest = url.partition("/studies/")
            uid = rest.split("/")[0] if sep else None
        if uid:
            found[str(uid)] = None
    return list(found)


class App:
    """Routes bound to one `Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def principal(self, request: Request, what: str) -> Principal:
        authorization = request.headers.get("authorization")
        try:
            who = identify(self.service.db, authorization, anonymous=self.service.anonymous)
            require(who, what)
        except HttpError as exc:
            # A request without credentials is only logged; a wrong token or a role that may
            # not do this is audited, as a failed dashboard login is.
            if authorization or exc.status == 403:
                self._audit_denied(request, exc)
            raise
        return who

    def _audit_denied(self, request: Request, exc: HttpError) -> None:
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        with self.service.db.session() as s:
            audit.append(
                s,
                "dicomweb",
                AuditAction.DICOMWEB_REFUSED,
                request.path_params.get("study"),
                {
                    "peer": peer,
                    "status": exc.status,
                    "reason": exc.reason,
                    "request": f"{request.method} {request.url.path}",
                },
            )

    def _audit_read(
        self,
        request: Request,
        who: Principal,
        what: str,
        count: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Who retrieved which study's instances, metadata, frames, bulk data or renderings
        (UIDs and counts, never a value of the instances)."""
        p = request.path_params
        with self.service.db.session() as s:
            audit.append(
                s,
                who.actor,
                AuditAction.DICOMWEB_RETRIEVED,
                p["study"],
                {
                    "what": what,
                    "series": p.get("series"),
                    "instance": p.get("instance"),
                    "instances": count,
                    **(extra or {}),
                },
            )

    def _audit_search(
        self, request: Request, who: Principal, level: str, answers: list[dict], more: bool
    ) -> None:
        """Who searched at which level and which studies the answer named. The query's values
        can hold a patient's name or ID, so only its parameter names are kept."""
        p = request.path_params
        params = sorted({name[:64] for name, _ in request.query_params.multi_items()})[:50]
        with self.service.db.session() as s:
            audit.append(
                s,
                who.actor,
                AuditAction.DICOMWEB_SEARCHED,
                p.get("study"),
                {
                    "level": level,
                    "series": p.get("series"),
                    "params": params,
                    "matches": len(answers),
                    "more": more,
                    "studies": _studies_named(answers, p.get("study")),
                },
            )

    # QIDO-RS ---------------------------------------------------------------------------------

    def search(self, request: Request, level: str) -> Response:
        who = self.principal(request, READ)
        _check_json_accept(request)
        p = request.path_params
        query = qido.parse_query(list(request.query_params.multi_items()))
        study, series_uid = p.get("study"), p.get("series")
        spans: tuple[str, ...] = ()
        if level == qido.SERIES and not study:
            spans = (qido.STUDY,)
        elif level == qido.INSTANCE:
            spans = (qido.SERIES,) if study else (qido.STUDY, qido.SERIES)
        matches, more = index.search(self.service.db, query, level, study, series_uid)
        tags = qido.answer_tags(level, query, spans=spans)
        # The stored answers hold the level's fields: a page that asks for nothing else is
        # answered without reading a file.
        from_index = not query.include_all and tags <= index.answerable(level)
        base = _base(request)
        out: list[dict] = []
        for m in matches:
            url = f"{base}/studies/{m.study_uid}"
            if level != qido.STUDY:
                url += f"/series/{m.series_uid}"
            if level == qido.INSTANCE:
                url += f"/instances/{m.sop_uid}"
            extra = {**m.extra, "RetrieveURL": url}
            if from_index and m.stored is not None:
                out.append(qido.answer_from_json(m.stored, tags, extra))
            else:
                out.append(qido.answer(index.header(m.path), query, tags, extra))
        headers = {}
        if more:
            headers["Warning"] = '299 radai "There are additional results that can be requested"'
        self._audit_search(request, who, level, out, more)
        return _json(out, headers=headers)

    # WADO-RS ---------------------------------------------------------------------------------

    def _stored(self, request: Request) -> list[index.StoredInstance]:
        p = request.path_params
        return index.stored(self.service.db, p["study"], p.get("series"), p.get("instance"))

    def retrieve(self, request: Request) -> Response:
        """Instances as multipart/related, sent while they are read (and transcoded) one at a
        time; refusals (404, 406) are decided before the first byte."""
        who = self.principal(request, READ)
        instances = self._stored(request)
        choices = multipart.acceptable(request.headers.get("accept"), wado.DICOM)
        parts = wado.retrieve(instances, choices)
        self._audit_read(request, who, "instances", len(instances))
        boundary = multipart.new_boundary()
        return StreamingResponse(
            multipart.stream(parts, boundary),
            200,
            headers={"Content-Type": multipart.content_type(wado.DICOM, boundary)},
        )

    def metadata(self, request: Request) -> Response:
        who = self.principal(request, READ)
        _check_json_accept(request)
        base = _base(request)
        docs = [wado.metadata(inst, base) for inst in self._stored(request)]
        self._audit_read(request, who, "metadata", len(docs))
        return _json(docs)

    def frames(self, request: Request) -> Response:
        who = self.principal(request, READ)
        numbers = wado.parse_frames(request.path_params["frames"])
        (inst,) = self._stored(request)
        choices = multipart.acceptable(request.headers.get("accept"), wado.OCTETS)
        parts = wado.frames(inst, numbers, choices)
        self._audit_read(request, who, "frames", 1, {"frames": len(numbers)})
        return _multipart(parts, parts[0].content_type.split(";")[0])

    def bulk(self, request: Request) -> Response:
        who = self.principal(request, READ)
        try:
            tag = int(request.path_params["tag"], 16)
        except ValueError:
            raise bad_request("a bulk data URI ends in a tag of eight hex digits") from None
        (inst,) = self._stored(request)
        choices = multipart.acceptable(request.headers.get("accept"), wado.OCTETS)
        part = wado.bulk(inst, tag, choices)
        self._audit_read(request, who, "bulk", 1, {"tag": f"{tag:08X}"})
        return _multipart([part], wado.OCTETS)

    def rendered(self, request: Request, thumbnail: bool = False) -> Response:
        who = self.principal(request, READ)
        media = wado.rendered_type(request.headers.get("accept"))
        instances = self._stored(request)
        inst = instances[len(instances) // 2]  # a study's or series' middle image stands for it
        frame = 1
        if "frames" in request.path_params:
            numbers = wado.parse_frames(request.path_params["frames"])
            if len(numbers) != 1:
                raise bad_request("render one frame at a time")
            frame = numbers[0]
        params = dict(request.query_params)
        image = wado.render(inst, media, params, frame=frame, thumbnail=thumbnail)
        what = "thumbnail" if thumbnail else "rendered"
        self._audit_read(request, who, what, 1, {"rendered": inst.sop_uid, "frame": frame})
        return Response(image, 200, media_type=media)

    # STOW-RS ---------------------------------------------------------------------------------

    async def store(self, request: Request) -> Response:
        who = await run_in_threadpool(self.principal, request, STORE)
        if self.service.store is None:
            raise HttpError(405, "this service does not store")
        study_uid = request.path_params.get("study")
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        size = int(request.headers.get("content-length") or 0)
        if size > self.service.max_request_bytes:
            raise HttpError(413, f"request of {size} bytes exceeds the limit")
        body = await request.body()
        try:
            declared, parts = multipart.parse(body, request.headers.get("content-type", ""))
            if declared not in ("application/dicom", ""):
                raise HttpError(415, f"radai stores application/dicom parts, not {declared!r}")
        except HttpError as exc:
            await run_in_threadpool(self._audit_refused, who, peer, study_uid, exc)
            raise
        outcome = await run_in_threadpool(
            stow.store_parts,
            parts,
            self.service.store,
            peer=f"{peer} {who.user}"[:64],
            study_uid=study_uid,
        )
        await run_in_threadpool(self._audit_stored, who, peer, study_uid, outcome)
        doc = stow.response(outcome, _base(request), study_uid)
        return _json(doc, status=outcome.http_status)

    def _audit_refused(
        self, who: Principal, peer: str, study_uid: str | None, exc: HttpError
    ) -> None:
        log.warning("STOW-RS from %s (%s) refused: %d %s", who.user, peer, exc.status, exc.reason)
        with self.service.db.session() as s:
            audit.append(
                s,
                who.actor,
                AuditAction.DICOMWEB_REFUSED,
                study_uid,
                {
                    "peer": peer,
                    "status": exc.status,
                    "reason": exc.reason[:300],
                    "request": "STOW-RS",
                },
            )

    def _audit_stored(
        self, who: Principal, peer: str, study_uid: str | None, outcome: stow.Outcome
    ) -> None:
        with self.service.db.session() as s:
            audit.append(
                s,
                who.actor,
                AuditAction.DICOMWEB_STORED,
                study_uid,
                {
                    "peer": peer,
                    "stored": len(outcome.stored) + len(outcome.warned),
                    "failed": [[uid, f"0x{status:04X}"] for _, uid, status in outcome.failed],
                    "studies": sorted({s for _, _, s in outcome.stored if s}),
                },
            )


def _route(handler: Callable, **bound: Any) -> Callable:
    def endpoint(request: Request) -> Response:
        return handler(request, **bound)

    return endpoint


def _error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.reason[:200])
    headers = {"WWW-Authenticate": 'Bearer realm="radai"'} if exc.status == 401 else None
    return PlainTextResponse(exc.reason + "\n", exc.status, headers=headers)


def _crash(request: Request, exc: Exception) -> Response:
    log.error(
        "%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
    )
    return PlainTextResponse("internal error; see the server's log\n", 500)


def build_app(service: Service, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The ASGI app of one service; `extra_routes` (radai's OHIF viewer) are tried after
    /dicomweb's."""
    a = App(service)
    s, se, i = "/studies/{study}", "/series/{series}", "/instances/{instance}"
    routes = [
        Route("/studies", _route(a.search, level=qido.STUDY), methods=["GET"]),
        Route("/studies", a.store, methods=["POST"]),
        Route("/series", _route(a.search, level=qido.SERIES), methods=["GET"]),
        Route("/instances", _route(a.search, level=qido.INSTANCE), methods=["GET"]),
        Route(s, a.retrieve, methods=["GET"]),
        Route(s, a.store, methods=["POST"]),
        Route(s + "/metadata", a.metadata, methods=["GET"]),
        Route(s + "/series", _route(a.search, level=qido.SERIES), methods=["GET"]),
        Route(s + "/instances", _route(a.search, level=qido.INSTANCE), methods=["GET"]),
        Route(s + "/thumbnail", _route(a.rendered, thumbnail=True), methods=["GET"]),
        Route(s + se, a.retrieve, methods=["GET"]),
        Route(s + se + "/metadata", a.metadata, methods=["GET"]),
        Route(s + se + "/instances", _route(a.search, level=qido.INSTANCE), methods=["GET"]),
        Route(s + se + "/thumbnail", _route(a.rendered, thumbnail=True), methods=["GET"]),
        Route(s + se + i, a.retrieve, methods=["GET"]),
        Route(s + se + i + "/metadata", a.metadata, methods=["GET"]),
        Route(s + se + i + "/rendered", a.rendered, methods=["GET"]),
        Route(s + se + i + "/thumbnail", _route(a.rendered, thumbnail=True), methods=["GET"]),
        Route(s + se + i + "/frames/{frames}", a.frames, methods=["GET"]),
        Route(s + se + i + "/frames/{frames}/rendered", a.rendered, methods=["GET"]),
        Route(s + se + i + "/bulk/{tag}", a.bulk, methods=["GET"]),
    ]
    app = Starlette(
        routes=[Mount(ROOT, routes=routes), *extra_routes],
        exception_handlers={HttpError: _error, Exception: _crash},
    )
    app.state.public_url = service.public_url
    return app
