"""README.md and docs/*.md stay true: their bash and python blocks run against a real `mux serve` (the embedded
SmolLM2 and a copy of the demo adapters), their policy examples load, their links and file paths exist, and the
routes, flags and metrics they name are the server's. A block that cannot run here says why in a comment on the
line above it (`<!-- not run: ... -->`); tests/test_readme.py runs the README's Python API example in process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import free_port, run_server
from mux import cli
from mux.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash", "python"}
DOCUMENTED_ADDRESS = "127.0.0.1:8000"
DOCUMENTED_GRPC_ADDRESS = "127.0.0.1:8001"  # docs/api.md's gRPC example
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")
_REPO_PATH = re.compile(r"(mux|bench|tests|policies|adapters|docs|\.ci)/[\w./-]*")
_ROUTE_ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/[^`]*)` \|", re.M)
# lorax-client cannot share this virtualenv (it pins huggingface-hub<1): its one call, as it sends it
LORAX_SHIM = """
import types

import httpx


class Client:
    def __init__(self, base_url, headers=None, timeout=60):
        self.base_url, self.headers, self.timeout = base_url, headers, timeout

    def generate(self, prompt, adapter_id=None, **parameters):
        body = {"inputs": prompt, "parameters": {"adapter_id": adapter_id, **parameters}, "stream": False}
        r = httpx.post(self.base_url, json=body, headers=self.headers, timeout=self.timeout)
        r.raise_for_status()
        return types.SimpleNamespace(**r.json()[0])
"""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    skip: str | None  # why it is not run, from a `<!-- not run ... -->` comment on the line above

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = before if before.startswith("<!-- not run") else None
        found.append(Block(path, text.count("\n", 0, m.start()) + 1, m[1], m[2], skip))
    return found


BLOCKS = [b for path in DOCS for b in code_blocks(path)]
RUNNABLE = [b for b in BLOCKS if b.lang in RUN and b.skip is None]


def test_the_readme_is_a_few_screens():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


def test_the_set_up_commands_are_the_makefiles():
    readme = (ROOT / "README.md").read_text()
    assert "\nmake serve   # " in readme and "\nmake test    # " in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve: install\n\t\$\(BIN\)/mux serve ", makefile, re.M)
    assert re.search(r"^test: install\n\t\$\(BIN\)/ruff check \.\n\t\$\(BIN\)/python -m pytest", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_block_names_its_language():
    assert [str(b) for b in BLOCKS if not b.lang] == []
    assert len(RUNNABLE) >= 5


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "toml"], ids=str)
def test_policy_examples_load(block, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(block.code)
    load_policy(policy)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_exist(doc):
    text = _FENCE.sub("", doc.read_text())
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        where = (doc.parent / file).resolve() if file else doc
        missing_anchor = anchor and where.suffix == ".md" and where.exists() and anchor not in _anchors(where)
        if not where.exists() or missing_anchor:
            broken.append(target)
    for span in _CODE.findall(text):
        if _REPO_PATH.fullmatch(span) and not (ROOT / span).exists():
            broken.append(span)
    assert broken == []


def test_api_doc_lists_every_route_and_no_other(tmp_path):
    from mux.server.app import ServerState, create_app

    app = create_app(ServerState(lambda: None, tmp_path))
    served = {
        (method, route.path.replace(":path}", "}")) for route in app.routes for method in route.methods - {"HEAD"}
    }
    documented = set(_ROUTE_ROW.findall((ROOT / "docs" / "api.md").read_text()))
    assert served - documented == set()
    assert documented - served == set()


def _flags(argv: list[str], capsys) -> set[str]:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))


def _named_flags(is_about) -> set[str]:
    """The flags on the lines of README.md and docs/ that `is_about(doc, line)` picks."""
    named = set()
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            if is_about(doc, line):
                named |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
    return named


def test_documented_serve_flags_are_the_clis(capsys):
    serve = _flags(["serve"], capsys)
    named = _named_flags(lambda doc, line: "mux serve" in line or (doc.name == "operations.md" and line[:4] == "| `-"))
    assert named and named - serve == set()


def test_documented_client_flags_are_the_clis(capsys):
    commands = [["adapters", v] for v in ("list", "show", "upload", "rm")] + [["stats"]]
    commands += [["rollout", v] for v in ("show", "split", "promote", "rollback")]
    real = set().union(*(_flags(c, capsys) for c in commands))
    named = _named_flags(lambda doc, line: any(f"mux {c}" in line for c in ("adapters", "stats", "rollout")))
    assert {"--json", "--no-activate", "--watch", "--guard-min-requests"} <= named and named - real == set()


def test_documented_batch_flags_are_the_clis(capsys):
    section = (ROOT / "docs" / "operations.md").read_text().split("### `mux batch`")[1].split("\n#")[0]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", section))
    assert {"--model", "--adapter-dir", "--no-progress"} <= named and named - _flags(["batch"], capsys) == set()


# ---- the runnable blocks, against a real server -------------------------------------------------------
@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir, grpc_port):
    adapters = tmp_path_factory.mktemp("docs-adapters")
    shutil.copytree(ROOT / "adapters" / "demo", adapters / "demo")
    with run_server(smollm2_dir, adapters, "--grpc-port", str(grpc_port)) as base:
        yield base


@pytest.fixture(scope="module")
def env(server, tmp_path_factory):
    shim = tmp_path_factory.mktemp("shims")
    try:
        import lorax  # noqa: F401
    except ImportError:
        (shim / "lorax").mkdir()
        (shim / "lorax" / "__init__.py").write_text(LORAX_SHIM)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": f"{ROOT}{os.pathsep}{shim}", "MUX_URL": server}


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_block_runs(block, server, grpc_port, env):
    if block.lang == "bash" and shutil.which("curl") is None and "curl " in block.code:
        pytest.skip("no curl on this machine")
    code = block.code.replace(DOCUMENTED_ADDRESS, server.removeprefix("http://"))
    code = code.replace(DOCUMENTED_GRPC_ADDRESS, f"127.0.0.1:{grpc_port}")
    command = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "bash" else [sys.executable, "-c", code]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{block}:\n{out.stdout}\n{out.stderr}"
    assert out.stdout.strip(), f"{block} printed nothing"
    assert '"error"' not in out.stdout, f"{block}:\n{out.stdout}"


def test_documented_metrics_exist(server):
    text = httpx.get(f"{server}/metrics", timeout=30).text
    exposed = set(re.findall(r"^(mux_\w+)", text, re.M)) | set(re.findall(r"^# TYPE (mux_\w+)", text, re.M))
    named = set(re.findall(r"`(mux_\w+)", (ROOT / "docs" / "operations.md").read_text()))
    assert named and named - exposed == set()


def test_every_runnable_language_is_run():
    """A block in a language the tests do not run must say so: nothing runnable is silently left out."""
    silent = [str(b) for b in BLOCKS if b.skip is None and b.lang not in RUN | {"toml", "text"}]
    assert silent == []
