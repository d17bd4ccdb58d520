"""`python -m pipeline ...`: see `pipeline.cli`."""

from pipeline.cli import app

if __name__ == "__main__":
    app()
