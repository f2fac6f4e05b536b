"""The six optimizers with settings that move small test models visibly in a few steps: Prodigy and
D-Adapt start from a larger d0 than their default so their d estimate changes within a short run;
the snapshot of an optimizer that the tests of refused steps compare before and after; and
extension_mode, which sets MLORC_EXTENSION for a block."""
import contextlib
import inspect
import os

import torch

import mlorc

VARIANTS = {
    "AdamW": (mlorc.MLorc_AdamW, dict(lr=1e-2)),
    "Lion": (mlorc.MLorc_Lion, dict(lr=1e-3)),
    "Prodigy": (mlorc.MLorc_Prodigy, dict(lr=1.0, d0=1e-3, slice_p=3)),
    "DAdapt_Lion": (mlorc.MLorc_DAdapt_Lion, dict(lr=1.0, d0=1e-3, slice_p=3)),
    "Adopt": (mlorc.MLorc_Adopt, dict(lr=1e-2)),
    "CAME": (mlorc.MLorc_CAME, dict(lr=1e-2)),
}
NAMES = list(VARIANTS)
ADAPTIVE = ("Prodigy", "DAdapt_Lion")


def takes(cls, option):
    """Whether the optimizer class has the hyperparameter `option` (its constructor's signature)."""
    return option in inspect.signature(cls).parameters


def make_opt(name, params, **options):
    cls, defaults = VARIANTS[name]
    return cls(params, **{**defaults, **options})


def snapshot(opt, params):
    """Deep copies of the parameters, the per-parameter state and the param groups (d, k, ...)."""
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
             for p in params]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in params], state, groups


def assert_snapshot_equal(a, b):
    params_a, state_a, groups_a = a
    params_b, state_b, groups_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    for sa, sb in zip(state_a, state_b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]) if torch.is_tensor(sa[key]) else sa[key] == sb[key]
    assert groups_a == groups_b


@contextlib.contextmanager
def extension_mode(value):
    """MLORC_EXTENSION set to `value` inside the block, restored (CI sets it for the session) after."""
    old = os.environ.get("MLORC_EXTENSION")
    os.environ["MLORC_EXTENSION"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["MLORC_EXTENSION"]
        else:
            os.environ["MLORC_EXTENSION"] = old
