"""Trying a mesh on one machine: run on N CPU devices instead of the accelerators.

XLA can split the host CPU into N devices, so a `--mesh 1x8` program (sharding, collectives,
memory plan) runs on one machine without accelerators, only slowly. It must be asked before JAX
starts its backends, i.e. before the first computation:

    python run.py --cpu-devices 8 --mesh 1x8
    python -m grok1.plan --mesh 1x8              # the plan forces as many as the mesh has
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python my_script.py   # any program
"""

from __future__ import annotations


def force_cpu_devices(count: int) -> None:
    """Run this process on `count` CPU devices (and no accelerator). ValueError for count < 1;
    RuntimeError (JAX's) when JAX has already run a computation, which is too late."""
    if count < 1:
        raise ValueError(f"the number of CPU devices must be >= 1, got {count}")
    import jax
    jax.config.update("jax_num_cpu_devices", count)  # raises once the backends have started
    jax.config.update("jax_platforms", "cpu")
