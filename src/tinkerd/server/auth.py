"""API keys: `X-API-Key` must be one of the configured keys, or any `tml-` key when none are set.

The caller's identity is a hash of the key, so keys are never stored. A job's runner presents its job token
(`tml-job-...`, `control.jobs.manager`) and acts as the job's owner while the job runs.
"""

from __future__ import annotations

import hashlib

from fastapi import Depends, Header, HTTPException

from tinkerd.control.jobs.manager import TOKEN_PREFIX, token_hash
from tinkerd.control.plane import ControlPlane
from tinkerd.server.deps import plane


async def caller(x_api_key: str | None = Header(default=None), st: ControlPlane = Depends(plane)) -> str:
    keys = st.config.api_keys
    if not x_api_key:
        raise HTTPException(401, "missing X-API-Key header")
    if x_api_key.startswith(TOKEN_PREFIX):
        job = st.store.job_for_token(token_hash(x_api_key))
        if job is None:
            raise HTTPException(401, "this job token is not (or no longer) valid")
        return job["owner"]
    if keys and x_api_key not in keys:
        raise HTTPException(401, "invalid API key")
    if not keys and not x_api_key.startswith("tml-"):
        raise HTTPException(401, "API keys start with 'tml-'")
    return hashlib.sha256(x_api_key.encode()).hexdigest()[:24]
