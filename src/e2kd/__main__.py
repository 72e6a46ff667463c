"""``python -m e2kd ...`` runs the command line (also under ``torchrun -m e2kd``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
