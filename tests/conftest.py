"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridroute.certs.pki import init_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev PKI minted once per session (see `hybridroute.certs.pki.PkiLayout` for names)."""
    root = tmp_path_factory.mktemp("pki")
    init_pki(root, apps=["demo-app", "other-app", "admin"])
    return root


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two sample models (iris, ticket-triage), trained once per session."""
    from hybridroute.node.samples import write_samples

    root = tmp_path_factory.mktemp("models")
    write_samples(root)
    return root


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """`hybridroute up` (2 on-prem nodes, a cloud stand-in, the router) as real processes,
    shared by the tests that do not disturb it. Fault tests start their own."""
    from support import Stack

    running = Stack(tmp_path_factory.mktemp("stack"))
    yield running
    running.stop()
