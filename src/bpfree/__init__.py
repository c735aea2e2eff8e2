"""bpfree: train networks with backpropagation-free algorithms and measure them against backprop."""

__version__ = "0.1.0"
