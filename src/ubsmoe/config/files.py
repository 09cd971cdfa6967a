"""Reading and writing configurations: YAML / TOML files, `--set key=value` overrides, `load_config`, `save_config`."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ubsmoe.config.errors import ConfigError, _show
from ubsmoe.config.presets import preset_overrides
from ubsmoe.config.schema import ExperimentConfig

__all__ = ["apply_override", "load_config", "parse_override", "save_config"]


# ---- files and overrides -----------------------------------------------------------------------
def _yaml() -> Any:
    try:
        import yaml
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ConfigError("reading YAML needs PyYAML: pip install pyyaml") from error
    return yaml


_LOADER: Any = None


def _yaml_loader() -> Any:
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error (not: the last wins)."""
    global _LOADER
    if _LOADER is None:
        yaml = _yaml()

        class UniqueKeyLoader(yaml.SafeLoader):
            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                if isinstance(node, yaml.MappingNode):
                    lines: dict[Any, int] = {}
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may repeat keys on purpose
                            continue
                        key = self.construct_object(key_node, deep=True)
                        try:
                            first = lines.get(key)
                        except TypeError:  # an unhashable key: SafeLoader's own error follows
                            continue
                        if first is not None:
                            raise yaml.constructor.ConstructorError(
                                None,
                                None,
                                f"duplicate key {key!r} (also on line {first}); give each key once",
                                key_node.start_mark,
                            )
                        lines[key] = key_node.start_mark.line + 1
                return super().construct_mapping(node, deep=deep)

        _LOADER = UniqueKeyLoader
    return _LOADER


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(f"duplicate key {key!r}; give each key once")
    return dict(pairs)


def _read_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file; give the path of a .yaml, .yml or .toml file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is dropped
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file ({error})") from None
    if suffix in (".yaml", ".yml"):
        yaml = _yaml()
        try:
            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader that refuses duplicate keys
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        data = {} if data is None else data
    elif suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    elif suffix == ".json":  # e.g. the config saved in a run's summary
        try:
            data = json.loads(text, object_pairs_hook=_unique_json_keys)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON: {error}") from None
        except ConfigError as error:
            raise ConfigError(f"{path}: not valid JSON: {error}") from None
    else:
        raise ConfigError(f"{path}: unknown config format {suffix or '(no suffix)'!r}; use .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the file must hold a mapping of sections (model, moe, ...), got {_show(data)}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], c) with c parsed by YAML's scalar rules ('5' -> 5, '[x, y]' -> list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. federation.rounds=5")
    yaml = _yaml()
    try:
        value = yaml.load(raw, Loader=_yaml_loader()) if raw.strip() else None  # SafeLoader, no duplicate keys
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {problem}") from None
    return [p.strip() for p in parts], value


def apply_override(data: dict[str, Any], text: str) -> None:
    """Set one `a.b=c` override in a configuration dict, in place (ConfigError for a malformed one)."""
    parts, value = parse_override(text)
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {text!r}: {here} must be an index below {len(node)}")
            node = node[int(part)]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict | list):
            raise ConfigError(f"--set {text!r}: {here} = {_show(child)} is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {text!r}: {last} must be an index below {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings (lists and values of `extra` replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), preset: str | None = None
) -> ExperimentConfig:
    """The defaults, updated by the preset (`ubsmoe.config.presets`), then by the file (YAML or TOML by suffix;
    JSON too), then by each `a.b=c` override in order.

    Raises ConfigError (one line per problem) for unreadable or malformed files, bad overrides, an unknown
    preset and invalid values.
    """
    data = _merge(ExperimentConfig().to_dict(), preset_overrides(preset))
    source = f"preset {preset!r}" if preset is not None else None
    if path is not None:
        path = Path(path)
        source = f"{source} with {path}" if source else str(path)
        data = _merge(data, _read_file(path))
    for text in overrides:
        apply_override(data, text)
    if overrides:
        source = f"{source or 'the defaults'} with --set overrides"
    return ExperimentConfig.from_dict(data, source=source)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_lines(data: dict[str, Any], prefix: str = "") -> list[str]:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            lines += ["", f"[{name}]", *_toml_lines(value, f"{name}.")]
    return lines


def save_config(config: ExperimentConfig, path: str | Path) -> Path:
    """Write the full configuration as YAML (.yaml/.yml), TOML (.toml; nulls omitted = defaults) or JSON."""
    path = Path(path)
    data = config.to_dict()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        text = _yaml().safe_dump(data, sort_keys=False)
    elif suffix == ".toml":
        text = "\n".join(_toml_lines(data)).lstrip("\n") + "\n"
    elif suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise ConfigError(f"{path}: unknown config format {suffix or '(no suffix)'!r}; use .yaml, .yml, .toml or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
