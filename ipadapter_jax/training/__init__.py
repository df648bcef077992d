"""Training: typed config, components, the step, the run (built and placed), hooks and the loop."""
