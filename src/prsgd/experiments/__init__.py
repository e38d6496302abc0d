"""Experiments: the runner of configs, theory problems and experiments, results, reports, plots, the demo."""
