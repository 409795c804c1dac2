"""Running the CLI as users do (a real process, or ``cli.main`` in this one) and
checking what a failure must look like: one sentence on stderr, the inputs
untouched, nothing written."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None, timeout=300, stdin=None):
    """``python -m onnx_alds ARGS``: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "onnx_alds", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=timeout, stdin=stdin)
    return p.returncode, p.stdout, p.stderr


def main_in_process(capsys, *args):
    """``cli.main`` in this process (no start-up cost): (returncode, stdout, stderr)."""
    from onnx_alds.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# a progress line as the CLI logs it without a terminal (progress.py), nothing looser: a stage's
# "N/TOTAL UNIT (P %), E s elapsed, about L s left" every few percent, and its closing "N UNIT done in E s"
PROGRESS_LINE = re.compile(r"INFO onnx_alds\.progress: (?P<stage>[^:]+): (?:\d+/\d+ \w+ \(\d+ %\), \d+\.\d s elapsed, "
                           r"about \d+ s left|\d+ \w+ done in \d+\.\d s)")


def progress_lines(text) -> list[str]:
    """The lines of ``text`` that are progress lines."""
    return [l for l in text.splitlines() if PROGRESS_LINE.fullmatch(l)]


def without_progress(stderr) -> str:
    """``stderr`` less its progress lines (which a run without ``-q`` writes before any error)."""
    return "\n".join(l for l in stderr.splitlines() if not PROGRESS_LINE.fullmatch(l))


def assert_one_sentence(stderr):
    """An error is one sentence; the only other lines allowed are the run's progress lines."""
    stderr = without_progress(stderr)
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnx-alds: error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(directory) -> dict:
    """Every entry of a directory tree: name → (kind, sha256 of a regular file)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(directory))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", digest(p))
            else:
                out[rel] = ("other", None)
    return out
