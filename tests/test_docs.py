"""The guide builds, and its complete programs run.

`mkdocs build --strict` fails on a broken link, a page missing from the nav,
a missing snippet (CHANGELOG.md) or an API reference (``::: bigmachine.X``)
that no longer resolves. Every ```python block of the guide that is a whole
program (it has ``if __name__ == "__main__":``) is run as a script on
bm.Local().
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PROGRAMS = [(page.name, i, block)
            for page in sorted(DOCS.glob("*.md"))
            for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
            if 'if __name__ == "__main__":' in block]


@pytest.mark.timeout(300)
def test_docs_build_strict(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("bigmachine") > 10


def test_the_guide_has_programs_to_run():
    assert {page for page, _, _ in PROGRAMS} >= {"getting-started.md", "coming-from.md"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page, index, program", PROGRAMS,
                         ids=[f"{page}-{index}" for page, index, _ in PROGRAMS])
def test_guide_program_runs(tmp_path, page, index, program):
    script = tmp_path / "program.py"
    script.write_text(program)
    # This checkout's bigmachine, wherever the program runs from.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the program printed nothing"
