"""Run machinery: devices and meshes, precision, memory, checkpoints, preemption, logs, weight files, errors."""
