"""BitMar: BitNet b1.58 vision-language model with Larimar episodic memory."""

__version__ = "0.1.0"
