"""The README's annotated file tree names every tracked file once and nothing that is gone, and
every path the README cites exists (a renamed config or results file fails here, not a reader)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def tracked_files() -> list[str]:
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_file_tree_lists_every_tracked_file_once():
    tree = README[README.index("## File tree"):].split("```")[1]
    listed = re.findall(r"^(\S+)\s", tree, re.M)
    files = set(tracked_files())
    assert [p for p in sorted(files) if p not in listed] == [], "tracked files missing from the README's file tree"
    assert [p for p in listed if p not in files] == [], "the README's file tree lists files that are not tracked"
    assert len(listed) == len(set(listed)), "a file listed twice"


def test_every_cited_repository_path_exists():
    cited = set(re.findall(r"\b((?:configs|bench|selfplay|roles|prompts|memory|tests)/[\w./-]+\.(?:yaml|md|png|py|j2))", README))
    assert len(cited) > 20  # the pattern still finds the citations
    assert sorted(p for p in cited if not (ROOT / p).exists()) == []
