"""`mux serve`'s Ray flags → Ray Serve's deployment options, and the combinations refused before Ray starts."""

from __future__ import annotations

import pytest

from mux import cli

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed: pip install -e '.[ray]'")
from mux.ray.app import RayConfig, serve_argv


def test_a_fixed_count_or_autoscaling_with_scale_to_zero():
    fixed = RayConfig(replicas=3, replica_gpus=1).deployment_options(max_num_seqs=64)
    resources = {"num_cpus": 1.0, "num_gpus": 1}
    assert fixed == {"ray_actor_options": resources, "max_ongoing_requests": 64, "num_replicas": 3}
    scaled = RayConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=8).deployment_options(32)
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8}
    assert "num_replicas" not in scaled and scaled["max_ongoing_requests"] == 32


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--replicas", "0"], "replicas must be >= 1"),
        (["--min-replicas", "-1", "--max-replicas", "2"], "min_replicas must be >= 0"),
        (["--min-replicas", "3", "--max-replicas", "2"], "max_replicas must be >= max(1, min_replicas)"),
        (["--min-replicas", "0"], "need --max-replicas"),
    ],
)
def test_bad_combinations_are_refused_before_ray_starts(flags, said, tmp_path, capsys):
    assert cli.main(["serve", "--adapter-dir", str(tmp_path), *flags]) == 2
    assert said in capsys.readouterr().err


def test_serve_run_options_are_mux_serve_flags():
    options = {"adapter_dir": "/shared/a", "replicas": 2, "enforce-eager": True, "enable_prefix_caching": "false"}
    argv = serve_argv(options)
    assert argv == [
        "serve",
        "--adapter-dir",
        "/shared/a",
        "--replicas",
        "2",
        "--enforce-eager",
        "--no-enable-prefix-caching",
    ]
    args = cli.parser().parse_args(argv)
    assert args.replicas == 2 and args.enforce_eager and not args.enable_prefix_caching
