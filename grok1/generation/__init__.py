"""Text generation with a KV cache, continuous batching, streaming and per-request sampling.

- settings.py   what a request asks for, checked; its prompt fitted into the context
- sampling.py   one token per row on the device (penalties, temperature, top-k, top-p)
- steps.py      the slots' device state and the jitted prefill and decode steps
- runner.py     those steps compiled for one model and one number of slots
- requests.py   a request's progress on the host: stop conditions, text, Deltas, Completion
- engine.py     the long-lived scheduler: requests join and leave slots at any step
- api.py        `Model.generate` and `Model.stream` on the model's engine
"""
