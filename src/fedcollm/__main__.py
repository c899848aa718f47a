"""`python -m fedcollm` is the `fedcollm` command."""

from fedcollm.cli import app

if __name__ == "__main__":
    app(prog_name="fedcollm")
