"""Sphinx configuration: ``sphinx-build -W -b html docs OUT`` (the ``docs`` extra).

The pages are Markdown, read by MyST; ``api.md`` pulls the Connection and Transaction
reference from the docstrings with autodoc, so the API reference cannot drift from the
code. ``-W`` (warnings are errors) is how CI keeps every cross-reference valid
(tests/test_docs_sphinx.py).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # qpconn importable from a checkout, for autodoc

from qpconn import __version__

project = "qpconn"
author = "the qpconn authors"
copyright = "the qpconn authors"
release = version = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples/**"]

# GitHub-style "#section" links between pages resolve to the headings' anchors
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# No members by default: each directive in api.md lists the public ones, so that helpers a
# class keeps for itself stay out of the reference (a default of members=True would also
# override those lists).
autodoc_default_options: dict[str, object] = {}

html_theme = "alabaster"
html_title = f"qpconn {release}"
