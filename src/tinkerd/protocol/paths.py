"""Names the SDK sees: `tinker://` checkpoint paths, training run ids and sampler ids (build and parse).

A training run (the SDK's model_id) is `<session_id>:train:<model_seq_id>`; a custom loss
`<session_id>:loss:<custom_loss_seq_id>`; a sampling session
`<session_id>:sample:<sampling_session_seq_id>`; a checkpoint `tinker://<run>/<kind>/<name>`, with kind
`weights` (save_state), `sampler_weights` or `external_weights`. Knows the spelling, not whether any
of them exists.
"""

from __future__ import annotations

from tinkerd.protocol.types import BadRequest

PREFIX = "tinker://"
TRAIN, SAMPLE = ":train:", ":sample:"


def tinker_path(model_id: str, kind: str, name: str) -> str:
    return f"{PREFIX}{model_id}/{kind}/{name}"


def parse_tinker_path(path: str, field: str = "model_path") -> tuple[str, str, str]:
    """Split `tinker://{model_id}/{kind}/{name}` into its three parts (BadRequest naming `field` otherwise)."""
    parts = path[len(PREFIX):].split("/", 2) if isinstance(path, str) and path.startswith(PREFIX) else []
    if len(parts) != 3 or not all(parts):
        raise BadRequest(f"{field}: expected 'tinker://<model_id>/<weights|sampler_weights>/<name>', got {path!r}")
    return parts[0], parts[1], parts[2]


def run_id(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}{TRAIN}{model_seq_id}"


def sampler_id(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}{SAMPLE}{sampling_session_seq_id}"


def session_of_run(model_id: str) -> str:
    """The session a training run id was made in (the whole id if it is not of the `run_id` form)."""
    return model_id.split(TRAIN, 1)[0]


LOSS = ":loss:"


def custom_loss_id(session_id: str, custom_loss_seq_id: int) -> str:
    """A server-side custom loss: `<session_id>:loss:<custom_loss_seq_id>`."""
    return f"{session_id}{LOSS}{custom_loss_seq_id}"


USER_URN = "tml:organization_user:"


def owner_urn(owner: str) -> str:
    """The hosted form of an owner id (`tml:organization_user:<id>`), as every owner field shows it."""
    return owner if owner.startswith(USER_URN) else USER_URN + owner
