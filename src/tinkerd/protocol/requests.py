"""JSON request bodies of the Tinker API, as pydantic models.

Unknown fields are ignored (newer SDKs may add some); wrong types, and integers beyond int64, are
rejected with a 422 that names the field. Only what tinkerd reads is declared.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from tinkerd.protocol.numbers import INT64_MAX, INT64_MIN

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]  # what the Store and torch can hold; beyond: 422


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateSessionRequest(Body):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionRequest(Body):
    session_id: str


class LoraConfig(Body):
    rank: Int64 = 32
    seed: Int64 | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(Body):
    session_id: str
    model_seq_id: Int64
    base_model: str
    lora_config: LoraConfig | None = None
    user_metadata: dict[str, Any] | None = None


class ModelRequest(Body):
    model_id: str


class AdamParamsBody(Body):
    """Omitted fields take the defaults of `tinkerd.protocol.types.AdamParams`."""

    learning_rate: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    grad_clip_norm: float | None = None
    type: str | None = None


class OptimStepRequest(Body):
    model_id: str
    seq_id: Int64 | None = None
    adam_params: AdamParamsBody = Field(
        default_factory=AdamParamsBody, validation_alias=AliasChoices("adam_params", "optim_params", "optimizer_params")
    )


class SaveWeightsForSamplerRequest(Body):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: Int64 | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"  # types.SamplingClientKind; see control.ops
    seq_id: Int64 | None = None
    ttl_seconds: Int64 | None = None
    user_metadata: dict[str, Any] | None = None


class CreateSamplingSessionRequest(Body):
    session_id: str
    sampling_session_seq_id: Int64
    base_model: str | None = None
    model_path: str | None = None


class SampleRequest(Body):
    prompt: dict[str, Any]
    sampling_params: dict[str, Any] | None = None
    num_samples: Int64 = 1
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Int64 = 0
    topk_sample_logprobs: Int64 = 0
    target_prompt_logprobs: dict[str, Any] | None = None  # TensorData, int64 [len(prompt) - 1, K]
    prompt_alt_tokens_k: Int64 = 0
    prompt_logprobs_last_n: Int64 | None = None
    seq_id: Int64 | None = None
    record_stability_info: bool | None = None


class RetrieveFutureRequest(Body):
    request_id: str
    allow_metadata_only: bool = False


class SaveWeightsRequest(Body):
    model_id: str
    path: str | None = None
    seq_id: Int64 | None = None
    ttl_seconds: Int64 | None = None
    overwrite: bool = False
    user_metadata: dict[str, Any] | None = None


class LoadWeightsRequest(Body):
    """Either on an existing model (model_id + seq_id) or creating one (session_id + model_seq_id)."""

    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: Int64 | None = None
    session_id: str | None = None
    model_seq_id: Int64 | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None


class SaveWeightsExternalRequest(Body):
    model_id: str
    path: str
    seq_id: Int64 | None = None
    ttl_seconds: Int64 | None = None
    age_encryption_recipients: list[str] | None = None


class CopyWeightsRequest(Body):
    """A destination model (session_id + model_seq_id) or none (destination_project_id is accepted, unused)."""

    source_path: str
    session_id: str | None = None
    model_seq_id: Int64 | None = None
    destination_project_id: str | None = None
    ttl_seconds: Int64 | None = None
    weights_access_token: str | None = None
