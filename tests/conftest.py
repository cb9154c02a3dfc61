"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridroute.certs.pki import init_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev PKI minted once per session (see `hybridroute.certs.pki.PkiLayout` for names)."""
    root = tmp_path_factory.mktemp("pki")
    init_pki(root, apps=["demo-app", "other-app"])
    return root


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two sample models (iris, ticket-triage), trained once per session."""
    from hybridroute.node.samples import write_samples

    root = tmp_path_factory.mktemp("models")
    write_samples(root)
    return root
