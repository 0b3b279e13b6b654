"""The README's Python block runs as written (it is what a notebook user copies), and its file
tree names every file the repository tracks."""

import re
import subprocess
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


def test_every_tracked_file_has_a_line_in_the_file_tree():
    listed = subprocess.run(
        ["git", "ls-files"], cwd=README.parent, capture_output=True, text=True, check=True
    ).stdout.split()
    text = README.read_text()
    tree = text[text.index("## Files") :]
    missing = []
    for path in listed:
        name = path.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue  # .gitignore
        generated = re.fullmatch(r"results/\w+?_mini_(length_curves|grid_heatmaps)\.png", path)
        if name not in tree and not generated:
            missing.append(path)
    assert not missing, f"README's file tree lacks: {missing}"
