"""The one exception a handler raises for a client error; the app turns it into a response
with the PS3.18 status and a plain-text reason, never a traceback."""

from __future__ import annotations


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def bad_request(reason: str) -> HttpError:
    return HttpError(400, reason)


def not_found(reason: str) -> HttpError:
    return HttpError(404, reason)


def not_acceptable(reason: str) -> HttpError:
    return HttpError(406, reason)
