"""The README's Python example runs as written (embedded SmolLM2 + the demo adapters) and the adapters matter."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_python_api_example_runs(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    outs = namespace["outs"]
    base = outs[3].text
    assert all(o.text and o.text != base for o in outs[:3])  # each demo adapter changes the answer
    assert outs[2].text.upper() == outs[2].text  # demo/shout answers in capitals
    assert os.path.isdir(ROOT / "adapters" / "demo" / "french")
    assert capsys.readouterr().out
