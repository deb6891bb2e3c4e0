"""The README's set-up stays true: CI runs exactly its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = readme_commands()
    assert "pytest" in test_cmd and "pytest" not in main_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_readme_main_command_uses_the_installed_entry_point():
    main_cmd, _ = readme_commands()
    assert main_cmd.startswith("bash scripts/install.sh && kvmem ")
