"""The server's contexts are copied per association cheaply but as deep as negotiation needs."""

from __future__ import annotations

import copy

from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

from dicom_node.reactor import SharedContexts


def test_each_association_gets_its_own_contexts_with_the_same_values():
    contexts = [
        build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts[:20]
    ]
    shared = SharedContexts(contexts)
    first, second = copy.deepcopy(shared), copy.deepcopy(shared)
    reference = copy.deepcopy(contexts)  # what pynetdicom's own deep copy gives
    for a, b, ref in zip(first, second, reference, strict=True):
        assert a is not b and a is not ref
        assert (a.abstract_syntax, a.transfer_syntax) == (ref.abstract_syntax, ref.transfer_syntax)
        assert (a.scu_role, a.scp_role, a.context_id) == (
            ref.scu_role,
            ref.scp_role,
            ref.context_id,
        )
    first[0].transfer_syntax.append("1.2.3")
    first[0].context_id = 7
    assert "1.2.3" not in second[0].transfer_syntax and "1.2.3" not in contexts[0].transfer_syntax
    assert contexts[0].context_id is None
