"""The six optimizers with settings that move small test models visibly in a few steps: Prodigy and
D-Adapt start from a larger d0 than their default so their d estimate changes within a short run."""
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


def make_opt(name, params, **options):
    cls, defaults = VARIANTS[name]
    return cls(params, **{**defaults, **options})
