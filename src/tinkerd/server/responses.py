"""The app's JSON response: NaN and infinities leave as `null` instead of failing the reply with a 500.

Strict JSON has no non-finite numbers, and Starlette's encoder refuses them ("Out of range float values
are not JSON compliant"). A result may hold them legitimately (a loss that overflowed, a prompt position
with no score), so they are rendered as null; finite replies are rendered exactly as before.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class FiniteJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # a non-finite float somewhere: only then pay for the walk
            return super().render(finite(content))
