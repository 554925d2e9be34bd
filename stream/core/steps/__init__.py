"""Pipeline steps, sans-I/O: rolling context, measurements, detectors, triggers, prompts."""
