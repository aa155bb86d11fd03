"""How a stage ends a study with a reason instead of a result."""

from __future__ import annotations

from db import StudyState


class Finished(Exception):
    """The job ended without findings (NOT_APPLICABLE or FAILED) for a reason people read."""

    def __init__(self, state: StudyState, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason
