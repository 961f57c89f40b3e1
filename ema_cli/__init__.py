"""ema-cli: replay model checkpoints through a TensorFlow-exact exponential moving average."""

__version__ = "0.1.0"
