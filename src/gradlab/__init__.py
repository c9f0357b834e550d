"""gradlab: make gradients explode on purpose, watch it happen, compare remedies."""
import os

# Offline-friendly defaults; a user's own setting wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
