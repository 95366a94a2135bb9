"""The ``lab`` fixture of the namespace tests in this directory (see tests/nslab.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.nslab import Lab, open_lab, require_root


@pytest.fixture
def lab() -> Iterator[Lab]:
    """Two private namespaces A and B joined by a veth pair; deleted afterwards."""
    require_root()
    with open_lab(Lab(), pair=True) as lab:
        yield lab
