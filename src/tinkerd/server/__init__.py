"""The HTTP front end (FastAPI): routes, auth, errors. Never imports torch; the work is `tinkerd.control`'s."""
