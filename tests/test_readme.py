"""Runs every ```python block of README.md, as a user would paste it, and checks the output it shows.

Conventions for README.md (keep them when adding sections):

- Every block fenced ```python runs as written, in a fresh Python process (float32, the CPU backend,
  this checkout's `sofo` first on the path). Fence anything that is not meant to run (a fragment, a
  signature, a shell command) differently: ```text, ```bash, or no language at all.
- A python block whose first line is `# continues the previous block` runs after the python block
  before it, in the same process (chains may be longer than two). Every other python block is
  self-contained: its imports and data are in it.
- A block's printed output may be shown right after it, in a ```text block preceded by the line
  `<!-- output -->`. The test then compares the printed lines with it: the words exactly (up to
  whitespace) and every number to 10% (the README shows what a CPU run prints; other machines round
  differently over many steps). So every number the prose quotes from a run is printed by its block
  and checked here.
- A block that imports an optional package that is not installed (equinox, flax, brainstate) is skipped.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONTINUES = "# continues the previous block"
OUTPUT_MARKER = "<!-- output -->"
SEPARATOR = "----- sofo-readme-block-end -----"
OPTIONAL = ("equinox", "flax", "brainstate", "brainunit")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def readme_blocks(text):
    """[(line, language, code, expected_output or None)] for every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, language = i + 1, fence.group(2)
        end = next(j for j in range(start, len(lines)) if lines[j].startswith(fence.group(1)))
        is_output = language == "text" and i > 0 and _previous_nonblank(lines, i) == OUTPUT_MARKER
        body = "\n".join(lines[start:end])
        if is_output:
            if not blocks or blocks[-1][1] != "python":
                raise AssertionError(f"README.md:{start}: an {OUTPUT_MARKER} block must follow a python block")
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


def readme_chains():
    """The python blocks grouped into chains: a self-contained block and the blocks that continue it."""
    chains = []
    for line, language, code, output in readme_blocks(README.read_text()):
        if language != "python":
            continue
        if code.lstrip().startswith(CONTINUES):
            assert chains, f"README.md:{line}: the first python block cannot continue a previous one"
            chains[-1].append((line, code, output))
        else:
            chains.append([(line, code, output)])
    return chains


CHAINS = readme_chains()


def test_the_readme_has_its_examples():
    assert len(CHAINS) >= 8
    assert sum(output is not None for chain in CHAINS for _, _, output in chain) >= 3


def assert_output_matches(printed, expected, where):
    printed_lines = [line.strip() for line in printed.strip().splitlines()]
    expected_lines = [line.strip() for line in expected.strip().splitlines()]
    assert len(printed_lines) == len(expected_lines), f"{where}: printed\n{printed}\nREADME shows\n{expected}"
    for got, want in zip(printed_lines, expected_lines):
        message = f"{where}: printed {got!r}, README shows {want!r}"
        assert " ".join(NUMBER.split(got)).split() == " ".join(NUMBER.split(want)).split(), message
        got_numbers = [float(n) for n in NUMBER.findall(got)]
        want_numbers = [float(n) for n in NUMBER.findall(want)]
        assert len(got_numbers) == len(want_numbers), message
        np.testing.assert_allclose(got_numbers, want_numbers, rtol=0.1, atol=1e-12, err_msg=message)


@pytest.mark.parametrize("chain", CHAINS, ids=[f"README.md:{chain[0][0]}" for chain in CHAINS])
def test_readme_block_runs(chain, tmp_path):
    script = f"\nprint({SEPARATOR!r}, flush=True)\n".join(code for _, code, _ in chain)
    script += f"\nprint({SEPARATOR!r}, flush=True)\n"
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("JAX_ENABLE_X64", None)  # as a user runs it: float32
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    where = f"README.md:{chain[0][0]}"
    if result.returncode != 0:
        missing = re.search(r"No module named '([^'.]+)", result.stderr)
        if missing and missing.group(1) in OPTIONAL:
            pytest.skip(f"{where} needs {missing.group(1)}: pip install -e '.[interop]'")
        raise AssertionError(f"{where} failed:\n{result.stderr[-4000:]}")
    outputs = result.stdout.split(SEPARATOR + "\n")
    for (line, _, expected), printed in zip(chain, outputs):
        if expected is not None:
            assert_output_matches(printed, expected, f"README.md:{line}")
