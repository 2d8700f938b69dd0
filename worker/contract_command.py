"""``outbox-worker contract``: the event contract document, generated from the registry.

``--registry module:attr`` names the application's :class:`outbox.EventRegistry`
(or a function that returns one), imported with the current directory on the
import path. Without other options the Markdown goes to stdout; ``--output FILE``
writes it; ``--check FILE`` compares it with FILE and exits 1, with one line on
stderr, when FILE is missing or differs (for CI). A ``--registry`` that cannot be
imported or is not a registry exits 2. No database is needed.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from outbox import EventRegistry, render_markdown
from outbox.exceptions import OutboxError

__all__ = ["RegistryLoadError", "contract", "load_registry"]


class RegistryLoadError(OutboxError):
    """``--registry`` does not name an importable EventRegistry."""


def load_registry(spec: str) -> EventRegistry:
    """Import ``module:attr`` (``attr`` may be dotted) and return the registry it names.

    ``attr`` may also be a function of no arguments that returns the registry. The
    current directory is put on ``sys.path`` first, as ``python -m`` would. Raises
    :class:`RegistryLoadError` with a one-line reason.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise RegistryLoadError(f"--registry {spec!r} is not in the form module:attribute")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raised on import
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise RegistryLoadError(
            f"--registry: cannot import {module_name!r}: {type(exc).__name__}: {reason}"
        ) from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise RegistryLoadError(
                f"--registry: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if callable(target) and not isinstance(target, EventRegistry):
        target = target()
    if not isinstance(target, EventRegistry):
        raise RegistryLoadError(
            f"--registry: {spec} is a {type(target).__name__}, not an outbox.EventRegistry"
        )
    return target


def contract(*, registry: str, output: str | None = None, check: str | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 stale)."""
    text = render_markdown(load_registry(registry))
    if check is not None:
        path = Path(check)
        regenerate = f"outbox-worker contract --registry {registry} --output {check}"
        try:
            committed = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            print(f"outbox-worker: {check} does not exist; run `{regenerate}`", file=sys.stderr)
            return 1
        if committed != text:
            print(
                f"outbox-worker: {check} is stale: it differs from the registry; run "
                f"`{regenerate}`",
                file=sys.stderr,
            )
            return 1
        print(f"{check} is up to date", file=sys.stderr)
        return 0
    if output is not None:
        Path(output).write_text(text, encoding="utf-8")
        return 0
    sys.stdout.write(text)
    return 0
