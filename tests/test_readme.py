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
