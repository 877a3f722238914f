"""`python -m quantc ...` (and `torchrun --nproc-per-node N -m quantc compile budget.yaml`)."""
from .cli import main

if __name__ == "__main__":
    main()
