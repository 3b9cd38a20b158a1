"""Training of the project's small DeepSeek-V3-architecture models on the Python standard library.

`python -m training.train` trains a target or a draft model; `python -m training.evaluate` measures
held-out perplexity and draft/target greedy agreement.
"""
