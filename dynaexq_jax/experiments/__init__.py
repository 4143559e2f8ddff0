"""Experiments on top of the runtime: the policy-comparison harness, the training corpus and the
trainer of the default model, random checkpoints, the embedded default model and the demo."""
