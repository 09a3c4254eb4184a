"""GPU kernels (Triton). Each module holds one operation and is checked against reference.py."""
