"""Model math: configuration, expert weight formats, the MoE op and its backends, model families.
Nothing here knows about budgets, serving loops or files on disk."""
