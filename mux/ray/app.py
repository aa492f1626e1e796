"""The Ray Serve application: an ingress, the engine replicas (autoscaled or not) and the stats board; built from
`mux serve`'s own flags, by `mux serve --replicas N`, `serve run mux.ray:app key=value ...` or a config file."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

from ray import serve
from ray.serve import Application

from mux.lora.repository import AdapterRepository
from mux.ray.board import MuxBoard
from mux.ray.ingress import MuxIngress
from mux.ray.replica import MuxReplica

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RayConfig:
    """The replicas: a fixed count, or autoscaled between `min_replicas` and `max_replicas` (0: scale to zero)."""

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.min_replicas is not None and self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.autoscaled and self.max_replicas < max(1, self.min_replicas or 0):
            raise ValueError(f"max_replicas must be >= max(1, min_replicas), got {self.max_replicas}")
        if not self.autoscaled and (self.min_replicas is not None or self.target_ongoing_requests is not None):
            raise ValueError("--min-replicas and --target-ongoing-requests need --max-replicas")

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas is not None

    def deployment_options(self, max_num_seqs: int) -> dict:
        """MuxReplica's options: Ray Serve's `num_replicas` or `autoscaling_config`, its resources, and its room:
        Ray's router sends a replica at most as many requests as its scheduler runs sequences at once (past that,
        affinity yields to load: another replica gets the adapter too)."""
        options = {
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
            "max_ongoing_requests": max_num_seqs,
        }
        if not self.autoscaled:
            return options | {"num_replicas": self.replicas or 1}
        scaling = {"min_replicas": self.min_replicas or 0, "max_replicas": self.max_replicas}
        if self.replicas is not None:
            scaling["initial_replicas"] = self.replicas
        if self.target_ongoing_requests is not None:
            scaling["target_ongoing_requests"] = self.target_ongoing_requests
        return options | {"autoscaling_config": scaling}

    @classmethod
    def of(cls, args: argparse.Namespace) -> RayConfig:
        return cls(
            args.replicas,
            args.min_replicas,
            args.max_replicas,
            args.target_ongoing_requests,
            args.replica_cpus,
            args.replica_gpus,
        )


def build(args: argparse.Namespace, affinity: bool = True) -> Application:
    """The application of `mux serve`'s parsed flags (`affinity` off: routing by load alone, for comparison). The
    shared repository is tidied once, here: a replica that restarts must not remove another's upload in progress."""
    from mux import cli

    policy, _ = cli.engine_setup(args)
    cli.checked_auth(args, policy)  # `--host`: Ray's proxy binds there (`mux serve`; a config's http_options)
    try:
        options = RayConfig.of(args).deployment_options(policy.scheduler.max_num_seqs)
    except ValueError as e:
        raise cli.Refused(str(e)) from None
    for leftover in AdapterRepository(args.adapter_dir).recover():
        log.warning("removed a leftover of an interrupted upload: %s", leftover)
    board = MuxBoard.bind()
    replicas = MuxReplica.options(**options).bind(args, board)
    return MuxIngress.bind(args, replicas, board, affinity)


def app(options: dict) -> Application:
    """`serve run mux.ray:app model=/models/x adapter_dir=/shared/adapters replicas=2 ...` (or a config file's
    `args`): each key is a `mux serve` flag, underscores or dashes; `true`/`false` turn a switch on or off."""
    from mux import cli

    return build(cli.parser().parse_args(serve_argv(options)))


def serve_argv(options: dict) -> list[str]:
    argv = ["serve"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if str(value).lower() == "false":
            argv += [f"--no-{flag[2:]}"] if flag == "--enable-prefix-caching" else []
        else:
            argv += [flag] if str(value).lower() == "true" else [flag, str(value)]
    return argv


def serve_on_ray(args: argparse.Namespace) -> int:
    """`mux serve --replicas N` (or --ray-address, --max-replicas): run the application until interrupted."""
    import ray

    application = build(args)  # bad flags are refused before Ray starts
    ray.init(address=args.ray_address, logging_level=args.log_level.upper())
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="mux", route_prefix="/")
    print(f"mux: serving on Ray Serve at http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
