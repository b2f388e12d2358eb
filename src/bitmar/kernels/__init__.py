"""CPU kernels built at first use (see `bitmar.kernels.packed_cpu`)."""
