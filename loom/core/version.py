"""The package version, in one place below every layer (estimators record it in saved models)."""

__version__ = "0.1.0"
