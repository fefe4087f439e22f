"""An index of the synthetic instance scenes, built through the command line."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from retrieval.cli import app


@pytest.fixture
def built_index(tmp_path, instance_folder):
    """(folder of the 8 scenes, index directory built from their true regions)."""
    folder, truth = instance_folder
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "build", str(folder), "--index", str(index_dir),
                                      "--regions", str(truth), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["added"] == 8 and summary["errors"] == []
    return folder, index_dir
