"""The compiled programs of the shipped model's steps, as text to diff between two checkouts.

A change that moves code but not computation (a refactor) should compile the same programs:
    (cd A && python benchmarks/programs.py /tmp/a.txt); (cd B && python benchmarks/programs.py /tmp/b.txt)
    diff /tmp/a.txt /tmp/b.txt
Written per step (a decode call of 4 slots with sampling, a 32-token prompt's prefill into a
slot, `Model.logits` of 2 x 16 tokens): XLA's optimized HLO instructions with metadata and source
locations removed, so only the computation is compared.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's grok1
sys.path.insert(0, REPO)

import grok1  # noqa: E402

try:
    from grok1.generation import steps
    from grok1.generation.runner import Runner
except ImportError:  # checkouts before grok1 was put in layers (f7dfde5): one sampler module
    from grok1 import sampler as steps
    from grok1.sampler import Runner


def instructions(hlo: str) -> list[str]:
    """The computations and instructions of an HLO text, without metadata or source frames."""
    kept = []
    for line in hlo.splitlines():
        if re.match(r"^\s*(ROOT )?%", line) or re.match(r"^(ENTRY|%[\w.\-]+ \(|\S.*\{$)", line):
            line = re.sub(r", stack_frame_id=\d+", "", line)
            kept.append(re.sub(r", metadata=\{[^}]*\}", "", line))
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="file to write the programs to")
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "checkpoints", "small"))
    parser.add_argument("--mesh", help="e.g. 1x8 (with XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    args = parser.parse_args()
    model = grok1.load(args.checkpoint, mesh=args.mesh, progress=False)
    runner = Runner(model, slots=4)
    state = steps.empty_state(model.config, model.dtype, 4)
    if model.mesh is not None:
        state = jax.device_put(state, runner._state_sharding)
    prompt = jnp.zeros((1, 32), jnp.int32)
    programs = {
        "decode": runner.decode.lower(model.params, state),
        "prefill": runner._prefill_slot.lower(model.params, state, prompt, jnp.int32(5), jnp.int32(0)),
        "logits": model._forward.lower(model.params, jnp.zeros((2, 16), jnp.int32)),
    }
    with open(args.out, "w") as f:
        for name, lowered in programs.items():
            lines = instructions(lowered.compile().as_text())
            f.write(f"##### {name}: {len(lines)} lines\n" + "\n".join(lines) + "\n")
            print(f"{name}: {len(lines)} lines")


if __name__ == "__main__":
    main()
