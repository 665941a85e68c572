"""tinkerd: a self-hostable fine-tuning server that speaks the Tinker API."""

__version__ = "0.1.0"
