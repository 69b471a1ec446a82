"""Getting the external programs the benchmark drives, into ``bench/.cache``.

* Postfix's ``smtp-source`` (the load generator) and ``smtp-sink`` (the C reference
  server): the installed ones if the postfix package is installed, else
  ``apt-get download postfix`` and ``dpkg-deb -x``. Postfix itself is never
  installed, configured or started; the two test programs run from the unpacked tree with
  ``LD_LIBRARY_PATH`` pointing at its private libraries.
* Haraka: ``npm install Haraka`` into ``bench/.cache/haraka``.
* py-spy (for ``--profile``): ``pip install py-spy`` into the running interpreter.

Each step is optional: a missing tool is reported and whatever needs it is skipped.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"


def log(message: str) -> None:
    print(f"== {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> bool:
    try:
        result = subprocess.run(
            cmd, cwd=cwd, timeout=timeout, capture_output=True, text=True, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"{' '.join(cmd)}: {exc}")
        return False
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        log(f"{' '.join(cmd)} failed ({result.returncode}): {' / '.join(tail)}")
        return False
    return True


@dataclass
class Postfix:
    """The unpacked postfix package: paths to smtp-source / smtp-sink and their libraries."""

    root: Path

    @property
    def libdir(self) -> Path:
        return self.root / "usr" / "lib" / "postfix"

    @property
    def smtp_source(self) -> Path:
        return self.root / "usr" / "sbin" / "smtp-source"

    @property
    def smtp_sink(self) -> Path:
        return self.root / "usr" / "sbin" / "smtp-sink"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = str(self.libdir)
        return env

    def missing_libraries(self) -> list[str]:
        """Shared libraries ldd cannot resolve for the two programs."""
        missing: set[str] = set()
        for program in (self.smtp_source, self.smtp_sink):
            out = subprocess.run(
                ["ldd", str(program)], env=self.env(), capture_output=True, text=True, check=False
            ).stdout
            missing.update(line.split()[0] for line in out.splitlines() if "not found" in line)
        return sorted(missing)

    def works(self) -> bool:
        # smtp-source with no arguments prints its usage and exits 1; a loader error differs.
        result = subprocess.run(
            [str(self.smtp_source)], env=self.env(), capture_output=True, text=True, check=False
        )
        return "usage" in result.stderr


def get_postfix(install: bool = True) -> Postfix | None:
    """smtp-source and smtp-sink from Debian's postfix package, unpacked (never installed)."""
    root = CACHE / "postfix"
    postfix = Postfix(root)
    if postfix.smtp_source.exists() and postfix.works():
        return postfix
    system = Postfix(Path("/"))  # a machine with the postfix package installed has them
    if system.smtp_source.exists() and system.works():
        return system
    if not install:
        log("smtp-source not found in bench/.cache/postfix (run without --no-install)")
        return None
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        log("apt-get/dpkg-deb not available: cannot fetch Postfix's smtp-source")
        return None
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = glob.glob(str(debs / "postfix_*.deb"))
    if not found:
        log("fetching Debian's postfix package (apt-get download postfix; not installed)")
        if not _run(["apt-get", "download", "postfix"], cwd=debs) and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"])  # a fresh machine has no package lists yet
            _run(["apt-get", "download", "postfix"], cwd=debs)
        found = glob.glob(str(debs / "postfix_*.deb"))
        if not found:
            return None
    deb = sorted(found)[-1]
    shutil.rmtree(root, ignore_errors=True)
    if not _run(["dpkg-deb", "-x", deb, str(root)]):
        return None
    missing = postfix.missing_libraries()
    if missing:
        log(f"smtp-source needs {', '.join(missing)}: installing postfix's library dependencies")
        depends = subprocess.run(
            ["dpkg-deb", "-f", deb, "Depends"], capture_output=True, text=True, check=False
        ).stdout
        libs = [
            part.split()[0]
            for alt in depends.split(",")
            for part in [alt.split("|")[0].strip()]
            if part.startswith("lib")
        ]
        if libs and os.geteuid() == 0:
            _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *libs])
    if not postfix.works():
        log(f"smtp-source does not run (missing: {', '.join(postfix.missing_libraries())})")
        return None
    return postfix


@dataclass
class Haraka:
    root: Path  # the npm prefix holding node_modules/Haraka

    @property
    def bin(self) -> Path:
        return self.root / "node_modules" / "Haraka" / "bin" / "haraka"

    def version(self) -> str:
        import json

        package = self.root / "node_modules" / "Haraka" / "package.json"
        return str(json.loads(package.read_text())["version"])


def get_haraka(install: bool = True) -> Haraka | None:
    """Haraka from npm into bench/.cache/haraka, or None when node/npm cannot provide it."""
    haraka = Haraka(CACHE / "haraka")
    if haraka.bin.exists():
        return haraka
    if not install:
        return None
    if not shutil.which("node") or not shutil.which("npm"):
        log("node/npm not found: Haraka skipped")
        return None
    haraka.root.mkdir(parents=True, exist_ok=True)
    log("npm install Haraka (into bench/.cache/haraka)")
    _run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "Haraka@3"],
        cwd=haraka.root,
        timeout=600,
    )
    return haraka if haraka.bin.exists() else None


def ensure_module(module: str, package: str, install: bool = True) -> bool:
    """True once ``module`` is importable by this interpreter (pip-installing it if asked)."""
    if importlib.util.find_spec(module) is not None:
        return True
    if not install:
        return False
    log(f"pip install {package}")
    _run([sys.executable, "-m", "pip", "install", "-q", package])
    importlib.invalidate_caches()
    return importlib.util.find_spec(module) is not None


def get_py_spy(install: bool = True) -> str | None:
    """Path of a py-spy executable (pip-installed next to this interpreter if needed)."""
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    found = shutil.which("py-spy")
    if found:
        return found
    if install:
        log("pip install py-spy")
        _run([sys.executable, "-m", "pip", "install", "-q", "py-spy"])
        if here.exists():
            return str(here)
    return shutil.which("py-spy")
