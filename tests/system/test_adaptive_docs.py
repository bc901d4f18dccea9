"""docs/adaptive.md's python examples run as written (adaptation, hierarchical, multimodal)."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "adaptive.md"


def test_adaptive_doc_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3
    spaces = []
    for i, block in enumerate(blocks):
        ns: dict = {}
        exec(compile(block, f"{DOC}:block{i}", "exec"), ns)
        spaces.append(ns)
    assert spaces[0]["layer"].num_experts == 5  # the restored snapshot: after the split
    assert spaces[1]["hinfo"].group.ids.shape == (32, 1)
    assert spaces[2]["info"].stats["modality_counts"].shape == (2, 6)
