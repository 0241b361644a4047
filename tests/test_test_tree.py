"""The test tree itself: pytest imports test modules by basename (rootdir mode, no packages), so two test files
with one name in different folders break collection of the whole suite — only a run of every folder shows it."""

from collections import Counter
from pathlib import Path


def test_no_two_test_modules_share_a_basename():
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
