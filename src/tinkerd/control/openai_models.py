"""The `model` of an OpenAI-compatible request: which weights answer it, and what `GET /models` lists.

A `model` is, as on the hosted service:
- a base model's name: the base model, no adapter;
- a `tinker://<run>/sampler_weights/<name>` path, or `tinker://<run>/weights/<name>` (a training state,
  which tinkerd samples too): that checkpoint's adapter on the base model it was trained on;
- `<base model>;<checkpoint path>`: the same, the base named explicitly (it must be the checkpoint's own);
- the name of one of the caller's online models (`control.online`): its newest inflight weights.
A checkpoint is readable by the key that created it, or by anyone once published (`readable_checkpoint`);
any other is "not found", like a path that never existed, whatever the model's architecture.
Knows the checkpoint rules and base models of the control plane, not HTTP.
"""

from __future__ import annotations

from tinkerd.control.checkpoints import is_expired, sampling_adapter
from tinkerd.control.online.models import chat_adapter
from tinkerd.control.openai_requests import OpenAIError, invalid
from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.engine.interface import AdapterRef, BaseModelInfo
from tinkerd.protocol.paths import PREFIX
from tinkerd.protocol.types import BadRequest


def not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model {model!r} does not exist or you do not have access to it (GET /models lists "
                            "the base models and your sampler checkpoints)", param="model", code="model_not_found")


def resolve_model(st: ControlPlane, owner: str, model: str) -> tuple[AdapterRef, BaseModelInfo]:
    """The adapter that answers `model` and its base model; OpenAIError 404 / 400 otherwise."""
    base_name, _, path = model.partition(";") if ";" in model else (None, "", model)
    if not path.startswith(PREFIX):
        if base_name is not None:
            raise invalid("model", f"expected '<base model>;tinker://<run>/sampler_weights/<name>', got {model!r}")
        if model not in st.base_models:
            online = chat_adapter(st, owner, model)
            if online is None or online.base_model not in st.base_models:
                raise not_found(model)
            return online, st.base_models[online.base_model]
        return AdapterRef(uri=None, base_model=model), st.base_models[model]
    try:
        ref = sampling_adapter(st, owner, path, field="model")
    except NotFound:
        raise not_found(model) from None
    except BadRequest as exc:
        raise invalid("model", str(exc).removeprefix("model: ")) from None
    if base_name is not None and base_name != ref.base_model:
        raise invalid("model", f"checkpoint {path!r} was trained on {ref.base_model!r}, not {base_name!r}")
    if ref.base_model not in st.base_models:
        raise OpenAIError(404, f"checkpoint {path!r} needs base model {ref.base_model!r}, which this server does not "
                               f"serve (served: {sorted(st.base_models)})", param="model", code="model_not_found")
    return ref, st.base_models[ref.base_model]


def model_card(model_id: str, created: float, owned_by: str) -> dict:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": owned_by}


def list_models(st: ControlPlane, owner: str, started_at: float) -> dict:
    """The served base models, then the caller's readable sampler checkpoints (newest first, unexpired)."""
    data = [model_card(name, started_at, "tinkerd") for name in sorted(st.base_models)]
    online, _ = st.store.list_online_models(owner, 1000, 0)
    data += [model_card(row["name"], row["created"], "you") for row in online if row["status"] == "ready"]
    for row in st.store.readable_sampler_checkpoints(owner):
        if not is_expired(row):
            data.append(model_card(row["path"], row["created"], "you" if row["owner"] == owner else "public"))
    return {"object": "list", "data": data}


def retrieve_model(st: ControlPlane, owner: str, model: str, started_at: float) -> dict:
    ref, _ = resolve_model(st, owner, model)
    if ref.uri is None:
        return model_card(model, started_at, "tinkerd")
    online = st.store.online_model_named(owner, model)
    if online is not None and not model.startswith(PREFIX):
        return model_card(model, online["created"], "you")
    row = st.store.checkpoint(model.partition(";")[2] or model)
    return model_card(model, row["created"], "you" if row["owner"] == owner else "public")
