"""Check that every command README.md and docs/*.md tell the user to type still parses (runs nothing long).

- ``perflow ...`` lines of code blocks (also behind ``accelerate launch ... -m``): parsed by
  ``perflow.cli.build_parser()`` (flags, choices, required arguments);
- every other ``perflow ...``, ``python -m MODULE ...`` and ``python benchmarks/X.py ...`` mention
  (code blocks and inline code): its (sub)command's ``--help`` runs and lists every ``--flag`` used.

Optional parts written ``[--flag value]`` are checked as if given. Prints one line per command
and exits 1 if any fails. Run from the repository root: ``python benchmarks/check_doc_commands.py``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import re
import shlex
import subprocess
import sys

START = re.compile(r"(perflow (demo|train|eval|delta)\b|python -m [a-z_.]+|python benchmarks/\w+\.py|accelerate launch )")


def mentions(path: str) -> list[tuple[str, bool]]:
    """``(command, in_code_block)`` for each command written in ``path``."""
    text = open(path, encoding="utf-8").read()
    out = []
    for block in re.findall(r"```(?:bash|sh|console|shell)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if START.match(line):
                out += [(part.strip(), True) for part in line.split(" #")[0].split(" && ")]
    for inline in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if START.match(inline) and ": " not in inline:  # not an output line such as "perflow train: error: ..."
            out.append((inline, False))
    return out


def argv_of(command: str) -> list[str]:
    command = re.sub(r"\$\(which perflow\)", "-m perflow", command.split(" | ")[0])
    argv = shlex.split(re.sub(r"\[(--[^\]]*)\]", r"\1", command))
    if argv[0] == "accelerate":  # accelerate launch [its flags] -m perflow ... / script.py ...
        i = next((i for i, a in enumerate(argv) if a == "-m" or a.endswith(".py")), None)
        if i is None:
            return []  # accelerate's own flags only (a fragment in the text)
        argv = argv[i + 1:] if argv[i] == "-m" and argv[i + 1] == "perflow" else ["python", *argv[i:]]
    return [a for a in argv if "..." not in a]


def check(argv: list[str], strict: bool, helps: dict) -> str:
    from perflow.cli import build_parser

    if not argv:
        return "ok (nothing to run)"
    if argv[0] == "perflow" or argv[:3] == ["python", "-m", "perflow"]:
        args = argv[1:] if argv[0] == "perflow" else argv[3:]
        words = [a for a in args if not a.startswith("-")]
        prog = ["perflow", *words[:2]] if words[:1] == ["delta"] else ["perflow", *words[:1]]
        if strict:
            err = io.StringIO()
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                    build_parser().parse_args(args)
            except SystemExit as e:
                if e.code:
                    return "FAIL " + err.getvalue().strip().splitlines()[-1]
        cmd = [sys.executable, "-m", "perflow", *prog[1:]]
    elif argv[:3] == ["python", "-m", "pytest"]:
        return "ok (pytest)"
    else:
        sub = [a for a in argv[3 if argv[1] == "-m" else 2:] if not a.startswith("-")][:1]
        cmd = [sys.executable, *argv[1:3 if argv[1] == "-m" else 2]]
        cmd += sub if sub and _is_subcommand(cmd, sub[0], helps) else []
    rc, text = _help(cmd, helps)
    missing = [f for f in (a.split("=")[0] for a in argv if a.startswith("--")) if f not in text]
    if rc != 0 or missing:
        return f"FAIL --help exit {rc}, flags not listed: {missing}"
    return "ok"


def _help(cmd: list[str], helps: dict) -> tuple[int, str]:
    key = tuple(cmd)
    if key not in helps:
        r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=300)
        helps[key] = (r.returncode, r.stdout + r.stderr)
    return helps[key]


def _is_subcommand(cmd: list[str], word: str, helps: dict) -> bool:
    return bool(re.search(r"\{[\w,-]*\b%s\b[\w,-]*\}" % re.escape(word), _help(cmd, helps)[1]))


def main() -> int:
    helps: dict = {}
    failures = 0
    for path in ["README.md", *sorted(glob.glob("docs/*.md"))]:
        for command, strict in mentions(path):
            status = check(argv_of(command), strict, helps)
            failures += status.startswith("FAIL")
            print(f"{status}  {path}: {command}")
    print(f"{failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
