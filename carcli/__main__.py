"""``python -m carcli`` runs the ``car`` command."""

from carcli.cli import main

if __name__ == "__main__":
    main()
