"""Serving a model: reading converted checkpoints, batched generation, teacher-forced scoring,
sampling, text <-> tokens, and the hotness statistics the runtime consumes."""
