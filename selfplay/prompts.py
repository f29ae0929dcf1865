"""Jinja2 prompt templates, one file per turn kind and variant, chosen by `config.prompts`.

Templates use StrictUndefined and are rendered once with each turn's example variables at start-up,
so a missing file or variable is a one-line error before any compute is spent.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from roles import TURNS
from selfplay.config import ROOT, ConfigError, PromptsCfg


class Prompts:
    def __init__(self, cfg: PromptsCfg):
        folder = Path(cfg.dir) if Path(cfg.dir).is_absolute() else ROOT / "prompts" / cfg.dir
        if not folder.is_dir():
            raise ConfigError(f"prompts.dir: folder not found: {folder}")
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
