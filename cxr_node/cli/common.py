"""What every command group shares: the ``--config`` flag, settings, user errors, peers and file lists."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeAlias

from cxr_node.config import Destination, Settings, config_path, load_settings
from cxr_node.errors import ConfigError, CxrNodeError
from cxr_node.send.scu import PeerAddress

Command = Callable[[argparse.Namespace], int]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def config_parent() -> argparse.ArgumentParser:
    """The parent parser of every command that reads the configuration (``--config FILE``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"YAML configuration (default: $CXR_NODE_CONFIG or {config_path(None)})",
    )
    return parent


def settings(args: argparse.Namespace) -> Settings:
    """The settings of ``--config`` (or the default file), with any overrides the command set."""
    loaded = load_settings(args.config)
    overrides = {key: value for key, value in getattr(args, "overrides", {}).items() if value is not None}
    return loaded.with_overrides(overrides) if overrides else loaded


@contextmanager
def user_errors(hint: str = "") -> Iterator[None]:
    """Turn a ValueError raised by the code below (bad input the user gave) into a one-line CLI error."""
    try:
        yield
    except ValueError as exc:
        raise CxrNodeError(f"{exc}{hint}") from exc


def peer(args: argparse.Namespace, target: str) -> tuple[PeerAddress, str]:
    """The peer ``target`` names (``AE@host:port`` or a configured destination) and the calling AE title to use.

    A destination is reached as the deliveries reach it: its TLS settings and ``delivery.calling_ae_title``.

    Raises
    ------
    ConfigError
        When ``target`` is neither an address nor a destination of the configuration.
    """
    calling = args.calling_aet
    try:
        return PeerAddress.parse(target), calling or "CXR_NODE"
    except ValueError:
        pass
    found = settings(args)
    return PeerAddress.of(destination(args, target)), calling or found.delivery.calling_ae_title


def destination(args: argparse.Namespace, target: str) -> Destination:
    """The destination of the configuration named ``target``.

    Raises
    ------
    ConfigError
        When there is none (the message lists those configured).
    """
    found = settings(args)
    for candidate in found.destinations:
        if candidate.name == target:
            return candidate
    names = ", ".join(d.name for d in found.destinations) or "none configured"
    raise ConfigError(f"{target!r} is neither AE@host:port nor a destination in {found.source} ({names})")


def dicomweb_destination(args: argparse.Namespace, target: str) -> Destination | None:
    """The ``protocol: dicomweb`` destination ``target`` names, or None (an address, or a DIMSE destination)."""
    if PeerAddress.matches(target):
        return None
    found = destination(args, target)
    return found if found.protocol == "dicomweb" else None


def expand(items: Sequence[str]) -> list[Path]:
    """Files named, and every file under the folders named.

    Raises
    ------
    CxrNodeError
        When a name is neither a file nor a folder.
    """
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise CxrNodeError(f"{item}: no such file or folder")
    return files
