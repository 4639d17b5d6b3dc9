"""Custom kernels: FITS spectral (FFT interpolation), DRESS row-sparse. NumPy references + ONNX lowerings."""
