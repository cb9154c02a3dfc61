"""`router serve` without the cloud token: one line saying what is wrong and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import free_port

from hybridroute.cli import main
from hybridroute.stack import TOKEN_ENV, default_policy_path, write_router_config


def test_router_serve_without_the_cloud_token_says_which_variable_to_set(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = write_router_config(tmp_path, pki, default_policy_path(), listen, metrics)
    code = main(["router", "serve", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"router not started: pool 'cloud': environment variable {TOKEN_ENV}" in err
    assert f"set {TOKEN_ENV} to the bearer token" in err
    assert "Traceback" not in err
