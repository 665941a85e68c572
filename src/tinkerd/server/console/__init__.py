"""The web console: sessions, runs, curves, checkpoints and a playground, served at `/` of the same app.

Server-rendered pages (Jinja2 templates, `pages`) built from the same functions the SDK's REST routes
run (`server.routes.rest`), so a key sees in the browser exactly what its SDK sees; small scripts of
our own (`static/`) draw the charts, poll for new points and send the writes (delete, publish, TTL)
to those REST routes with the sign-in cookie and a CSRF token (`server.auth`). No CDN, no fonts.
"""
