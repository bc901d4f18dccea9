"""The README's usage snippet runs as written (so the front page cannot rot)."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_snippets_run():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    namespaces = []
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        namespaces.append(namespace)
    # the snippets' own results: what their comments promise
    namespace = namespaces[0]
    assert tuple(namespace["y"].shape) == (4, 16, 64)
    assert tuple(namespace["info"].ids.shape) == (64, 2)
    assert int(namespace["info"].counts.sum()) == 64 * 2
    # the loss the snippet adds is a real balancing loss, not the default's exact 0
    assert float(namespace["info"].aux_loss) > 0
    system_ns = namespaces[1]
    assert len(system_ns["hits"]) == 3 and {"id", "similarity"} <= set(system_ns["hits"][0])
    system, same, x = system_ns["system"], system_ns["same"], system_ns["x"]
    assert system_ns["step"].aux_loss > 0  # on by default in MoEConfig, as the comment says
    assert system.config.amp_dtype == "none"  # so the snippet does not claim AMP
    system.eval()
    same.eval()
    with torch.no_grad():
        torch.testing.assert_close(same(x).output, system(x).output, rtol=0, atol=0)
