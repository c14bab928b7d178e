"""What a facesphere service is allowed to accept, and how it searches."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from facesphere.utils.files import read_text_checked

KEYS_ENV = "FACESPHERE_API_KEYS"
MAX_KEY_FILE_BYTES = 2**20  # a key file larger than this holds no list of keys


class ServiceSettings(BaseModel):
    """Limits and search options of ``facesphere serve`` (every request but /health and the page needs a key)."""

    api_keys: list[str] = Field(min_length=1, repr=False)
    max_request_bytes: int = Field(10 * 2**20, gt=0, description="largest request body accepted (413 beyond)")
    max_image_pixels: int = Field(25_000_000, gt=0, description="largest declared image size, width x height")
    max_faces: int = Field(20, gt=0, description="faces analysed per photo (largest first)")
    max_files: int = Field(10, gt=0, description="photos per enrolment request")
    top_k: int = Field(5, gt=0, le=100)
    match_threshold: float | None = Field(None, ge=-1.0, le=1.0, description="open-set cosine threshold")

    @field_validator("api_keys")
    @classmethod
    def _keys_are_strong(cls, keys: list[str]) -> list[str]:
        weak = [k for k in keys if len(k) < 16]
        if weak:
            raise ValueError(f"{len(weak)} API key(s) shorter than 16 characters; make them with "
                             "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return keys


def read_api_keys(path: Path | None) -> list[str]:
    """Keys from a file (one per line, # comments; at most ``MAX_KEY_FILE_BYTES``) or, without one, from
    $FACESPHERE_API_KEYS (comma-separated). Errors name the file, never a key."""
    if path is not None:
        text = read_text_checked(path, MAX_KEY_FILE_BYTES)
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"{path}: no API keys in the file (one key per line, # for comments)")
    else:
        keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if not keys:
        raise ValueError(f"no API keys: give --api-keys FILE (one key per line) or set {KEYS_ENV}")
    return keys


__all__ = ["KEYS_ENV", "ServiceSettings", "read_api_keys"]
