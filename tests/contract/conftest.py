"""The ``rig`` fixture: every contract scenario runs once per backend kind (see rig.BACKENDS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.contract.rig import BACKENDS, BackendKind, Rig, open_rig


@pytest.fixture(params=BACKENDS, ids=[k.name for k in BACKENDS])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    kind: BackendKind = request.param
    with open_rig(kind) as r:
        yield r
