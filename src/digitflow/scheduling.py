"""Scheduled retraining: where the Prefect server is, and whether it answers."""

from __future__ import annotations

import os

from .errors import DigitflowError

SERVER_HELP = (
    "start one with `prefect server start --host 127.0.0.1` and "
    "`export PREFECT_API_URL=http://127.0.0.1:4200/api`"
)


class SchedulingError(DigitflowError, RuntimeError):
    """No Prefect server to hold the deployment and its schedule."""


def api_url() -> str | None:
    """The Prefect API in use: $PREFECT_API_URL, else the active Prefect profile's setting."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def require_server() -> str:
    """The API URL of a running Prefect server; a clear error when none is set or none answers."""
    import httpx

    url = api_url()
    if not url:
        raise SchedulingError(
            f"no Prefect server configured (PREFECT_API_URL is not set): {SERVER_HELP}"
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise SchedulingError(
            f"the Prefect server at {url} does not answer ({exc}); {SERVER_HELP}"
        ) from None
    return url
