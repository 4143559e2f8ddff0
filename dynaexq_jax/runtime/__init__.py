"""The DynaExq runtime: device-memory budget, per-tier slot pools, hotness-driven policies and
asynchronous promotion/demotion between jitted decode segments."""
