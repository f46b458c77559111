"""One way to reach the Kubernetes API: a kubeconfig when one is named, else the pod's in-cluster config."""

from __future__ import annotations

from typing import Any


class ApiUnreachable(Exception):
    """No usable kubeconfig and not in a pod."""


def api_client(kubeconfig: str | None) -> Any:
    """A kubernetes.client.ApiClient (untyped library: Any)."""
    from kubernetes import client, config

    try:
        return config.new_client_from_config(config_file=kubeconfig or None)
    except Exception as e:  # no usable kubeconfig: in a pod, use its ServiceAccount
        if kubeconfig:
            raise ApiUnreachable(f"cannot load kubeconfig {kubeconfig}: {e}") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ApiUnreachable(f"no kubeconfig found and not in a cluster: {e}") from None
        return client.ApiClient()
