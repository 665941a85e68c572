"""The job runner: a client of a tinkerd server, like a user's script, that turns a job's checked rows into a
tuned adapter (`runner`, one process per job start, started by `control.jobs.manager`), with the per-kind training
and evaluation (`tasks`, built from the cookbook recipes' code), the rl graders (`graders`), and the `tinkerd tune`
command (`tune`). It talks to the server only through the tinker SDK and the job routes; it never imports the
engine, the control plane's state or the server.
"""
