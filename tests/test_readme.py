"""The README's Python example runs as written (on small image folders made here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from test_grow import make_arrivals

README = Path(__file__).parent.parent / "README.md"


def python_example() -> str:
    text = README.read_text()
    start = text.index("From Python (`tests/test_readme.py` runs this block):")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None
    return block.group(1)


def test_the_readme_python_example_runs(tmp_path, clpt_cache, capsys):
    arrivals = tmp_path / "made"
    make_arrivals(arrivals, sizes=(4, 3), train=6, test=2)
    (tmp_path / "arrivals").mkdir()
    (arrivals / "arrive0").rename(tmp_path / "arrivals" / "first")
    (arrivals / "arrive1").rename(tmp_path / "arrivals" / "second")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(python_example(), "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "7 torch.Size([8, 7])"  # 4 classes, then 3 added; 8 images scored
    assert (tmp_path / "exports" / "shop" / "model.pt2").is_file()
