"""Post-training recipes written against the tinker SDK; run them with `python -m cookbook.<name>.train`."""
