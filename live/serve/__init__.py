"""live in the browser: `python -m live.serve` and the pieces it is built of.

`app.build(predictor, settings)` makes the aiohttp application (routes in `live.serve.app`),
`app.Running(application)` serves it from a thread (tests, benchmarks, scripts), the network runs
in `live.serve.inference.Worker`'s thread, and `live.serve.stream.Feed` serves a source of the
server's own at `/stream`. The page is `static/index.html` and `static/app.js`, with no build step.
"""
