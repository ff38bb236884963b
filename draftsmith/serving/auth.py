"""The endpoint's API key: a bearer token from a secret file or an environment variable, never logged."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.errors import APIError


class APIKey:
    """Checks `Authorization: Bearer KEY`; with no key configured every request passes."""

    def __init__(self, key: str | None):
        self._key = key.encode() if key else None

    @property
    def required(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:  # never print the key itself
        return f"APIKey(required={self.required})"

    def check(self, authorization: str | None) -> None:
        if self._key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self._key):
            raise APIError(401, "invalid API key", code="invalid_api_key")


def load_api_key(settings: ServingSettings) -> APIKey:
    """The key from `api_key_file` (a mounted secret) or else `$api_key_env`; none configured means no auth.

    A configured file that is missing or empty is an error rather than silently open access.
    """
    if settings.api_key_file:
        path = Path(settings.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"serving.api_key_file {path} does not exist on this node; mount the secret "
                                    "there or unset api_key_file")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"serving.api_key_file {path} is empty")
        return APIKey(key)
    if settings.api_key_env:
        return APIKey(os.environ.get(settings.api_key_env, "").strip() or None)
    return APIKey(None)
