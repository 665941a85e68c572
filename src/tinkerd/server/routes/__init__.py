"""HTTP routes, one module per area of the API; each route translates wire <-> state/engine calls."""
