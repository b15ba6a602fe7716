"""The benchmarks' checks of ``--zoo``: the zoo exists (and, with an SLO config, the config's
tasks belong to it and have profile data), so that a script stops with one line instead of
a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def zoo_config(config: str, zoo: str) -> tuple[Any, str]:
    """The SLO config ``config``, checked against ``zoo`` (a name or a folder): its tasks must be
    families of that zoo, with rows in the device's profile dataset; else the script stops with
    a one-line error. Returns the config and the zoo's name (``zoo_name``)."""
    from loom.app.config import load_slo_config
    from loom.core.errors import LoomError
    from loom.core.paths import REPO_ROOT, resolve_zoo, zoo_name, zoo_tasks
    from loom.processors.device import load_device_profile, resolve_profile_path
    from loom.profiling.dataset import META_JSON, load_profile_dataset

    def rel(p: Path) -> Path:
        p = p.resolve()
        return p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p

    try:
        folder = resolve_zoo(zoo)
        name, have = zoo_name(folder), zoo_tasks(folder)
        cfg = load_slo_config(config)
        outside = [t for t in cfg.tasks if t.family.resolve().parent != folder.resolve()]
        if outside:
            raise SystemExit(f"error: {config}: task(s) {', '.join(t.name for t in outside)} not in the {name} zoo "
                             f"({rel(folder)}: {', '.join(have)}): give --config an SLO config for its tasks, "
                             f"or --zoo {zoo_name(outside[0].family.resolve().parent)}")
        if cfg.estimators is None:  # (else the config's estimators folder answers for its tasks)
            data = REPO_ROOT / "profiles" / "data" / load_device_profile(cfg.device).name
            rows = load_profile_dataset(data).blocks if (data / META_JSON).is_file() else []
            profiled = {r["task"] for r in rows if r["status"] == "ok"}
            missing = [t.name for t in cfg.tasks if t.name not in profiled]
            if missing:
                raise SystemExit(f"error: no profile data for task {', '.join(missing)} in {rel(data)}: run `loom "
                                 f"profile --device {rel(resolve_profile_path(cfg.device))} --zoo {name}` first")
    except (LoomError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return cfg, name


def zoo_folder_and_tasks(zoo: str, tasks: list[str] | None = None) -> tuple[Path, list[str]]:
    """The folder of ``zoo`` (a name or a folder) and ``tasks`` (default: all of its tasks);
    the script stops with a one-line error when the zoo is not there."""
    from loom.core.errors import LoomError
    from loom.core.paths import resolve_zoo, zoo_tasks

    try:
        folder = resolve_zoo(zoo)
        return folder, list(tasks) if tasks else zoo_tasks(folder)
    except (LoomError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
