"""Text generation with a KV cache, continuous batching, streaming and per-request sampling, and
scoring (the log-probabilities of a prompt's own tokens) on the same engine.

- settings.py   what a request asks for, checked; its prompt fitted into the context
- sampling.py   one token per row on the device (penalties, temperature, top-k, top-p)
- steps.py      the slots' device state and the jitted prefill, decode and scoring steps
- runner.py     those steps compiled for one model and one number of slots
- requests.py   a request's progress on the host: stop conditions, text, Deltas, Completion
- scoring.py    a scoring request on the host: its prompt checked, its batch, its Score
- metrics.py    what the engine counts, for /metrics
- engine.py     the long-lived scheduler: requests join and leave slots at any step
- api.py        `Model.generate`, `Model.stream` and `Model.score` on the model's engine
"""
