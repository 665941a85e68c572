"""Where and how the engine runs: fencing, adapter versions, Ray actors, FSDP groups, the vLLM sampler.

Each backend implements `engine.interface` (`Trainer`, `Sampler`); `assemble` wires the chosen ones from
`tinkerd serve`'s flags. Backends never import the control plane or the HTTP server.
"""
