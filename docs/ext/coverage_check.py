"""Fails the docs build when a public name of sofo has no API entry.

The public names are `sofo.__all__`, `sofo.optim.__all__` and `sofo.transforms.__all__`. A name has an API
entry when the build documented it (an `autofunction`, `autoclass`, `autoexception` or `automodule`
directive, or a plain `py:class` etc. for a re-exported class, so it is in Sphinx's Python domain under its public path, e.g. `sofo.optim.SOFO`).

As a Sphinx extension (listed in docs/conf.py) it checks the Python domain once every page is read and
raises an error naming each missing entry, so the build fails with or without `-W`. `missing_from_sources`
does the same check without a build, from the directives in the pages (tests/test_docs.py runs it).
"""

from __future__ import annotations

import importlib
import pathlib
import re

MODULES = ("sofo", "sofo.optim", "sofo.transforms")
DIRECTIVE = re.compile(
    r"^\.\. (autofunction|autoclass|autoexception|automodule|autodata|py:function|py:class|py:exception|py:module):: (\S+)",
    re.M,
)


def public_names() -> list[str]:
    """Every public name, as its documented path: `sofo.sofo`, `sofo.optim.SOFO`, `sofo.transforms`, ..."""
    names = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names += [f"{module_name}.{name}" for name in module.__all__]
    return names


def missing(documented: set[str]) -> list[str]:
    """The public names not in `documented` (a set of full dotted names)."""
    return [name for name in public_names() if name not in documented]


def documented_in_sources(docs_dir: pathlib.Path) -> set[str]:
    """The names the Markdown pages under `docs_dir` document with an autodoc directive."""
    found = set()
    for page in pathlib.Path(docs_dir).rglob("*.md"):
        if "_build" in page.parts:
            continue
        found |= {name for _, name in DIRECTIVE.findall(page.read_text())}
    return found


def missing_from_sources(docs_dir: pathlib.Path) -> list[str]:
    """The public names no page documents (the build's check, without building)."""
    return missing(documented_in_sources(docs_dir))


def _check(app, env):
    domain = env.get_domain("py")
    documented = set(domain.objects) | set(getattr(domain, "modules", {}))
    absent = missing(documented)
    if absent:
        from sphinx.errors import ExtensionError

        raise ExtensionError(
            "coverage_check: these public names have no API entry: "
            + ", ".join(absent)
            + ". Add an autofunction / autoclass / automodule directive for each to docs/api.md."
        )


def setup(app):
    app.connect("env-check-consistency", _check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
