"""docs/protocol-support.md cannot drift: it is generated from vvu.protocol.support, every request
and feature has a row, every named test exists, and the rows agree with what the engine offers,
answers and refuses and with what the VVU device lets through."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from vvu.backends import BlkBackend, NetBackend, RngBackend
from vvu.device.vvu import PROTOCOL_FEATURES_ALLOWED
from vvu.engine import ENGINE_PROTOCOL_FEATURES, REFUSED, BackendEngine
from vvu.protocol import BackendRequest, FrontendRequest, ProtocolFeature
from vvu.protocol.support import (
    BACKEND_ROWS,
    FEATURE_ROWS,
    FRONTEND_ROWS,
    Row,
    Status,
    render,
)

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "protocol-support.md"


def test_the_doc_is_what_render_produces() -> None:
    assert DOC.read_text() == render(), (
        "docs/protocol-support.md is stale: "
        ".venv/bin/python -m vvu.protocol.support > docs/protocol-support.md"
    )


def test_every_request_and_feature_has_a_row() -> None:
    assert set(FRONTEND_ROWS) == set(FrontendRequest)
    assert set(BACKEND_ROWS) == set(BackendRequest)
    assert set(FEATURE_ROWS) == set(ProtocolFeature)


def _all_rows() -> Iterator[tuple[str, Row]]:
    for rows in (FRONTEND_ROWS, BACKEND_ROWS, FEATURE_ROWS):
        for member, row in rows.items():
            yield member.name, row


@functools.cache
def _test_functions(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(), str(path))
    return frozenset(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    )


def test_every_named_test_exists() -> None:
    missing = []
    for name, row in _all_rows():
        for node_id in row.tests:
            file, _, function = node_id.partition("::")
            path = REPO / file
            if not path.is_file() or function not in _test_functions(path):
                missing.append(f"{name}: {node_id}")
    assert missing == []


def test_supported_and_refused_rows_name_a_test() -> None:
    for name, row in _all_rows():
        if Status.YES in (row.unix, row.vvu) or Status.REFUSED in (row.unix, row.vvu):
            assert row.tests, f"{name} is claimed without a test"


@pytest.fixture(scope="module")
def offered() -> Iterator[int]:
    """Every protocol feature some back-end of ours offers."""
    backends = [BlkBackend(size=1 << 20), RngBackend(), NetBackend.loopback()]
    try:
        # What BackendEngine.offered_protocol_features() answers, without an engine: its
        # bound-method table is a reference cycle that would keep the net ports (fds) alive
        # until some later garbage collection, in another test's fd count.
        mask = ENGINE_PROTOCOL_FEATURES
        for backend in backends:
            mask |= backend.protocol_features()
        yield mask
    finally:
        for backend in backends:
            backend.close()


def test_feature_rows_match_the_offers_and_the_device(offered: int) -> None:
    for feature, row in FEATURE_ROWS.items():
        is_offered = bool(offered & feature.mask)
        assert is_offered == (row.unix is Status.YES), f"{feature.name}: offered={is_offered}"
        passes = bool(PROTOCOL_FEATURES_ALLOWED & feature.mask)
        if row.vvu is Status.YES:
            assert passes and is_offered, feature.name
        if row.vvu is Status.FILTERED:
            assert not passes, f"{feature.name}: the device lets it through"


def test_frontend_request_rows_match_the_engine() -> None:
    handled = set(BackendEngine(RngBackend())._handlers)
    for request, row in FRONTEND_ROWS.items():
        if row.unix is Status.YES:
            assert request in handled, f"{request.name} has no handler"
        elif row.unix is Status.REFUSED:
            assert request in REFUSED and request not in handled, request.name
        else:  # not yet: a parallel branch adds the handler and updates the row
            assert request not in handled and request not in REFUSED, request.name
