"""The README's two setup commands and .ci/run cannot drift apart: CI reads the commands from the
README, in fresh virtual environments, main job first."""
from __future__ import annotations

import importlib.util
import re
import tomllib

import pytest

from conftest import ROOT


def _parser():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_has_the_two_commands():
    cmds = _parser().commands((ROOT / "README.md").read_text())
    assert cmds["main"].startswith("pip install torch==2.13.0 && ")
    assert "quantc compile examples/" in cmds["main"]
    assert cmds["tests"].startswith("pip install torch==2.13.0 && ")
    assert cmds["tests"].endswith("python -m pytest -q")


def test_ci_runs_the_readme_commands_in_fresh_venvs_main_first():
    ci = (ROOT / ".ci" / "run").read_text()
    code = [ln for ln in ci.splitlines() if not ln.lstrip().startswith("#")]
    body = "\n".join(code)
    assert "readme_commands.py" in body and "python3 -m venv" in body
    runs = [ln.split()[1] for ln in code if re.match(r"\s*run_fresh \w+\s*$", ln)]
    assert runs == ["main", "tests"]
    assert "set -euo pipefail" in body


def test_extras_named_in_readme_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cmds = _parser().commands((ROOT / "README.md").read_text())
    for cmd in cmds.values():
        for group in re.findall(r'\.\[([\w,-]+)\]', cmd):
            for name in group.split(","):
                assert name in extras, f"README installs extra {name!r}, which pyproject.toml lacks"
    # the GGUF path of the main job: transformers needs both gguf and accelerate to read a .gguf file
    assert any(d.startswith("accelerate") for d in extras["gguf"])
    assert any(d.startswith("gguf") for d in extras["gguf"])


@pytest.mark.parametrize("readme, error", [
    ("# x\n", "no section"),
    ("## Set up and run (fresh machine)\n```bash\na\n```\n", "exactly two"),
    ("## Set up and run (fresh machine)\n```bash\na\nb\n```\n```bash\nc\n```\n", "one command line"),
])
def test_parser_refuses_a_malformed_readme(readme, error):
    with pytest.raises(ValueError, match=error):
        _parser().commands(readme)


def test_compile_output_starts_with_quantc_and_hides_library_noise(tmp_path, tiny_models, calib_file):
    """A newcomer's first screen: quantc's own line first, no third-party import noise (torchao's
    optional libraries, torch's deprecation notes), quantc's own INFO lines kept."""
    import subprocess
    import sys
    from conftest import write_yaml
    y = write_yaml(tmp_path / "b.yaml", f"model: {tiny_models['llama']}\nquant: {{bits: 4, group_size: 32}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 4, seq_len: 32}}\n")
    r = subprocess.run([sys.executable, "-m", "quantc.cli", "compile", str(y), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    assert lines[0].startswith("quantc ") and str(tmp_path / "o") in lines[0]
    assert any(ln.startswith("INFO expected peak memory") for ln in lines)
    for noise in ("Failed to load", "_pytree", "Warning:", "deprecated"):
        assert not any(noise in ln for ln in lines), noise
