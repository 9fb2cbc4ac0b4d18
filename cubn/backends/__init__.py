"""Backends: NumPy, and the kernel backend with its CuPy and emulated launchers."""
