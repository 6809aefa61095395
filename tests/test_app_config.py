"""Flags, environment variables, presets, and the README's two set-up commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backend.config import CPU_DEFAULT, GPU_DEFAULT, parse_config

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
    assert (config.model, config.server.port, config.quantization) == ("org/model", 9000, "8bit")
    config = parse_config(["--model", "/m", "--port", "7000", "--max-new-tokens-limit", "99"], False, env)
    assert (config.model, config.server.port, config.limits.max_new_tokens) == ("/m", 7000, 99)
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


def test_plan_flags():
    assert not parse_config([], has_gpu=False, env={}).plan
    only_text = parse_config(["--plan"], has_gpu=False, env={})
    assert only_text.plan and not only_text.plan_json
    as_json = parse_config(["--plan", "--json"], has_gpu=False, env={})
    assert as_json.plan and as_json.plan_json
    assert parse_config(["--json"], has_gpu=False, env={}).plan  # --json alone implies --plan


def test_plan_json_runs_offline_and_loads_no_weights(tmp_path: Path):
    # An empty Hugging Face cache and no network: there are no weights to load, only the shipped config.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PLAYGROUND_CACHE": str(tmp_path)}
    command = [sys.executable, "app.py", "--plan", "--json", "--model", "lmsys/vicuna-7b-v1.5"]
    command += ["--vision-model", "none", "--gpu-memory", "0=8GiB,1=8GiB"]
    # The timeout only guards against a hang (no assertion on how long it took).
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan) == {"devices", "models", "fits", "warnings"}
    assert list(plan["devices"]) == ["0", "1", "cpu", "disk"]
    assert all(
        set(use) == {"budget_bytes", "planned_bytes", "reserved_bytes"} for use in plan["devices"].values()
    )
    assert plan["devices"]["0"]["budget_bytes"] == 8 * 2**30
    (model,) = plan["models"]
    assert (model["role"], model["name"], model["quantization"]) == ("text", "lmsys/vicuna-7b-v1.5", "none")
    assert model["total_bytes"] > 12 * 2**30 and set(model["device_map"].values()) <= {
        "0",
        "1",
        "cpu",
        "disk",
    }
    assert isinstance(plan["fits"], bool) and any("not present here" in w for w in plan["warnings"])


def test_plan_of_an_unknown_model_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import app

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(SystemExit) as stop:
        app.main(["--plan", "--model", "someorg/absent", "--vision-model", "none"])
    assert str(stop.value.code).startswith("Cannot plan: no config for 'someorg/absent'")
