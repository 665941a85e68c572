"""Generate docs/COMPATIBILITY.md: every public method of the installed tinker SDK, supported or not, and why;
then every parameter of the OpenAI-compatible routes (`OPENAI`; tests/server/test_openai_routes.py sends each
refused one and expects a 400 naming it).

    python docs/compatibility.py          # rewrite the table
    python docs/compatibility.py --check  # exit 1 if an SDK method is missing here or the file is stale

`*_async` twins share their sync method's status. tests/test_compatibility.py runs --check, so a
new SDK release that adds a method fails the tests until someone decides its status.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

OUT = Path(__file__).with_name("COMPATIBILITY.md")
YES, NO, CLIENT = "supported", "not supported", "client-side"
IGNORED, REFUSED = "ignored", "refused (400)"

STATUS: dict[str, dict[str, tuple[str, str]]] = {
    "ServiceClient": {
        "create_lora_training_client": (YES, "rank, seed, train_attn/mlp/unembed honoured; tests/e2e/test_sdk_end_to_end.py"),
        "create_sampling_client": (YES, "base_model or tinker:// model_path (sampler_weights or weights)"),
        "create_training_client_from_state": (YES, "create-via-load_weights; survives restarts; tests/e2e/test_training_e2e.py"),
        "create_training_client_from_state_with_optimizer": (YES, "restores AdamW moments bit-exactly"),
        "get_server_capabilities": (YES, "lists the served base models"),
        "copy_weights": (YES, "synchronous copy of a readable checkpoint; tests/server/test_export.py"),
        "create_rest_client": (YES, "deprecated by the SDK in favour of RestClient()"),
        "close": (YES, "finishes the session (POST /sessions/{id}/finish)"),
        "create_custom_loss": (YES, "custom_loss_server_side: the traced graph is validated as data (allow-listed torch/math/operator calls, bounded sizes) and kept in the Store per session; tests/server/test_custom_losses.py"),
        "get_console_url": (CLIENT, "builds a URL to Thinking Machines' console; there is no console here yet"),
        "get_telemetry": (CLIENT, "SDK telemetry; the server accepts and drops the uploads"),
    },
    "TrainingClient": {
        "forward": (YES, "protobuf, forward_only; logprobs and elementwise_loss per datum"),
        "forward_backward": (YES, "all built-in losses, plus custom by loss_id; logprobs and elementwise_loss per datum"),
        "forward_backward_custom": (YES, "a LossHandle from create_custom_loss runs here in one forward_backward (same loss, metrics and gradients as the client-side path); a plain callable runs client-side (forward + cross_entropy with -dLoss/dlogprobs)"),
        "optim_step": (YES, "AdamW with every AdamParams field"),
        "save_state": (YES, "PEFT adapter + AdamW state, atomic"), "load_state": (YES, "weights only"),
        "load_state_with_optimizer": (YES, "weights and AdamW state"),
        "save_weights_for_sampler": (YES, "named sampler_weights checkpoint (PEFT layout)"),
        "save_weights_and_get_sampling_client": (YES, "in-memory snapshot, no file, no reload; kind='inflight': one shared target per run, later saves move every inflight client, a generation in flight adopts them at its next decode step (docs/inflight.md)"),
        "save_weights_external": (YES, "PEFT folder + download URLs; age encryption refused with a clear 400"),
        "create_sampling_client": (YES, "from a tinker:// path"), "get_info": (YES, "model_data.model_name, tokenizer_id"),
        "get_tokenizer": (YES, "resolves offline from the HF cache tinkerd fills (HF_HUB_OFFLINE=1)"),
        "get_console_url": (CLIENT, "no console here yet"), "get_telemetry": (CLIENT, "see ServiceClient"),
    },
    "SamplingClient": {
        "sample": (YES, "continuous batching; seeds, stop strings/tokens, top-k/top-p, 429 backpressure"),
        "compute_logprobs": (YES, "prompt_logprobs"), "get_tokenizer": (YES, "by base model hub name, offline"),
        "get_base_model": (YES, "GET /samplers/{id}"), "create": (YES, "the SDK's constructor path"),
        "get_sampler_handle": (CLIENT, "pickling support; join_sampling_session stays off, each clone is its own client"),
        "from_sampler_handle": (CLIENT, "see get_sampler_handle"),
        "on_queue_state_change": (CLIENT, "callback; a request waiting for its key's turn (--max-queued-sample-tokens-per-key, --max-runs-per-key) reports paused_rate_limit with a reason, others active; paused_capacity is never sent (a full sampling queue answers 429, which the SDK retries)"),
        "get_telemetry": (CLIENT, "see ServiceClient"),
    },
    "RestClient": {
        **{m: (YES, "tests/e2e/test_rest_e2e.py") for m in (
            "list_training_runs", "get_training_run", "get_training_run_by_tinker_path", "list_checkpoints",
            "list_user_checkpoints", "delete_checkpoint", "delete_checkpoint_from_tinker_path",
            "publish_checkpoint_from_tinker_path", "unpublish_checkpoint_from_tinker_path",
            "set_checkpoint_ttl_from_tinker_path", "get_weights_info_by_tinker_path", "list_sessions", "get_session",
            "get_server_capabilities", "get_sampler")},
        "get_external_weights_urls": (YES, "URLs on this server, valid 1 h, no API key needed"),
        "copy_weights": (YES, "see ServiceClient.copy_weights"),
        "search_sessions": (NO, "not implemented yet; list_sessions covers the self-hosted case"),
        "assign_session_project": (NO, "projects are a hosted-service concept; not implemented"),
        "export_session_trace": (NO, "no trace export yet"),
        "get_audit_log": (YES, "GET /api/v1/audit from the Store (run, checkpoint and custom-loss create, checkpoint delete/publish/unpublish/read): each key its own events, an --admin-key all; tests/server/test_identity.py"), "get_billing_usage": (NO, "no billing when self-hosted"),
        "get_current_checkpoint_storage_usage": (NO, "billing API; `tinkerd checkpoints` shows sizes"),
        "whoami": (YES, "token auth (POST /api/v1/auth/token, on unless --no-token-auth): user_urn tml:organization_user:<id derived from the key>, org tml:organization:self-hosted"),
        "get_telemetry": (CLIENT, "see ServiceClient"),
    },
}


CHAT, COMPLETIONS, BOTH = "chat", "completions", "both"
# (route, parameter, status, notes): /chat/completions and /completions under /v1 and /oai/api/v1
OPENAI: list[tuple[str, str, str, str]] = [
    (BOTH, "model", YES, "a base model name, `tinker://RUN/sampler_weights/NAME`, `tinker://RUN/weights/NAME` (a "
                         "training state) or `BASE;PATH`; another key's unpublished checkpoint: 404 `model_not_found`"),
    (CHAT, "messages", YES, "roles system, developer (as system), user, assistant; text content or text parts; "
                            "rendered with the base model's own chat template"),
    (COMPLETIONS, "prompt", YES, "a string, a list of strings, token ids, or a list of token id lists"),
    (BOTH, "n", YES, "1 to 128; sample i is seeded `seed + i`, as in the SDK"),
    (BOTH, "temperature", YES, "0 to 2 (0: greedy)"), (BOTH, "top_p", YES, "(0, 1]"),
    (BOTH, "top_k", YES, "vLLM's extension; -1 or 0: off"),
    (BOTH, "max_tokens", YES, "prompt + max_tokens beyond the context: 400 `context_length_exceeded`; default: the "
                              "rest of the context (chat), 16 (completions)"),
    (CHAT, "max_completion_tokens", YES, "as max_tokens"),
    (BOTH, "stop", YES, "a string or up to 16; the text ends before the first one (the sampler stops there too)"),
    (BOTH, "seed", YES, "the same seed gives the SDK's sample, token for token"),
    (CHAT, "logprobs", YES, "every token of the text with its exact bytes (end-of-turn tokens not listed)"),
    (CHAT, "top_logprobs", YES, "0 to 20; needs logprobs"),
    (COMPLETIONS, "logprobs", YES, "0 to 20 alternatives per token; with echo, the prompt's tokens too"),
    (COMPLETIONS, "echo", YES, "the prompt before the text; with logprobs, not when streaming (400)"),
    (COMPLETIONS, "best_of", YES, "only equal to n (every sample is returned); else 400"),
    (BOTH, "stream", YES, "SSE chunks then `data: [DONE]`; the embedded engine streams token by token, the Ray and "
                          "vLLM samplers send the whole answer as one chunk at the end; closing the stream cancels "
                          "the rows at the next decode step"),
    (BOTH, "stream_options.include_usage", YES, "a last chunk with no choices and the usage"),
    (BOTH, "user, metadata, store, service_tier, parallel_tool_calls, reasoning_effort, other unknown fields",
     IGNORED, "they change nothing here, as with other OpenAI-compatible servers"),
    (BOTH, "presence_penalty", REFUSED, "only 0"), (BOTH, "frequency_penalty", REFUSED, "only 0"),
    (BOTH, "repetition_penalty", REFUSED, "only 1"), (BOTH, "logit_bias", REFUSED, "not implemented"),
    (CHAT, "response_format", REFUSED, "only `{\"type\": \"text\"}` (no JSON mode or schema)"),
    (CHAT, "tools", REFUSED, "no tool calling"), (CHAT, "tool_choice", REFUSED, "no tool calling"),
    (CHAT, "functions", REFUSED, "no function calling"), (CHAT, "function_call", REFUSED, "no function calling"),
    (CHAT, "audio", REFUSED, "text only"), (CHAT, "modalities", REFUSED, "only `[\"text\"]`"),
    (CHAT, "prediction", REFUSED, "no predicted outputs"), (CHAT, "web_search_options", REFUSED, "no web search"),
    (COMPLETIONS, "suffix", REFUSED, "no insertion"),
]
OPENAI_RESPONSES = ("`GET /models` lists the base models and the caller's readable sampler checkpoints (`{object: "
                    "\"list\", data: [{id, object: \"model\", created, owned_by}]}`), `GET /models/{model}` one of "
                    "them. Answers carry `finish_reason` `stop` or `length` and `usage` (prompt and completion "
                    "tokens). Errors are `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` with 400 "
                    "(the field in `param`), 401 (`Authorization: Bearer <key>`, the SDK's keys), 404 (unknown or "
                    "unreadable model), 429 with `Retry-After` (the sampler's queue is full). Not served: "
                    "`/embeddings`, `/responses`, audio, images, files, fine-tuning jobs (OpenAI-shaped uploaded "
                    "files live at `/api/v1/files` instead, for task-level jobs: [jobs.md](jobs.md#uploaded-files)).")


def render_openai() -> str:
    lines = ["\n## OpenAI-compatible routes (`/v1`, `/oai/api/v1`)\n\n", OPENAI_RESPONSES, "\n\n",
             "| route | parameter | status | notes |\n|---|---|---|---|\n"]
    for route, parameter, status, why in OPENAI:
        shown = "both" if route == BOTH else f"/{route.replace('chat', 'chat/completions')}"
        lines.append(f"| {shown} | `{parameter}` | {status} | {why} |\n")
    return "".join(lines)


def sdk_methods() -> dict[str, list[str]]:
    import tinker

    out = {}
    for name in STATUS:
        cls = getattr(tinker, name)
        out[name] = sorted(n for n, _ in inspect.getmembers(cls, callable)
                           if not n.startswith("_") and not n.endswith("_async"))
    return out


def render() -> str:
    import tinker

    lines = [f"# SDK and OpenAI compatibility (tinker {tinker.__version__})\n",
             "\nGenerated by `python docs/compatibility.py` from the installed SDK; `*_async` twins behave like their "
             "sync method.\n"]
    for cls, methods in sdk_methods().items():
        lines.append(f"\n## {cls}\n\n| method | status | notes |\n|---|---|---|\n")
        for method in methods:
            status, why = STATUS[cls].get(method, ("UNDECIDED", "new in this SDK version: decide and document"))
            lines.append(f"| `{method}` | {status} | {why} |\n")
    return "".join(lines) + render_openai()


def main() -> int:
    missing = [f"{c}.{m}" for c, ms in sdk_methods().items() for m in ms if m not in STATUS[c]]
    text = render()
    if "--check" in sys.argv:
        if missing:
            print("SDK methods without a decided status:", ", ".join(missing))
            return 1
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python docs/compatibility.py")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({'missing: ' + ', '.join(missing) if missing else 'every method decided'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
