"""``pip install .`` and ``pip install -e .`` in a fresh virtualenv make ``twistd qpconn`` work.

The fresh environment borrows the test environment's Twisted (through a .pth line) so
that no download is needed; qpconn itself is installed from a copy of the source tree
through its own packaging metadata, with pip's usual isolated build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (
    "pyproject.toml", "setup.cfg", "setup.py", "build_backend", "README.md", "qpconn", "twisted",
)  # fmt: skip


def _fresh_env(tmp_path: Path) -> Path:
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Twisted and zope.interface from the running environment, not from the network.
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def _copy_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(
                path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.cache", "*.so")
            )
        else:
            shutil.copy2(path, source / name)
    return source


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_makes_twistd_qpconn_available(tmp_path, editable):
    env_dir = _fresh_env(tmp_path)
    source = _copy_source(tmp_path)
    pip = [env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps"]
    target = ["-e", str(source)] if editable else [str(source)]
    subprocess.run([*pip, *target], check=True, capture_output=True, timeout=300)
    twistd = env_dir / "bin" / "twistd"
    if not twistd.exists():  # the console script comes with Twisted, which is borrowed
        twistd = None
    command = (
        [str(twistd)]
        if twistd
        else [
            str(env_dir / "bin" / "python"),
            "-c",
            "from twisted.scripts.twistd import run; run()",
        ]
    )
    listing = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert "qpconn" in listing.stdout, listing.stdout + listing.stderr
    options = subprocess.run(
        [*command, "qpconn", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert options.returncode == 0, options.stderr
    assert "--listen" in options.stdout and "--config" in options.stdout
    imported = subprocess.run(
        [env_dir / "bin" / "python", "-c", "import qpconn, sys; print(qpconn.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    location = Path(imported.stdout.strip())
    if editable:
        # strict editable mode: a link into the checkout, so edits apply without reinstalling
        assert location.resolve() == source / "qpconn" / "__init__.py"
    else:
        assert location.is_relative_to(env_dir)


def test_editable_install_keeps_the_checkouts_other_directories_off_the_path(tmp_path):
    """``pip install -e .`` (the quick start's test command) must not make ``tests``,
    ``docs`` or ``bench`` importable top-level packages for the user's own code, as the
    checkout root on ``sys.path`` did; ``qpconn`` and twistd's plugin still are found."""
    env_dir = _fresh_env(tmp_path)
    source = _copy_source(tmp_path)
    for name in ("tests", "docs", "bench"):
        (source / name).mkdir()
        (source / name / "__init__.py").write_text("")
    pip = [env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "-e"]
    subprocess.run([*pip, str(source)], check=True, capture_output=True, timeout=300)
    probe = (
        "import importlib.util as u, json, sys, qpconn; "
        "from twisted.plugin import getPlugins; "
        "from twisted.application.service import IServiceMaker; "
        "print(json.dumps([[n for n in ('tests', 'docs', 'bench') if u.find_spec(n)], "
        "[p.tapname for p in getPlugins(IServiceMaker)], "
        f"[p for p in sys.path if p.rstrip('/') == {str(source)!r}]]))"
    )
    done = subprocess.run(
        [env_dir / "bin" / "python", "-c", probe],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    importable, tapnames, checkout_on_path = json.loads(done.stdout)
    assert importable == []
    assert checkout_on_path == []
    assert "qpconn" in tapnames


def test_pip_install_puts_only_qpconn_and_its_twisted_plugin_on_the_path(tmp_path):
    """What the wheel holds: the qpconn package and twisted/plugins/qpconn_plugin.py.

    The checkout's other top-level directories (tests, docs, bench) must not become
    importable packages of whoever installs qpconn; the copy has them, as a checkout does.
    """
    env_dir = _fresh_env(tmp_path)
    source = _copy_source(tmp_path)
    for name in ("tests", "docs", "bench"):
        (source / name).mkdir()
        (source / name / "__init__.py").write_text("")
    pip = [env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", str(source)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    probe = (
        "import importlib.metadata as m, importlib.util as u, json; "
        "files = [str(f) for f in m.distribution('qpconn').files]; "
        "print(json.dumps([files, [n for n in ('tests', 'docs', 'bench') if u.find_spec(n)]]))"
    )
    done = subprocess.run(
        [env_dir / "bin" / "python", "-c", probe],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files, importable = json.loads(done.stdout)
    assert importable == []
    installed = {f.split("/")[0] for f in files if not f.startswith(("qpconn-", "../"))}
    assert installed == {"qpconn", "twisted"}, sorted(files)
    twisted = [f for f in files if f.startswith("twisted/") and "__pycache__" not in f]
    assert twisted == ["twisted/plugins/qpconn_plugin.py"]  # no twisted/__init__.py above it
