"""Hydra plumbing shared by every console script: where `conf/` lives, resolvers, user errors.

Each CLI module is a thin ``main()`` built with :func:`hydra_app`; the work itself lives in a
plain function taking a ``DictConfig`` so tests can call it after composing the real config with
Hydra's compose API (``initialize_config_dir(CONF_DIR)``).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
TOKENIZERS_DIR = REPO_ROOT / "tokenizers"

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value a user set (or left) is wrong; the message names the key and the fix."""


def repo_path(relative: str) -> str:
    """``${repo:tokenizers/shapes}`` -> absolute path inside this repository (independent of cwd)."""
    return str(REPO_ROOT / relative)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", repo_path)


register_resolvers()


def require(cfg: DictConfig, key: str, check: Callable[[Any], bool], expect: str) -> Any:
    """Return ``cfg[key]`` (dotted) after checking it; raise ConfigError naming the key otherwise."""
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if not check(value):
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expect} "
                          f"(override it on the command line, e.g. {key}=...)")
    return value


def resolve_path(path: str | Path) -> Path:
    """User paths are relative to where the command was started (Hydra keeps cwd by default)."""
    return Path(path).expanduser().resolve()


def quoted(key: str, value: str | Path) -> str:
    """The override ``key='value'`` that sets `key` to the string `value` exactly, whatever it holds: a path
    with a comma, an ``=``, brackets, spaces or quotes (``runs/multirun/.../qk_norm=True,z_loss=0.0``) is
    otherwise parsed by Hydra as a sweep, a dict or an error. Backslashes before a quote, before ``${`` and at the
    end are doubled and ``'`` / ``${`` escaped (Hydra's quoted-string rules; no interpolation)."""
    text = re.sub(r"(\\*)('|\$\{|$)", lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""),
                  str(value))
    return f"{key}='{text}'"


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a primary config of ``conf/`` outside a Hydra app (tests, the demo, notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def user_message(err: BaseException) -> str:
    """The message to show for a user error. An error raised in a DataLoader worker reaches the main process as
    "Caught ValueError in DataLoader worker process 0. Original Traceback: ... ValueError: <message>": the
    worker's own message comes first then, with where it was raised."""
    text = str(err)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    # the traceback's last line names the class, module-qualified unless it is a builtin
    marker = re.compile(rf"\n(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ")
    raised = list(marker.finditer(text))
    if not raised:
        return text
    where = text.splitlines()[0].removeprefix("Caught ").rstrip(".")
    return f"{text[raised[-1].end():].strip()} ({where})"


def hydra_app(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], None]]:
    """Turn ``task(cfg)`` into a Hydra console-script ``main``.

    User errors (bad config value, missing file, bad input: ValueError and subclasses) are
    printed as one ``error: ...`` line and exit with status 2 instead of a traceback; anything
    else is a bug and keeps its traceback. Hydra itself already rejects unknown override keys
    with a message naming the key (the composed config is in struct mode).
    """
    import hydra

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], None]:
        @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
        def _hydra_main(cfg: DictConfig) -> None:
            try:
                task(cfg)
            except USER_ERRORS as err:
                message = user_message(err)
                log.error("%s", message)
                print(f"error: {message}", file=sys.stderr)
                sys.exit(2)

        @functools.wraps(task)
        def main() -> None:
            _hydra_main()

        return main

    return decorate
