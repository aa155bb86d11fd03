"""Seeing an association rejection that pynetdicom 3.0.4 can drop.

When the peer closes straight after its A-ASSOCIATE-RJ, pynetdicom's reader thread may have closed
the socket by the time the requesting thread looks; that thread then takes the closed socket for a
failed connection and never reads the rejection. The PDU event still fires for it: `Watch` keeps
the rejection from there, for the C-STORE client and for retrieval alike.
"""

from __future__ import annotations

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE


class Watch:
    """Bind `handler` (for EVT_PDU_RECV) to the association; after a failed one, `rejection`."""

    def __init__(self) -> None:
        self._seen: list[A_ASSOCIATE] = []
        self.handler = (evt.EVT_PDU_RECV, self._on_pdu)

    def _on_pdu(self, event: evt.Event) -> None:
        pdu = getattr(event, "pdu", None)
        if isinstance(pdu, A_ASSOCIATE_RJ):
            self._seen.append(pdu.to_primitive())

    def rejection(self, assoc: Association) -> A_ASSOCIATE | None:
        """The peer's A-ASSOCIATE-RJ, whether pynetdicom read it or not; None if it sent none."""
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            return assoc.acceptor.primitive
        return self._seen[0] if self._seen else None


def describe(rsp: A_ASSOCIATE) -> str:
    return f"association rejected ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"
