"""The README's Python block runs as written (it is what a notebook user copies)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_quick_start_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Python") :]
    (block,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 3)], re.S)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("(4, 16, ")
    assert [line.split()[0] for line in out[1:]] == ["8", "32"]
