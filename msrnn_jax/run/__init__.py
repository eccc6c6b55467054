"""Running a loaded model: the `Model` object and `load_model`, generation and sampling,
perplexity runs, long-context tasks, recordings of what a policy keeps, and plots."""
