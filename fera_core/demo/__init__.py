"""The demo: the project's tiny pixel-space flow model (model) adapted with FeRA and sampled (run)."""
