"""Measuring a device (torch) and fitting cost profiles to measurements (NumPy/SciPy only)."""
