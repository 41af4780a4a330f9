"""Print pip constraints that pin the libraries the suite is tested against at their oldest admitted releases: the
`>=` floors that setup.cfg declares for transformers, datasets, accelerate and numpy (one source of truth)."""

import configparser
import re
from pathlib import Path

PINNED = ("transformers", "datasets", "accelerate", "numpy")


def floors(setup_cfg: Path) -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    lines = config["options"]["install_requires"].splitlines()
    for extra in config["options.extras_require"].values():
        lines += extra.splitlines()
    found = {}
    for line in lines:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", line)
        if match and match.group(1).lower() in PINNED:
            found[match.group(1).lower()] = match.group(2)
    missing = set(PINNED) - set(found)
    if missing:
        raise SystemExit(f"setup.cfg declares no >= floor for {sorted(missing)}")
    return found


if __name__ == "__main__":
    for name, version in floors(Path(__file__).resolve().parents[1] / "setup.cfg").items():
        print(f"{name}=={version}")
