"""Sphinx configuration for sofo's documentation.

Build: `python -m sphinx -W --keep-going -b html docs docs/_build/html` (from the repository root, with
`pip install -e ".[docs]"`). The build does not execute code: every ```python block of the pages is run,
and its printed output checked, by tests/test_docs.py (see docs/contributing.md).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's sofo
sys.path.insert(0, str(ROOT / "docs" / "ext"))

import sofo  # noqa: E402

project = "sofo"
author = "the sofo authors"
copyright = "2026, the sofo authors"
release = sofo.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "coverage_check",  # docs/ext/coverage_check.py: fails the build when a public name has no API entry
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# BENCHMARKS.md (included as is) goes from "##" to "####" in places; GitHub renders that fine.
suppress_warnings = ["myst.header"]

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo" if __import__("importlib").util.find_spec("furo") else "alabaster"
html_title = f"sofo {release}"
