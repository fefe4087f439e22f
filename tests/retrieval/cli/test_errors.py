"""The command line in one place: every error a user can cause is a UserError, said in one line by the group."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from hassod.errors import UserError
from retrieval.cli import main


def _user_errors() -> list[type[Exception]]:
    from hassod.device import DeviceError
    from hassod.runs import SettingsMismatchError
    from hassod.discover.recipes import RecipeError
    from hassod.evaluation import DetectionsError, GroundTruthError
    from hassod.features import UnknownBackboneError, WeightsFormatError, WeightsNotFoundError
    from hassod.images import ImageError
    from hassod.locks import BusyError
    from hassod.model import CheckpointError
    from hassod.train.data import PseudoLabelError
    from hassod.train.loop import TrainError
    from indexer.build import WhiteningError
    from indexer.catalog import CatalogUnavailableError
    from indexer.index import IncompatibleIndexError, IncompatibleSourceError, IndexNotFoundError
    from indexer.regions import QuerySourceError, RegionsFileError
    from indexer.vectors import VectorFileError
    from indexer.vectors.planning import IndexTypeError
    from indexer.whitening import WhiteningFileError
    from retrieval.searcher import QueryError

    return [DeviceError, SettingsMismatchError, RecipeError, DetectionsError, GroundTruthError, UnknownBackboneError,
            WeightsFormatError, WeightsNotFoundError, ImageError, BusyError, CheckpointError, PseudoLabelError,
            TrainError, IncompatibleSourceError, WhiteningError, CatalogUnavailableError, IncompatibleIndexError,
            IndexNotFoundError, QuerySourceError, RegionsFileError, VectorFileError, IndexTypeError, QueryError,
            WhiteningFileError]


@pytest.mark.parametrize("error", _user_errors(), ids=lambda e: e.__name__)
def test_a_library_error_a_user_can_cause_ends_as_one_line_with_exit_status_2(error, monkeypatch, tmp_path):
    # `index stats` has no handler of its own: whatever the library raises reaches the group.
    from indexer.index import Index

    def refuse(index_dir):
        raise error(f"{index_dir} cannot be read: because")

    monkeypatch.setattr(Index, "open", refuse)
    result = CliRunner().invoke(main, ["index", "stats", str(tmp_path)])
    assert issubclass(error, UserError)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {tmp_path} cannot be read: because\n"
    assert result.stdout == ""


def test_library_callers_still_catch_the_errors_by_their_old_bases():
    from hassod.features import WeightsNotFoundError
    from hassod.train.loop import TrainError
    from indexer.index import IndexNotFoundError
    from retrieval.searcher import QueryError

    assert issubclass(IndexNotFoundError, FileNotFoundError) and issubclass(WeightsNotFoundError, FileNotFoundError)
    assert issubclass(QueryError, ValueError) and issubclass(TrainError, RuntimeError)


def test_a_bug_is_not_hidden_as_a_user_error(monkeypatch, tmp_path):
    from indexer.index import Index

    def broken(index_dir):
        raise KeyError("a bug")

    monkeypatch.setattr(Index, "open", broken)
    result = CliRunner().invoke(main, ["index", "stats", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_a_command_run_on_its_own_reports_the_same_way(tmp_path):
    from retrieval.cli.index import index

    result = CliRunner().invoke(index, ["stats", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


def test_python_m_retrieval_cli_lists_every_command():
    listed = subprocess.run([sys.executable, "-m", "retrieval.cli", "--help"], capture_output=True, text=True,
                            check=True).stdout
    commands = listed.split("Commands:", 1)[1].split()
    for name in ("convert", "detect", "discover", "eval", "index", "search", "serve", "train"):
        assert name in commands
    assert set(main.commands) == {"convert", "detect", "discover", "eval", "index", "search", "serve", "train"}
    index_help = subprocess.run([sys.executable, "-m", "retrieval.cli", "index", "--help"], capture_output=True,
                                text=True, check=True).stdout
    assert "build" in index_help and "stats" in index_help
