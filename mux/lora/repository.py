"""The adapter repository on disk: <root>/<tenant>/<name>/{adapter_config.json, adapter_model.safetensors}."""

from __future__ import annotations

import re
from pathlib import Path

from mux.errors import AdapterNotFound
from mux.lora.adapter import CONFIG_FILE

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def valid_part(part: str) -> bool:
    return bool(_PART.match(part)) and ".." not in part


class AdapterRepository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ids(self) -> list[str]:
        """Every adapter id (`tenant/name`) present on disk, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            f"{cfg.parent.parent.name}/{cfg.parent.name}"
            for cfg in self.root.glob(f"*/*/{CONFIG_FILE}")
            if valid_part(cfg.parent.parent.name) and valid_part(cfg.parent.name)
        )

    def path(self, adapter_id: str) -> Path:
        tenant, _, name = adapter_id.partition("/")
        if not (valid_part(tenant) and valid_part(name)):
            raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
        path = self.root / tenant / name
        if not (path / CONFIG_FILE).is_file():
            raise AdapterNotFound(f"The model `{adapter_id}` does not exist.")
        return path
