"""The API process never imports torch: starting it stays light and fork-safe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from api import create_app
from shared.config import Settings
app = create_app(Settings(database_url="sqlite:///{db}", var_dir="{var}", artifact_dir="{art}"))
app.test_client().get("/openapi.json")
assert "torch" not in sys.modules, "torch was imported"
assert "optuna" not in sys.modules, "optuna was imported"
print("ok")
"""


def test_creating_the_app_does_not_import_torch(tmp_path: Path) -> None:
    code = SCRIPT.format(db=tmp_path / "x.db", var=tmp_path / "var", art=tmp_path / "art")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
