"""`hybridroute node serve` refuses settings that would make every request fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridroute.cli import main


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-batch-size", "0", "argument --max-batch-size: must be 1 or more, not 0"),
        ("--max-batch-size", "-3", "argument --max-batch-size: must be 1 or more, not -3"),
        ("--max-queue-delay-ms", "-1", "--max-queue-delay-ms: must be a finite number, 0 or more"),
        ("--max-queue-delay-ms", "inf", "--max-queue-delay-ms: must be a finite number, 0 or more"),
        ("--max-queue-delay-ms", "nan", "--max-queue-delay-ms: must be a finite number, 0 or more"),
        ("--max-message-bytes", "0", "argument --max-message-bytes: must be 1 to 2147483647"),
        ("--max-message-bytes", "-5", "argument --max-message-bytes: must be 1 to 2147483647"),
        ("--max-message-bytes", str(2**31), "--max-message-bytes: must be 1 to 2147483647"),
        ("--grace", "-1", "argument --grace: must be a finite number, 0 or more"),
        ("--drift-interval", "0", "argument --drift-interval: must be a finite number, 0.001"),
    ],
)
def test_serve_refuses_settings_outside_their_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    # A missing --models directory: the value must be refused before that is noticed
    # (and should it ever be accepted, the command ends instead of serving).
    args = ["node", "serve", "--models", str(tmp_path / "none"), "--insecure", "--listen"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "127.0.0.1:0", f"{flag}={value}"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
