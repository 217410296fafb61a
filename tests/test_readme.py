"""The README's API examples run as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    for block in blocks[:2]:  # the op example, then the plan example that continues it
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "torch.Size([28, 4, 128])" in printed
    assert "->" in printed


def test_files_the_docs_name_exist():
    """The README and docs/ are self-contained: every repository path they name exists."""
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(
        r"(?<![\w/.])((?:docs|bench|tests|hstu_kernels)/[\w/.-]*\w\.(?:md|py|json|png))"
    )
    missing = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for path in set(pattern.findall(doc.read_text())):
            if "<" not in path and not (root / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing
