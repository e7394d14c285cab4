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
from vvu.protocol.table import spec_for

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


#: Table-driven tests: a row that cites one must be one of its cases. Value: the function of
#: the test's module that lists the cases (by attribute, e.g. `F.SET_VRING_ENDIAN`).
_REFUSED_TEST = "tests/test_engine.py::test_refused_requests_get_their_failure_answer_and_a_reason"
_UNSUPPORTED_BACKEND_TEST = (
    "tests/test_engine.py::"
    "test_our_frontend_answers_back_end_requests_it_does_not_support_with_a_failure_ack"
)
_CASE_TABLES = {
    _REFUSED_TEST: "_refused_cases",
    _UNSUPPORTED_BACKEND_TEST: _UNSUPPORTED_BACKEND_TEST.partition("::")[2],
}


@functools.cache
def _attributes_in(path: Path, function: str) -> frozenset[str]:
    """Every attribute name used in `function` of the module at `path` (empty: no function)."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == function:
            return frozenset(n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute))
    return frozenset()


def _requests_needing(feature: ProtocolFeature) -> set[str]:
    members: list[FrontendRequest | BackendRequest] = [*FrontendRequest, *BackendRequest]
    return {
        m.name for m in members if (spec := spec_for(m)) is not None and spec.feature is feature
    }


def test_rows_are_cases_of_the_table_driven_tests_they_cite() -> None:
    """A row that cites a table-driven test is one of its cases: a request by name, a feature
    through a request that needs it. Every refused request cites the refused-requests test, and
    every back-end request the engine does not offer the test of our front-end's refusals."""
    rows: list[tuple[str, set[str], Row]] = [
        *((m.name, {m.name}, row) for m, row in FRONTEND_ROWS.items()),
        *((m.name, {m.name}, row) for m, row in BACKEND_ROWS.items()),
        *((m.name, _requests_needing(m), row) for m, row in FEATURE_ROWS.items()),
    ]
    wrong = []
    for name, wanted, row in rows:
        for node_id in row.tests:
            function = _CASE_TABLES.get(node_id)
            if function is None:
                continue
            cases = _attributes_in(REPO / node_id.partition("::")[0], function)
            assert cases, f"{function} lists no cases"
            if not wanted & cases:
                wrong.append(f"{name}: not a case of {node_id}")
    for request, row in FRONTEND_ROWS.items():
        if Status.REFUSED in (row.unix, row.vvu) and _REFUSED_TEST not in row.tests:
            wrong.append(f"{request.name} is refused without {_REFUSED_TEST}")
    for backend_request, row in BACKEND_ROWS.items():
        if row.unix is Status.NOT_OFFERED and _UNSUPPORTED_BACKEND_TEST not in row.tests:
            wrong.append(f"{backend_request.name} is not offered without its refusal test")
    assert wrong == []


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
