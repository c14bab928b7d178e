"""``python -m facesphere`` (also what ``torchrun -m facesphere`` runs)."""

from facesphere.cli.main import main

if __name__ == "__main__":
    main()
