"""``python -m megasimpo`` = the ``megasimpo`` console script."""

from megasimpo.cli import main

if __name__ == "__main__":
    main()
