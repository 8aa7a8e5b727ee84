"""The README and shipped files stay true: the config reference is generated, the CI installs as the README says,
every launch config and recipe parses, and every command the README names exists."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_config_reference_in_readme_is_generated_from_the_dataclasses():
    from segda.config import reference_markdown

    text = (REPO / "README.md").read_text()
    section = text.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert section.strip() == reference_markdown().strip(), "run: python -m segda.config and paste it in the README"


def test_ci_installs_and_tests_as_the_readme_says():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    assert 'DS_BUILD_OPS=0 pip install -c constraints-cpu.txt -e ".[dev,deepspeed]"' in readme
    assert 'DS_BUILD_OPS=0 python -m pip install -q -c constraints-cpu.txt -e ".[dev,deepspeed]"' in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci


def test_every_launch_config_parses_and_says_how_to_use_it():
    configs = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"cpu_ddp", "single_gpu", "multi_gpu", "multi_node", "deepspeed_zero2"}
    for path in configs:
        data = yaml.safe_load(path.read_text())
        assert data["distributed_type"] in {"NO", "MULTI_GPU", "DEEPSPEED", "MULTI_CPU"}
        assert path.read_text().startswith("#"), f"{path.name} needs its usage comment"
    assert "accelerate launch" in (REPO / "launch" / "slurm" / "multinode.sbatch").read_text()


def test_every_command_in_the_readme_exists():
    from segda.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    named = set(re.findall(r"segda ([a-z]+)\b", (REPO / "README.md").read_text()))
    assert set(sub.choices) <= named, "every command is documented"
    assert {"synth", "shards", "pretrain", "adapt", "evaluate", "predict", "export", "demo", "bench"} <= set(sub.choices)
