"""Device, process groups and the CPU compatibility layer for megatron-core."""
