"""What the dashboard's web server gives a browser outside the logged-in session.

Streamlit serves images and downloads from `/media/<hash>` URLs that any request may fetch, and
answers `/_stcore/metrics` to anyone. Here:

- Images never get a URL: `image_data_uri` turns a rendered slice into a `data:` URI that
  travels inside the session's websocket and dies with the page.
- `AccessGuard`, an ASGI middleware mounted by `dashboard/server.py` in front of Streamlit's own
  routes, refuses `/_stcore/metrics` and the agent API outright, and serves a `/media/` file only
  to the browser a logged-in session granted it to (`grant_download`): same device token (the
  browser's Streamlit XSRF cookie), session still live, within GRANT_SECONDS. Every other
  `/media/` request is refused, so a URL copied out of a browser is worthless elsewhere.

The device token also identifies a browser to the login throttle (`device_id`). Imports
Streamlit (for its runtime's media store) and numpy/Pillow; nothing of radai's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any

import numpy as np

XSRF_COOKIE = "_streamlit_xsrf"
REFUSED_PREFIXES = ("/_stcore/metrics", "/_stcore/agent/")
MEDIA_PREFIX = "/media/"
GRANT_SECONDS = 60.0
JPEG_QUALITY = 90


def device_token(cookie_value: str | None) -> bytes | None:
    """The raw token inside a Streamlit XSRF cookie ("2|mask|masked|time", hex; the mask changes
    each time the cookie is re-issued, the token does not), or None."""
    if not cookie_value:
        return None
    value = cookie_value.strip("\"'")
    try:
        if value.startswith("2|"):
            _, mask_hex, masked_hex, _ = value.split("|")
            mask, masked = bytes.fromhex(mask_hex), bytes.fromhex(masked_hex)
            if not mask:
                return None
            return bytes(b ^ mask[i % len(mask)] for i, b in enumerate(masked)) or None
        return bytes.fromhex(value) or None
    except (ValueError, binascii.Error):
        return None


def device_id(cookie_value: str | None) -> str | None:
    """A digest of the browser's device token, as the login throttle stores it."""
    token = device_token(cookie_value)
    return hashlib.sha256(b"radai-device\0" + token).hexdigest() if token else None


def image_data_uri(rgb: np.ndarray) -> str:
    """An RGB (or grey) uint8 image as a JPEG `data:` URI, for `st.image`."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


@dataclass(frozen=True)
class _Grant:
    token: bytes
    alive: Callable[[], bool]
    until: float


_grants: dict[str, _Grant] = {}
_lock = threading.Lock()


def grant_download(data: bytes, cookie_value: str | None, alive: Callable[[], bool]) -> bool:
    """Let the browser holding `cookie_value` fetch `data` from `/media/` for GRANT_SECONDS,
    while `alive()` (the session) holds. False (nothing granted) without a device token."""
    token = device_token(cookie_value)
    if token is None:
        return False
    now = time.monotonic()
    with _lock:
        for key in [k for k, g in _grants.items() if g.until < now]:
            del _grants[key]
        _grants[hashlib.sha256(data).hexdigest()] = _Grant(token, alive, now + GRANT_SECONDS)
    return True


def _media_content(name: str) -> bytes | None:
    from streamlit.runtime import Runtime

    if not Runtime.exists():
        return None
    manager = Runtime.instance().media_file_mgr
    if not manager.can_read_files:
        return None
    found = manager.read_file(name)
    return found.content if found is not None else None


def media_allowed(name: str, cookie_value: str | None) -> bool:
    """Whether `/media/<name>` may go to a request carrying this XSRF cookie."""
    token = device_token(cookie_value)
    if token is None:
        return False
    content = _media_content(name)
    if content is None:
        return False
    with _lock:
        grant = _grants.get(hashlib.sha256(content).hexdigest())
    return (
        grant is not None
        and grant.until >= time.monotonic()
        and hmac.compare_digest(grant.token, token)
        and grant.alive()
    )


def _cookie(scope: dict[str, Any], name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            try:
                jar = SimpleCookie(value.decode("latin-1"))
            except CookieError:
                continue
            if name in jar:
                return jar[name].value
    return None


class AccessGuard:
    """ASGI middleware: refuses internal endpoints and ungranted `/media/` requests (404, with
    no hint of what exists); everything else goes on to Streamlit."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = _app_path(scope.get("path", ""))
            if path.startswith(REFUSED_PREFIXES) or (
                path.startswith(MEDIA_PREFIX)
                and not media_allowed(path[len(MEDIA_PREFIX) :], _cookie(scope, XSRF_COOKIE))
            ):
                await _not_found(send)
                return
        await self.app(scope, receive, send)


def _app_path(path: str) -> str:
    """The path below `server.baseUrlPath` (when one is set), as Streamlit routes it."""
    from streamlit import config

    base = (config.get_option("server.baseUrlPath") or "").strip("/")
    if base and path.startswith(f"/{base}/"):
        return path[len(base) + 1 :]
    return path


async def _not_found(send: Any) -> None:
    body = b"Not found"
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
