"""A StudyConfig written back as a study file: every setting, defaults included (`hpo create --explain`)."""

from __future__ import annotations

from hpo.settings.config import StudyConfig
from hpo.settings.reader import toml_value


def to_toml(cfg: StudyConfig) -> str:
    """Every setting the study runs with, defaults included, as a study file (`hpo create --explain`)."""
    raw = cfg.to_dict()
    lines = [f"{k} = {toml_value(raw[k])}" for k in ("name", "description", "metric", "direction", "seed")]
    budget = {k: v for k, v in raw["budget"].items() if k != "time_s"}
    if cfg.budget.time_s is not None:
        budget["time"] = f"{cfg.budget.time_s:g}s"
    sections = {
        "budget": budget,
        "sampler": {"name": cfg.sampler.name, **cfg.sampler.options},
        "pruner": {"name": cfg.pruner.name, **cfg.pruner.options},
        "augment": raw["augment"],
        "train": raw["train"],
        "final": raw["final"],
        "checkpoints": raw["checkpoints"],
        "data": {k: v for k, v in raw["data"].items() if v not in ("", None, [])},
    }
    for title, table in sections.items():
        lines += ["", f"[{title}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
    warm = cfg.warm_start
    if warm.from_study is not None or warm.params:
        lines += ["", "[warm_start]"] + (
            [f"from = {toml_value(warm.from_study)}", f"top = {warm.top}"] if warm.from_study is not None else []
        )
        for params in warm.params:
            lines += ["[[warm_start.params]]"] + [f"{k} = {toml_value(v)}" for k, v in params.items()]
    lines += ["", "[space]"] + [f"{k} = {toml_value(v)}" for k, v in raw["space"].items()]
    return "\n".join(lines) + "\n"
