"""Online models (issue 23): a served model that learns from feedback while it answers, without forgetting.

`spec` checks the requests, `examples` turns feedback and anchors into training data, `driver` drives the model's
ordinary training run through `control.ops`, `models` is an online model's life (create, read, feed, serve,
delete, resume after a restart) and `learner` the background task that turns stored feedback into updates.
No HTTP (`server.routes.online`) and no torch.
"""
