"""GPU kernels (Triton). Each public module holds one operation and is checked against
reference.py; _launch.py and _device.py hold the host and device helpers they share."""


def set_programmatic_launch(enabled: bool) -> None:
    """Turn programmatic dependent launch between a step's kernels on or off for the whole
    process (on by default; it applies on GPUs of compute capability >= 9.0 only, see
    ``_launch.pdl_launch``). Steps captured before keep what they were captured with."""
    from louver_kernels.triton import _launch

    _launch.USE_PDL = bool(enabled)
