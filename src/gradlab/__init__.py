"""gradlab: make gradients explode on purpose, watch it happen, compare remedies.

In your own training loop: ``gradlab.GradientMonitor(model, optimizer, stabilizers=[...])``
(``gradlab.monitor``); ``gradlab.lightning`` and ``gradlab.hf`` hold the Lightning and
Hugging Face Trainer callbacks.
"""
import os

# Offline-friendly defaults; a user's own setting wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
__all__ = ["GradientMonitor"]


def __getattr__(name: str):
    """``gradlab.GradientMonitor`` without importing torch and MLflow on ``import gradlab``."""
    if name == "GradientMonitor":
        from .monitor import GradientMonitor

        return GradientMonitor
    raise AttributeError(f"module 'gradlab' has no attribute '{name}'")
