"""qfi: quantization-aware, bit-level fault injection for PyTorch."""
