"""lora-mux on Ray Serve (the `ray` extra): an ingress in front of engine replicas, with adapter-affinity routing
through Ray's model multiplexing. `serve run mux.ray:app model=... adapter_dir=...` builds the application."""

from mux.ray.app import app, build

__all__ = ["app", "build"]
