"""Doctests of the package (``--doctest-modules`` on src/fastcnf) run in a temporary directory, so
an example that writes a run directory leaves nothing behind."""
import pytest


@pytest.fixture(autouse=True)
def _doctests_run_in_a_temporary_directory(request, tmp_path, monkeypatch):
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.chdir(tmp_path)
