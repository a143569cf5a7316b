"""Constants and helpers of the generation service's tests (the fixtures that use them:
:mod:`serve_fixtures`)."""

from __future__ import annotations

import io

import numpy as np

TOKEN = "s3cret-token"
RED_SANDAL = "a photo of a red sandal on grass"
BLUE_BAG = "a photo of a blue bag on moon"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def post(http, app: str, auth: bool = True, **body):
    """``POST /APP/v1/generate`` with ``body`` (with the token unless ``auth=False``)."""
    return http.post(f"/{app}/v1/generate", json=body, headers=AUTH if auth else {})
