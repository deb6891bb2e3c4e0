"""Fixtures of the profile tests."""

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Four documents, one long: rows, batches and shard boundaries fall inside it."""
    path = tmp_path_factory.mktemp("c") / "c.txt"
    path.write_text("\n\n".join(["short one.", "a longer document about loops and iterators " * 9,
                                 "another one", "the last document of the corpus, also short."]))
    return path
