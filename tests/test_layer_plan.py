from hypothesis import given, settings
from hypothesis import strategies as st

from mimo_jax.config import ModelConfig
from mimo_jax.layer_plan import plan_layers


def _expand(plan):
    layers = []
    for seg in plan:
        for r in range(seg.repeats):
            for run in seg.runs:
                layers += [(seg.layer_index(r, run, i), run.kind) for i in range(run.length)]
    return layers


def test_release_plan_has_five_layer_bodies():
    cfg = ModelConfig()
    kinds = tuple(zip(cfg.layer_types, cfg.mlp_types))
    plan = plan_layers(kinds)
    assert sum(len(seg.runs) for seg in plan) == 5
    assert max(seg.repeats for seg in plan) == 7
    assert _expand(plan) == list(enumerate(kinds))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([("global", "dense"), ("swa", "moe"), ("global", "moe")]), min_size=1, max_size=40))
def test_plan_covers_every_layer_once_in_order(kinds):
    assert _expand(plan_layers(tuple(kinds))) == list(enumerate(kinds))
