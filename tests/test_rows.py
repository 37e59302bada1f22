"""The data axis splits the work by rows: on 2x4 each device computes half the rows, with the same
logits as one device, and holds fewer temporaries than on 1x8."""

from __future__ import annotations

import json

from conftest import run_with_devices

ROWS_ON_TWO_BY_FOUR = """
import json, numpy as np, jax, grok1
from grok1.mesh import make_mesh
path = {path!r}
prompts = json.load(open(path + "/golden.json"))["prompts"]
prompts = (prompts * 2)[:4]                                  # 4 rows: 2 per data group
T = max(len(p) for p in prompts)
tokens = np.array([p + [0] * (T - len(p)) for p in prompts])
reference = grok1.load(path, dtype="float32", mesh=make_mesh("1x1", jax.devices()[:1])).logits(tokens)
model = grok1.load(path, dtype="float32", mesh=make_mesh("2x4"))
print(json.dumps({{"max_diff": float(np.abs(model.logits(tokens) - reference).max())}}))
"""

TEMPORARIES = """
import json
from grok1 import plan
from grok1.config import PRESETS
from grok1.mesh import make_mesh
# grok-1 at full width and context; two layers compile as one scanned body like all 64.
config = PRESETS["grok-1"].replace(num_layers=2)
out = {{}}
for spec in ("1x8", "2x4"):
    steps = plan.compile_steps(config, make_mesh(spec), batch=8, context={context},
                               dtype="bfloat16", steps=("prefill",))
    out[spec] = steps["prefill"]["temp"]
print(json.dumps(out))
"""


def test_logits_of_four_rows_on_2x4_equal_one_device(two_layer):
    output = run_with_devices(ROWS_ON_TWO_BY_FOUR.format(path=str(two_layer.path)))
    result = json.loads(output.splitlines()[-1])
    assert result["max_diff"] <= 1e-4


def test_batch_8_prefill_on_2x4_holds_at_most_60_percent_of_the_temporaries_of_1x8():
    temporaries = json.loads(run_with_devices(TEMPORARIES.format(context=8192)).splitlines()[-1])
    assert temporaries["2x4"] <= 0.6 * temporaries["1x8"], temporaries


SPREAD = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from grok1.mesh import make_mesh, on_mesh, spread_rows
for spec, rows in (("1x8", 8), ("2x4", 16), ("1x8", 4)):
    mesh = make_mesh(spec)
    f = jax.jit(on_mesh(lambda x: spread_rows(x * 2), mesh))
    y = f(jax.device_put(jnp.ones((rows, 1024)), NamedSharding(mesh, P())))  # replicated, as logits
    print(spec, rows, y.sharding.shard_shape(y.shape)[0], bool((y == 2).all()))
"""


def test_per_row_work_is_split_by_rows_over_every_device_when_the_rows_divide():
    lines = run_with_devices(SPREAD).splitlines()
    assert lines[:3] == ["1x8 8 1 True", "2x4 16 2 True", "1x8 4 4 True"]
