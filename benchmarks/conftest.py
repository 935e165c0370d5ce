"""Collect ``bench_*.py`` here (pytest's default pattern only picks up ``test_*.py``)."""

import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself: adding it again here would
    # run every benchmark twice.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_sessionstart(session):
    # Candidates alternate; see lipkern.tools.bench.steady_allocator for why the allocator is pinned.
    from lipkern.tools.bench import steady_allocator

    steady_allocator()
