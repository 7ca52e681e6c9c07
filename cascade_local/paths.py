"""Where cascade-local keeps user state: one folder, movable with CASCADE_LOCAL_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import click


def home() -> Path:
    """$CASCADE_LOCAL_HOME, else the platform's per-user application folder."""
    override = os.environ.get("CASCADE_LOCAL_HOME")
    return Path(override).expanduser() if override else Path(click.get_app_dir("cascade-local"))


def models_dir() -> Path:
    return home() / "models"
