"""pytest plugin for the documentation's code blocks (loaded with ``-p pytest_docs``, see ``pyproject.toml``).

pytest-markdown-docs (``--markdown-docs``) turns every ``python`` block of ``README.md`` and ``docs/**/*.md`` into a
test; a block marked ``python notest`` is shown but not run. This plugin

- runs each block in a fresh temporary directory, so what a snippet writes (``runs/``, ``lightning_logs/``) never
  lands in the working tree, and seeds torch so a block's printed numbers do not change from run to run;
- keeps the Python files of ``docs/`` that are not tests (``conf.py``, ``screenshots.py``, this file) out of the
  collection: ``--doctest-modules`` and ``--markdown-docs`` would otherwise import them as test modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Ignore ``docs/*.py`` except ``test_*.py``, and the Sphinx build directory."""
    path = Path(collection_path)
    if path.parent == DOCS and path.suffix == ".py" and not path.name.startswith("test_"):
        return True
    if path.name in ("_build", "__pycache__") and DOCS in path.parents:
        return True
    return None


@pytest.fixture(autouse=True)
def _snippet_in_a_temporary_directory(request: pytest.FixtureRequest) -> Iterator[None]:
    """A Markdown code block runs in its own empty directory, with torch seeded; other tests are left alone."""
    if request.node.get_closest_marker("markdown-docs") is None:
        yield
        return
    import torch

    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(request.getfixturevalue("tmp_path"))
    torch.manual_seed(0)
    yield
