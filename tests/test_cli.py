"""`mux` command line: key hashing, and refusing an open non-loopback bind, a bad policy file, device or dtype."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mux.server.auth import hash_key


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mux.cli", *args], capture_output=True, text=True, timeout=120)


def test_hash_key():
    out = run("hash-key", "s3cret")
    assert out.returncode == 0 and out.stdout.strip() == hash_key("s3cret")


def refused(capsys, *args: str) -> str:
    """What `mux serve ...` prints when it refuses its command line (in process: no server starts)."""
    from mux import cli

    assert cli.main(list(args)) == 2
    return capsys.readouterr().err


def test_open_server_refuses_a_public_bind(capsys):
    err = refused(capsys, "serve", "--host", "0.0.0.0", "--port", "1")
    assert "no API keys are configured" in err and "--insecure" in err


def test_bad_policy_file_is_reported(tmp_path, capsys):
    f = tmp_path / "p.toml"
    f.write_text("[tiers]\nmax_slots = 3\n")
    assert "max_slots" in refused(capsys, "serve", "--policy", str(f))
    f.write_text("[scheduler]\nmax_num_batched_tokens = 0\n")
    batch = ["batch", "-i", str(f), "-o", str(tmp_path / "out.jsonl"), "--policy", str(f)]
    assert "max_num_batched_tokens must be ≥ 1, got 0" in refused(capsys, *batch)


def test_unknown_device_or_dtype_is_reported(capsys):
    for device in ("tpu", "cuda:abc", "cuda0"):
        assert f"unknown device '{device}'" in refused(capsys, "serve", "--device", device)
    assert "unknown dtype 'int4'" in refused(capsys, "serve", "--dtype", "int4", "--enforce-eager")


def test_an_unknown_quantization_is_refused_from_the_flag_or_the_policy(capsys, tmp_path):
    from mux import cli

    with pytest.raises(SystemExit) as exit_:  # argparse's choices
        cli.main(["serve", "--quantization", "int3"])
    assert exit_.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    policy = tmp_path / "p.toml"
    policy.write_text('[model]\nquantization = "fp4"\n')
    assert "unknown quantization 'fp4'" in refused(capsys, "serve", "--policy", str(policy))


def test_the_package_version_is_pyprojects():
    import tomllib
    from pathlib import Path

    import mux

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert mux.__version__ == project["version"]


def test_enforce_eager_turns_off_graphs_and_the_cpu_decode_loop(monkeypatch, tmp_path):
    """--enforce-eager: decode steps through the model's own forward on both devices (vLLM's flag)."""
    import uvicorn

    from mux import cli
    from mux.engine import engine
    from mux.server import app

    configs = []
    monkeypatch.setattr(engine, "Engine", configs.append)  # the config the server's engine would be built with
    monkeypatch.setattr(engine, "freeze_heap", lambda: None)
    monkeypatch.setattr(app, "create_app", lambda state: state.make_engine())
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    for flags in ((), ("--enforce-eager",)):
        cli.main(["serve", "--adapter-dir", str(tmp_path), *flags])
    (default, eager) = (c.model for c in configs)
    assert not default.enforce_eager and eager.enforce_eager and default.backend == "auto"


def test_mux_batch_refuses_missing_files_and_an_unreachable_server(tmp_path, capsys):
    from mux import cli

    lines = tmp_path / "in.jsonl"
    lines.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(out)]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["batch", "-i", str(lines), "-o", str(tmp_path / "no-dir" / "out.jsonl")]) == 1
    assert "no directory" in capsys.readouterr().err
    assert cli.main(["batch", "-i", str(lines), "-o", str(out), "--url", "http://127.0.0.1:1", "--timeout", "5"]) == 1
    assert "POST http://127.0.0.1:1/v1/files" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no work directory left


def test_ray_flags_without_the_ray_extra_are_refused(monkeypatch, tmp_path, capsys):
    from mux import cli

    for name in [m for m in sys.modules if m.split(".")[0] == "ray" or m.startswith("mux.ray")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert cli.main(["serve", "--adapter-dir", str(tmp_path), "--replicas", "2"]) == 2
    assert "pip install 'lora-mux[ray]'" in capsys.readouterr().err
