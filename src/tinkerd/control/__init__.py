"""The control plane: ordering, futures, the request journal, run lifecycle and checkpoint rules.

Neither torch nor HTTP: the server's routes and (later) jobs and online learning are its clients, and
it drives any engine through `engine.interface`.
"""
