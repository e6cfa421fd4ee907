"""Config resolution: presets, each head's settings and the checks that need the registries.

    defaults < benchmark preset (its reader's registration) < method preset
    < the method's preset for that benchmark < config file < overrides

`clpt.config` holds the dataclasses and their own value checks; this module
composes them with the registries (benchmark readers, methods, heads) and
reports every problem at once in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import typing
from pathlib import Path
from typing import Any

from clpt import config as C
from clpt.config import BenchmarkConfig, DriftConfig, HeadsConfig, RunConfig
from clpt.data.registry import READERS
from clpt.drift_methods import DRIFT_METHODS
from clpt.errors import ConfigError
from clpt.heads import HEADS
from clpt.methods import METHODS, REQUIRED_KEYS


def default_config() -> RunConfig:
    """The dataclass defaults, with every registered head's default settings."""
    cfg = RunConfig()
    cfg.heads.settings = {name: spec.config_cls() for name, spec in HEADS.items()}
    cfg.drift.settings = {name: spec.config_cls() for name, spec in DRIFT_METHODS.items()}
    return cfg


def _build_registered(
    raw: Any, section: str, own: str, registry, settings: dict, take_own, problems: list[str]
) -> None:
    """`section: {own: ..., <registered name>: {...}}`: each name's settings are its registered dataclass."""
    if not isinstance(raw, dict):
        problems.append(f"{section}: expected a mapping, got {raw!r}")
        return
    for key, value in raw.items():
        if key == own:
            take_own(value)
        elif key in registry:
            settings[key] = C.build_section(registry.get(key).config_cls, value, f"{section}.{key}", problems)
        else:
            problems.append(f"{section}.{key}: unknown key (valid: {own}, {', '.join(registry.names())})")


def _build_heads(raw: Any, problems: list[str]) -> HeadsConfig:
    """`heads: {enabled: [...], <head>: {...}}`."""
    heads = default_config().heads

    def enabled(value: Any) -> None:
        heads.enabled = C.coerce(value, list[str], "heads.enabled", problems) or []
        bad = [h for h in heads.enabled if h not in HEADS]
        if bad:
            problems.append(f"heads.enabled: {bad} not among: {', '.join(HEADS.names())}")

    _build_registered(raw, "heads", "enabled", HEADS, heads.settings, enabled, problems)
    return heads


def _build_drift(raw: Any, problems: list[str]) -> DriftConfig:
    """`drift: {method: NAME, <method>: {...}}`."""
    drift = default_config().drift

    def method(value: Any) -> None:
        drift.method = C.coerce(value, str, "drift.method", problems) or "none"

    _build_registered(raw, "drift", "method", DRIFT_METHODS, drift.settings, method, problems)
    return drift


def registry_problems(cfg: RunConfig) -> list[str]:
    """The checks that need a registry: benchmark and method names, what a method must set."""
    out = []
    if isinstance(cfg.benchmark.name, str) and cfg.benchmark.name not in READERS:
        out.append(f"benchmark.name: {cfg.benchmark.name!r} is not one of: {', '.join(READERS.names())}")
    if isinstance(cfg.method, str):
        if cfg.method not in METHODS:
            out.append(f"method: {cfg.method!r} is not one of: {', '.join(METHODS.names())}")
        else:
            for key in REQUIRED_KEYS:
                section, name = key.split(".")
                if getattr(getattr(cfg, section), name) is None:
                    out.append(f"{key}: method {cfg.method!r} leaves it unset; its registration must set it "
                               f"(or give {key} in the config)")  # fmt: skip
    return out


def build_config(raw: dict, source: str = "config") -> RunConfig:
    """Typed, validated RunConfig from a raw (already merged) dictionary."""
    problems: list[str] = []
    cfg = default_config()
    hints = typing.get_type_hints(RunConfig)
    valid = {f.name for f in dataclasses.fields(RunConfig)}
    for key in raw:
        if key not in valid:
            problems.append(f"{key}: unknown key (valid: {', '.join(sorted(valid))})")
    for f in dataclasses.fields(RunConfig):
        if f.name not in raw:
            continue
        if f.name == "heads":
            cfg.heads = _build_heads(raw[f.name], problems)
        elif f.name == "drift":
            cfg.drift = _build_drift(raw[f.name], problems)
        elif f.name in C.SECTIONS:
            setattr(cfg, f.name, C.build_section(hints[f.name], raw[f.name], f.name, problems))
        else:
            setattr(cfg, f.name, C.coerce(raw[f.name], hints[f.name], f.name, problems))
    problems += registry_problems(cfg) + cfg.problems()  # value checks skip fields whose type was wrong
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


log = logging.getLogger("clpt")


def presets(benchmark: Any, method: Any) -> dict:
    """The raw config sections the benchmark's reader and the method preset, merged (lowest first)."""
    base: dict = {}
    if isinstance(benchmark, str) and benchmark in READERS:
        base = C.deep_merge(base, READERS.get(benchmark).preset)
    if isinstance(method, str) and method in METHODS:
        spec = METHODS.get(method)
        base = C.deep_merge(base, spec.preset)
        base = C.deep_merge(base, spec.benchmark_presets.get(benchmark, {}))
    return base


def resolve(file: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < benchmark preset < method preset < file < overrides, validated."""
    user: dict = {}
    source = "config"
    if file is not None:
        user = C.load_file(file)
        source = str(file)
    user = C.deep_merge(user, C.overrides_to_dict(overrides or []))
    section = user.get("benchmark")
    bench = section.get("name", BenchmarkConfig.name) if isinstance(section, dict) else BenchmarkConfig.name
    method = user.get("method", RunConfig.method)
    preset = presets(bench, method)
    merged = C.deep_merge(preset, user)
    _scale_milestones(merged, user, preset)
    return build_config(merged, source=source)


def _scale_milestones(merged: dict, user: dict, preset: dict) -> None:
    """`train.epochs` set without `train.milestones`, where the preset's milestones do not fit the new
    epochs (`--set train.epochs=2` on a preset with a milestone at epoch 5): the milestones are scaled
    by new / preset epochs (rounded, at least 1, duplicates dropped), with a warning naming both."""
    train, mine = merged.get("train"), user.get("train")
    if not isinstance(train, dict) or not isinstance(mine, dict) or "epochs" not in mine or "milestones" in mine:
        return
    epochs, ms = train.get("epochs"), train.get("milestones")
    preset_epochs = (preset.get("train") or {}).get("epochs", C.TrainConfig.epochs)
    if not (isinstance(epochs, int) and isinstance(preset_epochs, int) and preset_epochs > 0 and isinstance(ms, list)
            and all(isinstance(m, int) for m in ms)):  # fmt: skip
        return
    if all(1 <= m <= epochs for m in ms):
        return
    scaled = sorted({min(epochs, max(1, round(m * epochs / preset_epochs))) for m in ms})
    log.warning("train.milestones %s scaled to %s for train.epochs=%d (the preset's are for %d epochs; "
                "set train.milestones to choose them)", ms, scaled, epochs, preset_epochs)  # fmt: skip
    train["milestones"] = scaled


def load_resolved(path: str | Path) -> RunConfig:
    """Read a saved, resolved config (as written by `clpt.config.dump_yaml`) back, validated.

    Read with the same precedence as a new run's config: every key the file has
    wins, so a fully resolved file reads back unchanged, and a key it lacks (added
    by a newer clpt) takes its benchmark's and method's preset, not the bare default.
    """
    return resolve(path)


def describe_defaults() -> list[tuple[str, Any, str]]:
    """(dotted key, default, the comment its dataclass gives it) for every config key, heads and drift
    methods included: what `clpt config --defaults` lists."""
    import inspect
    import re

    def comments(cls) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            return out
        for i, line in enumerate(lines):
            m = re.match(r"\s+(\w+):[^#]*?(?:#\s*(.*))?$", line)
            if not m or line.strip().startswith("#"):
                continue
            if m.group(2):
                out[m.group(1)] = m.group(2).strip()
            elif line.rstrip().endswith("(") and i + 1 < len(lines) and "#" in lines[i + 1]:
                out[m.group(1)] = lines[i + 1].split("#", 1)[1].strip()  # a default wrapped over lines
        return out

    cfg = default_config()
    rows: list[tuple[str, Any, str]] = []

    def walk(obj, prefix: str) -> None:
        notes = comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if f.name == "settings" and isinstance(value, dict):
                for name, sub in value.items():
                    walk(sub, f"{prefix}{name}.")
            elif dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                rows.append(
                    (key, value.value if isinstance(value, enum.Enum) else value, notes.get(f.name, ""))
                )

    walk(cfg, "")
    return rows
