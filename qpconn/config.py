"""The configuration directory, read as qpsmtpd reads its ``config/``.

One file per setting, one value per line, ``#`` comments and blank lines ignored, so a
qpsmtpd user can point qpconn at the directory they already have. A missing file falls
back to a built-in default; with no directory at all, the defaults make a working server
that accepts mail for ``localhost`` and this host's name into ``./maildir``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["Config", "ConfigError", "DEFAULT_PLUGINS", "default_hostname"]

#: The plugin list used when the directory has no ``plugins`` file.
DEFAULT_PLUGINS = (
    "relay",
    "count_unrecognized_commands 4",
    "rcpt_ok",
    "queue/maildir ./maildir",
)

_DEFAULTS: dict[str, tuple[str, ...]] = {
    "plugins": DEFAULT_PLUGINS,
    "rcpthosts": ("localhost",),
    "timeout": ("300",),
    # 50 MiB: big enough for what people send, small enough that a disk is not filled by one.
    "databytes": ("52428800",),
    "plugin_timeout": ("30",),
    "size_threshold": ("1048576",),
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the file and the value."""


def default_hostname() -> str:
    """This machine's fully qualified name, as the default for ``me``."""
    name = socket.gethostname()
    if "." not in name:
        try:
            name = socket.getfqdn(name)
        except OSError:
            pass
    return name or "localhost"


class Config:
    """Read-only access to a config directory, with per-name caching.

    ``overrides`` take precedence over files (the ``--hostname`` option sets ``me`` this
    way); the cache means a hot path can call :meth:`get` freely.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, str | list[str] | tuple[str, ...]] | None = None,
    ) -> None:
        self.directory = os.fspath(directory) if directory is not None else None
        if self.directory is not None and not os.path.isdir(self.directory):
            raise ConfigError(f"config directory {self.directory!r} does not exist")
        self._overrides: dict[str, tuple[str, ...]] = {}
        for name, value in (overrides or {}).items():
            self._overrides[name] = (value,) if isinstance(value, str) else tuple(value)
        self._cache: dict[str, tuple[str, ...]] = {}
        #: the line number of each value read from a file (for error messages)
        self._line_numbers: dict[str, tuple[int, ...]] = {}
        #: set by :meth:`freeze`: files not read by then are never read (defaults apply)
        self._frozen = False
        self._unread: set[str] = set()
        #: the regular files of the directory when it was frozen (None: not frozen)
        self._frozen_names: tuple[str, ...] | None = None

    def lines(self, name: str) -> list[str]:
        """Every value of a setting, in file order; the default if the file is absent."""
        cached = self._cache.get(name)
        if cached is None:
            cached = self._load(name)
            self._cache[name] = cached
        return list(cached)

    def _load(self, name: str) -> tuple[str, ...]:
        if name in self._overrides:
            return self._overrides[name]
        if self.directory is not None and (not self._frozen or name in self._unread):
            path = os.path.join(self.directory, name)
            if os.path.isfile(path):
                with open(path, "rb") as handle:
                    numbered = _numbered_values(_decode(name, path, handle.read()))
                self._line_numbers[name] = tuple(number for number, _ in numbered)
                return tuple(value for _, value in numbered)
        if name == "me":
            return (default_hostname(),)
        return _DEFAULTS.get(name, ())

    def freeze(self) -> None:
        """Read every file of the directory now, and never look at the directory again.

        A running server freezes its config (``twistd qpconn`` at start-up, each SIGHUP
        reload), so it goes on with what the directory held then, never with a file
        half edited since: changes take effect at the next reload, all together. Files
        that are not text stay unread and are read (and refused) if asked for.
        """
        if self.directory is not None:
            names = []
            for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
                if entry.is_file():
                    names.append(entry.name)
                    try:
                        self.lines(entry.name)
                    except (ConfigError, OSError):
                        self._unread.add(entry.name)
            self._frozen_names = tuple(names)
        self._frozen = True

    def file_names(self) -> list[str]:
        """The regular files of the directory (as they were when frozen), sorted.

        The validator (:mod:`qpconn.settings`) looks for files nobody reads among them.
        """
        if self._frozen_names is not None:
            return list(self._frozen_names)
        if self.directory is None:
            return []
        return sorted(e.name for e in os.scandir(self.directory) if e.is_file())

    def where(self, name: str, index: int = 0) -> str:
        """Where value ``index`` of a setting came from, for a message an administrator
        can act on: ``line 3 of /etc/qpconn/timeout``, ``the command line``, ``the default``.
        """
        if name in self._overrides:
            return "the command line"
        self.lines(name)  # read it, if it was not yet
        numbers = self._line_numbers.get(name)
        if numbers is None or self.directory is None:
            return "the default"
        path = os.path.join(self.directory, name)
        if index < len(numbers):
            return f"line {numbers[index]} of {path}"
        return path

    def is_set(self, name: str) -> bool:
        """True when a file (or an override) gives the setting, even with no value in it."""
        self.lines(name)
        return name in self._overrides or name in self._line_numbers

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of a setting, or ``default``."""
        values = self.lines(name)
        return values[0] if values else default

    def get_int(self, name: str, default: int) -> int:
        """A whole-number setting; a value that is not one is an error, not a silent default."""
        value = self.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not a whole number") from None

    def get_float(self, name: str, default: float) -> float:
        value = self.get(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not a number") from None

    @property
    def me(self) -> str:
        """The name this server gives itself in greetings and Received headers."""
        return self.get("me") or default_hostname()

    def plugin_lines(self) -> list[list[str]]:
        """The ``plugins`` file as (name, *arguments) lists, in the order hooks run."""
        return [line.split() for line in self.lines("plugins")]

    def path(self, value: str) -> str:
        """A path from a setting: relative paths are taken from the working directory,
        as the defaults (``./maildir``) and qpsmtpd's own settings are."""
        return os.path.abspath(os.path.expanduser(value))


def _decode(name: str, path: str, data: bytes) -> str:
    """The file's text; a file that is not UTF-8 is an error naming it and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{name}: line {line} of {path} is not UTF-8 text (byte 0x{data[exc.start]:02x})"
        ) from None


def _numbered_values(text: str) -> list[tuple[int, str]]:
    """(line number, value) for each line that holds a value."""
    values = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            values.append((number, line))
    return values
