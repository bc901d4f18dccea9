"""The README's usage snippet runs as written (so the front page cannot rot)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippets_run():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    # the snippet's own results: shapes promised in its comments
    assert tuple(namespace["y"].shape) == (4, 16, 64)
    assert tuple(namespace["info"].ids.shape) == (64, 2)
    assert int(namespace["info"].counts.sum()) == 64 * 2
