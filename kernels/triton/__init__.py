"""GPU kernels (Triton). Each public module holds one operation and is checked against
reference.py; _launch.py and _device.py hold the host and device helpers they share."""
