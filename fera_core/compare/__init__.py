"""Is FeRA worth it here? LoRA, FeRA and FeRA's ablations trained at equal size on the demo model and
measured (python -m fera_core compare): metrics.py (the distances), methods.py (one entry per method),
runner.py (splits, training jobs, scoring), report.py (table, plot, sample grid), cli.py (the command)."""
