"""Runs every ```python block of README.md and of the docs pages (docs/**/*.md), and checks their output.

The docs are built by Sphinx without executing anything (fast, and no kernel needed); this runner is what
keeps the examples true. Conventions for every page (keep them when adding sections):

- Every block fenced ```python runs as written, in a fresh Python process (float32, the CPU backend,
  this checkout's `sofo` first on the path). Fence anything that is not meant to run (a fragment, a
  signature, a shell command) differently: ```text, ```bash, or no language at all.
- A python block whose first line is `# continues the previous block` runs after the python block
  before it, in the same process (chains may be longer than two). Every other python block is
  self-contained: its imports and data are in it.
- A block's printed output may be shown right after it, in a ```text block preceded by the line
  `<!-- output -->`. The test then compares the printed lines with it: the words exactly (up to
  whitespace) and every number to 10% (the pages show what a CPU run prints; other machines round
  differently over many steps). So every number the prose quotes from a run is printed by its block
  and checked here.
- A block that imports an optional package that is not installed (equinox, flax, brainstate) is skipped.

Only README.md and the getting-started page run by default (the front door); every other page's blocks
are marked slow and run with `pytest -m slow` (CI runs both), which keeps the default suite short. Also
here: the API coverage check (every public name has an API entry) and, marked slow, the full Sphinx build
with warnings as errors.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
# The pages run by default; every other page is in the slow set (its blocks take 5-20 s each).
DEFAULT_PAGES = {"README.md", "docs/getting_started.md"}
CONTINUES = "# continues the previous block"
OUTPUT_MARKER = "<!-- output -->"
SEPARATOR = "----- sofo-docs-block-end -----"
OPTIONAL = ("equinox", "flax", "brainstate", "brainunit", "sklearn", "matplotlib")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def page_name(path):
    return path.relative_to(ROOT).as_posix()


def page_blocks(path):
    """[(line, language, code, expected_output or None)] for every fenced block of a page, in order."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*(.*?)\s*$", lines[i])  # ```python, ```text, ```{include} path, ...
        if not fence:
            i += 1
            continue
        start, language = i + 1, (fence.group(2).split() or [""])[0]
        end = next((j for j in range(start, len(lines)) if lines[j].rstrip() == fence.group(1)), None)
        assert end is not None, f"{page_name(path)}:{i + 1}: a code fence that is never closed"
        is_output = language == "text" and i > 0 and _previous_nonblank(lines, i) == OUTPUT_MARKER
        body = "\n".join(lines[start:end])
        if is_output:
            if not blocks or blocks[-1][1] != "python":
                raise AssertionError(f"{page_name(path)}:{start}: an {OUTPUT_MARKER} block must follow a python block")
            blocks[-1] = blocks[-1][:3] + (body,)
        else:
            blocks.append((start, language, body, None))
        i = end + 1
    return blocks


def _previous_nonblank(lines, i):
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return lines[j].strip() if j >= 0 else ""


def page_chains(path):
    """The python blocks grouped into chains: a self-contained block and the blocks that continue it."""
    chains = []
    for line, language, code, output in page_blocks(path):
        if language != "python":
            continue
        if code.lstrip().startswith(CONTINUES):
            assert chains, f"{page_name(path)}:{line}: the first python block cannot continue a previous one"
            chains[-1].append((line, code, output))
        else:
            chains.append([(line, code, output)])
    return chains


CASES = [(path, chain) for path in PAGES for chain in page_chains(path)]


def test_the_readme_and_getting_started_have_checked_examples():
    for name in sorted(DEFAULT_PAGES):
        chains = page_chains(ROOT / name)
        assert chains, f"{name} has no python block"
        assert any(output is not None for chain in chains for _, _, output in chain), f"{name} checks no output"
    assert len(CASES) >= 18
    assert all((ROOT / name).is_file() for name in DEFAULT_PAGES), "DEFAULT_PAGES names a page that does not exist"


def assert_output_matches(printed, expected, where):
    printed_lines = [line.strip() for line in printed.strip().splitlines()]
    expected_lines = [line.strip() for line in expected.strip().splitlines()]
    assert len(printed_lines) == len(expected_lines), f"{where}: printed\n{printed}\nthe page shows\n{expected}"
    for got, want in zip(printed_lines, expected_lines):
        message = f"{where}: printed {got!r}, the page shows {want!r}"
        assert " ".join(NUMBER.split(got)).split() == " ".join(NUMBER.split(want)).split(), message
        got_numbers = [float(n) for n in NUMBER.findall(got)]
        want_numbers = [float(n) for n in NUMBER.findall(want)]
        assert len(got_numbers) == len(want_numbers), message
        np.testing.assert_allclose(got_numbers, want_numbers, rtol=0.1, atol=1e-12, err_msg=message)


def test_output_check_catches_a_wrong_number_and_a_wrong_word():
    assert_output_matches("loss 0.100 after 5 steps", "loss 0.105 after 5 steps", "ok")
    with pytest.raises(AssertionError):
        assert_output_matches("loss 0.100 after 5 steps", "loss 0.2 after 5 steps", "number")
    with pytest.raises(AssertionError):
        assert_output_matches("loss 0.100 after 5 steps", "cost 0.100 after 5 steps", "word")


def run_chain(chain, cwd):
    """Runs a chain's blocks in one fresh process; returns (CompletedProcess, per-block printed output)."""
    script = f"\nprint({SEPARATOR!r}, flush=True)\n".join(code for _, code, _ in chain)
    script += f"\nprint({SEPARATOR!r}, flush=True)\n"
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("JAX_ENABLE_X64", None)  # as a user runs it: float32
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    return result, result.stdout.split(SEPARATOR + "\n")


@pytest.mark.parametrize(
    "path, chain",
    [pytest.param(p, c, marks=[] if page_name(p) in DEFAULT_PAGES else [pytest.mark.slow]) for p, c in CASES],
    ids=[f"{page_name(p)}:{c[0][0]}" for p, c in CASES],
)
def test_block_runs(path, chain, tmp_path):
    result, outputs = run_chain(chain, tmp_path)
    where = f"{page_name(path)}:{chain[0][0]}"
    if result.returncode != 0:
        missing = re.search(r"No module named '([^'.]+)", result.stderr)
        if missing and missing.group(1) in OPTIONAL:
            pytest.skip(f"{where} needs {missing.group(1)}: pip install -e '.[interop]'")
        raise AssertionError(f"{where} failed:\n{result.stderr[-4000:]}")
    for (line, _, expected), printed in zip(chain, outputs):
        if expected is not None:
            assert_output_matches(printed, expected, f"{page_name(path)}:{line}")


# -- the API reference --------------------------------------------------------------------------------


def _coverage_check():
    spec = importlib.util.spec_from_file_location("coverage_check", DOCS / "ext" / "coverage_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_an_api_entry():
    check = _coverage_check()
    names = check.public_names()
    assert "sofo.sofo" in names and "sofo.optim.SOFO" in names and "sofo.transforms.grad" in names
    assert check.missing(set()) == names  # the check can fail
    assert check.missing_from_sources(DOCS) == [], "add these to docs/api.md"


@pytest.mark.slow
def test_the_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
