"""Kubernetes API clients of the `csi-flashcopy` command (not used by the driver itself)."""
