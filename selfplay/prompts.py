"""Jinja2 prompt templates, one file per turn kind and variant, chosen by `config.prompts`.

Templates use StrictUndefined and are rendered once with each turn's example variables at start-up,
so a missing file or variable is a one-line error before any compute is spent.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from roles import TURNS
from selfplay.config import ConfigError, PromptsCfg, asset_dir


def prompt_dir(name: str) -> Path:
    """A shipped prompt folder (`tiny`, `chat`), or a user's own folder given by path."""
    shipped = asset_dir("prompts") / name
    if shipped.is_dir() and not Path(name).is_absolute():
        return shipped
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    raise ConfigError(f"prompts.dir: folder not found: {name} (shipped: "
                      f"{', '.join(sorted(p.name for p in asset_dir('prompts').iterdir() if p.is_dir()))})")


class Prompts:
    def __init__(self, cfg: PromptsCfg):
        folder = prompt_dir(cfg.dir)
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)),
                                 undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        self.templates = {}
        for kind, turn in TURNS.items():
            name = getattr(cfg, kind)
            try:
                self.templates[kind] = t = env.get_template(name)
                t.render(**turn.example_vars)
            except jinja2.TemplateNotFound:
                raise ConfigError(f"prompts.{kind}: template not found: {folder / name}") from None
            except jinja2.TemplateError as e:
                raise ConfigError(f"prompts.{kind} ({name}): {e}") from None

    def render(self, kind: str, **vars) -> str:
        return self.templates[kind].render(**vars)
