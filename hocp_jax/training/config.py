"""Config validation: unknown, missing or ill-typed keys -> one clear ``ValueError``."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Check = tuple[Callable[[Any], bool], str]


def is_config_dict(value) -> bool:
    """Whether ``value`` is a config dict: a mapping with ``keys`` (dict, ``ConfigDict``)."""
    return callable(getattr(value, "keys", None))


def validate_config(
    cfg: Mapping[str, Any],
    required_keys: Iterable[str],
    optional_keys: Iterable[str] = (),
    *,
    checks: Mapping[str, Check] | None = None,
    name: str = "config",
    open_keys: bool = False,
) -> None:
    """Checks the top-level keys of ``cfg`` (a dict or ``ml_collections.ConfigDict``).

    Args:
        cfg: the config (validate a sub-config with its own call, e.g. ``name="config.optimizer"``).
        required_keys: keys that must be present.
        optional_keys: keys that may be present; any other key is an error (typo guard).
        checks: ``{key: (predicate, "what is expected")}`` applied to present keys.
        name: how ``cfg`` is called in error messages.
        open_keys: other keys pass unchecked (``cfg`` is validated in parts, e.g. the
            top-level config whose sub-configs have their own calls).

    Raises:
        ValueError: ``cfg`` is not a config dict (e.g. ``None``); else listing every missing key,
            unknown key (with a close-match suggestion) and value failing its check (no unknown
            keys with ``open_keys``).
    """
    if not is_config_dict(cfg):
        raise ValueError(f"invalid {name}: {name}={cfg!r}: expected a config dict (a dict or ConfigDict of keys)")
    required, optional = list(required_keys), list(optional_keys)
    allowed = set(required) | set(optional)
    keys = list(cfg.keys())
    errors = [f"missing required key {name}.{k}" for k in required if k not in keys]
    for k in [] if open_keys else [k for k in keys if k not in allowed]:
        close = difflib.get_close_matches(k, sorted(allowed), n=1)
        hint = f" (did you mean {name}.{close[0]}?)" if close else ""
        errors.append(f"unknown key {name}.{k}{hint}")
    for k, (ok, expected) in (checks or {}).items():
        if k in keys and not ok(cfg[k]):
            errors.append(f"bad value {name}.{k}={cfg[k]!r}: expected {expected}")
    if errors:
        listing = "" if open_keys else f". Allowed keys: {sorted(allowed)}"
        raise ValueError(f"invalid {name}: " + "; ".join(errors) + listing)
