"""ASL alphabet pipeline: fetch, preprocess, train (DP and DDP), evaluate, promote, serve.

Run a stage with `python -m pipeline <stage>`; DVC runs them all with `dvc repro`.
"""
