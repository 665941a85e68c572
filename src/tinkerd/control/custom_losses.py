"""Server-side custom losses of a session: created once, kept in the Store, attached to forward passes.

`create` parses the traced graph as data (`protocol.custom_loss`; a refused node is a 400 naming it)
and stores its definition under `<session>:loss:<seq>` (a retried create gets the same id). `attach`
resolves `loss_fn_config.loss_id` of a `custom` forward pass to that session's loss (another
session's or key's id is 404), checks every datum's inputs and ranks (400 naming the datum and the
input), and puts the parsed loss on the call. The journal keeps the call as it came (with its
loss_id), so a replay after a crash attaches the same stored definition again. Torch-free: the
graph runs only in the engine.
"""

from __future__ import annotations

from tinkerd.control import audit
from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.protocol.custom_loss import check_datums, parse_custom_loss
from tinkerd.protocol.paths import custom_loss_id
from tinkerd.protocol.types import BadRequest, ForwardBackwardCall


def create(st: ControlPlane, owner: str, body: dict) -> str:
    """The loss_id of the request's loss (BadRequest before anything is stored if it is refused)."""
    session = st.session(str(body.get("session_id")), owner)
    seq = body.get("custom_loss_seq_id")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise BadRequest(f"custom_loss_seq_id must be an integer >= 0, got {seq!r}")
    loss = parse_custom_loss(body)
    loss_id = custom_loss_id(session["id"], seq)
    if st.store.add_custom_loss(loss_id, session["id"], owner, loss.name, loss.definition):
        audit.record(st, owner, "custom_loss_create", loss_id=loss_id, name=loss.name)
    return loss_id


def attach(st: ControlPlane, owner: str, call: ForwardBackwardCall) -> None:
    """Resolve a `custom` call's loss_id to the stored loss of the run's session (no-op for other losses)."""
    if call.loss_fn != "custom" or call.custom_loss is not None:
        return
    unknown = sorted(set(call.loss_config) - {"loss_id"})
    if unknown:
        raise BadRequest(f"loss_fn_config.{unknown[0]} is not used by custom (it accepts: loss_id)")
    loss_id = call.loss_config.get("loss_id")
    if not isinstance(loss_id, str) or not loss_id:
        raise BadRequest("loss_fn 'custom' needs loss_fn_config.loss_id, the id create_custom_loss returned")
    row = st.store.custom_loss(loss_id)
    model = st.store.model(call.model_id)
    if row is None or row["owner"] != owner or model is None or row["session_id"] != model["session_id"]:
        raise NotFound(f"loss_id {loss_id!r} not found in this training run's session")
    loss = parse_custom_loss(row["definition"])
    check_datums(loss, call.data)
    call.custom_loss = loss
