"""Task-level jobs (issue 22): a user hands over a file and a kind (sft, dpo, rl with a grader) and gets back a
tuned adapter. This package is the torch-free, HTTP-free side: what a job request and its data file must look like
(`spec`, `files`), the choices a careful researcher would make (`plan`), and the queue that starts a job runner
process per job and restarts it after a crash (`manager`). The runner itself (`tinkerd.jobs`) is a client of the
service, like a user's script, so its work is batched, journaled and visible like any run.
"""
