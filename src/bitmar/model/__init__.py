"""BitMar network components (no IO, no logging)."""
