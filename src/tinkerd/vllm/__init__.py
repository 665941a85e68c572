"""The vLLM sampler path (`tinkerd serve --sampler vllm`): an HTTP client of a vLLM server.

Neither server nor engine: it speaks HTTP (so it is not in `engine/`, which never does) and
never imports torch (so a front end without torch can use it).
"""
