"""The README's set-up stays true: CI runs exactly its two commands, the main job on cold caches."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_ci_runs_the_readme_commands():
    main_cmd, test_cmd = readme_commands()
    assert "pytest" in test_cmd and "pytest" not in main_cmd
    dry = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--dry-run"], capture_output=True, text=True, check=True)
    assert dry.stdout.splitlines() == [main_cmd, test_cmd]


def test_ci_runs_the_main_job_on_cold_caches():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'export KVMEM_CACHE="\$COLD/kvmem" HF_HOME="\$COLD/huggingface"', ci)
    assert ci.index('bash -c "$MAIN_CMD"') < ci.index('bash -c "$TEST_CMD"')


def test_readme_main_command_uses_the_installed_entry_point():
    main_cmd, _ = readme_commands()
    assert main_cmd.startswith("bash scripts/install.sh && kvmem ")
