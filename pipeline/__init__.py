"""MoDE-style CLIP data-expert pipeline: the small framework (config, artifacts, runner, CLI)."""
