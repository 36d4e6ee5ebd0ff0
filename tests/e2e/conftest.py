"""The e2e modules' shared fixture: one real daemon per module with the demo image built (cached)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Daemon


@pytest.fixture(scope="module")
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")))
    d.start()
    try:
        d.cli("image", "demo", timeout_s=900)
        yield d
    finally:
        d.cleanup()
