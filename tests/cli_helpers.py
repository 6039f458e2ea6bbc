"""Running ``perflow`` in the test process and reading its one-line errors (shared by the CLI tests)."""

from __future__ import annotations


def cli(argv: list, capsys) -> tuple[int, str, str]:
    """``perflow ARGV`` in this process: (exit code, stdout, stderr)."""
    from perflow.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The one ``perflow CMD: error: ...`` line of stderr (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]
