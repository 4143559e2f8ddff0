"""The OpenAI-compatible HTTP server (`dynaexq serve`): continuous batching under the budgeted
runtime (batcher), the API (app, protocol; FastAPI and uvicorn, the `serve` extra) and /metrics."""

MAX_BODY_BYTES = 1 << 20           # request bodies above this are refused (413)
REQUEST_TIMEOUT_S = 600.0          # a request not done by then is ended (504, or an error event)
