"""Flags, environment variables, presets, and the README's two set-up commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from backend.app_config import CPU_DEFAULT, GPU_DEFAULT, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_presets_depend_on_the_gpu():
    assert (
        parse_config([], has_gpu=True, env={}).model,
        parse_config([], True, {}).quantization,
    ) == GPU_DEFAULT
    cpu = parse_config([], has_gpu=False, env={})
    assert (cpu.model, cpu.quantization) == CPU_DEFAULT


def test_flags_and_environment():
    env = {"PLAYGROUND_MODEL": "org/model", "PLAYGROUND_PORT": "9000", "PLAYGROUND_QUANTIZATION": "8bit"}
    config = parse_config([], has_gpu=False, env=env)
    assert (config.model, config.port, config.quantization) == ("org/model", 9000, "8bit")
    config = parse_config(["--model", "/m", "--port", "7000", "--max-new-tokens-limit", "99"], False, env)
    assert (config.model, config.port, config.limits.max_new_tokens) == ("/m", 7000, 99)
    # A model other than the preset is not quantized unless asked.
    assert parse_config(["--model", "/m"], has_gpu=True, env={}).quantization == "none"


def test_bad_flag_values_exit_with_usage():
    with pytest.raises(SystemExit):
        parse_config(["--quantization", "3bit"], has_gpu=False, env={})


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r"(--[a-z][a-z-]+)", result.stdout)) - {"--help"}
    assert {"--model", "--quantization", "--gpu-memory", "--port", "--host"} <= flags
    for flag in flags:  # each flag's line or the next carries a description
        assert re.search(rf"{flag}[^\n]*\n?\s+\S", result.stdout), flag


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- (run|test)-command -->\n```bash\n(.+?)\n```", readme)
    assert [kind for kind, _ in blocks] == ["run", "test"]
    run, test = (command for _, command in blocks)
    assert run.endswith("python app.py") and "pip install -r requirements.txt" in run
    assert "pytest" in test and "requirements-test.txt" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and "eval" in ci


def test_torch_is_pinned_exactly():
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", requirements, re.MULTILINE)
