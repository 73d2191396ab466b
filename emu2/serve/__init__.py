"""Serving Emu2: the OpenAI-compatible server, the web page, and the chat / ask / generate commands.

- `app`: FastAPI routes (`create_app`), `ServerThread` to run one in the background.
- `chat`: conversation -> prompt -> answers, whole or streamed (`ChatEngine`); server and CLI share it.
- `generation`: prompt, images and boxes -> the official Emu2-Gen input list (`ImageGenerator`).
- `limits`: what one request may ask (`ServeLimits`) and the only place request images are read.
- `queue`: the model's worker thread and its bounded line (`ModelWorker`).
- `schemas`: the OpenAI wire format and its JSON error (`APIError`).
- `cli`: `emu2 chat | ask | generate | serve`; `bench`: load test and schema fuzzing.

Nothing here is imported by `emu2` itself: the model package works without FastAPI installed.
"""
