"""Shared fixtures."""

import pytest


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An isolated working directory with its own MLflow sqlite store and decode cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(tmp_path / "cache"))
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; the fixture removes it again afterwards
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path
