"""The explicit registry of methods: name -> class. ``unimodal:<modality>`` selects the unimodal baseline."""

from __future__ import annotations

from typing import Any

from poise.errors import ConfigError, closest
from poise.methods.base import Method
from poise.methods.baselines import Joint, Unimodal
from poise.methods.extensions import BoostWeak, Distill, ModalityDropout, UncertaintyWeighting
from poise.methods.agm import AGM
from poise.methods.gblend import GradientBlending
from poise.methods.inforeg import InfoReg
from poise.methods.reconboost import ReconBoost
from poise.methods.relearning import Relearning
from poise.methods.valuation import Valuation
from poise.methods.mla import MLA
from poise.methods.mmcosine import MMCosine
from poise.methods.mmpareto import MMPareto
from poise.methods.modulation import Modulate
from poise.methods.ogm import OGM, OGMGE, OPM
from poise.methods.pmr import PMR
from poise.methods.teachers import UME, UMT
from poise.methods.mbsd import MBSD
from poise.methods.amco import AMCo
from poise.methods.arl import ARL
from poise.methods.g2d import G2D
from poise.methods.remix import Remix
from poise.registry import Registry
from poise.methods.greedy import Greedy
from poise.methods.dimml import DIMML
from poise.methods.lfm import LFM
from poise.methods.cggm import CGGM
from poise.methods.cml import CML

def _name_is_key(key: str, cls: type[Method]) -> None:
    if cls.name != key:
        raise ValueError(f"method class {cls.__name__} is registered as '{key}' but its name is '{cls.name}'")


METHODS: Registry[type[Method]] = Registry(
    "method",
    {
        "joint": Joint,
        "unimodal": Unimodal,
        "ogm": OGM,
        "ogm_ge": OGMGE,
        "opm": OPM,
        "gblend": GradientBlending,
        "mla": MLA,
        "boost_weak": BoostWeak,
        "uncertainty": UncertaintyWeighting,
        "distill": Distill,
        "modality_dropout": ModalityDropout,
        "umt": UMT,
        "ume": UME,
        "mmcosine": MMCosine,
        "pmr": PMR,
        "mmpareto": MMPareto,
        "agm": AGM,
        "inforeg": InfoReg,
        "relearning": Relearning,
        "valuation": Valuation,
        "reconboost": ReconBoost,
        "modulate": Modulate,
        "mbsd": MBSD,
        "amco": AMCo,
        "arl": ARL,
        "greedy": Greedy,
        "dimml": DIMML,
        "lfm": LFM,
        "cggm": CGGM,
        "cml": CML,
        "g2d": G2D,
        "remix": Remix,
    },
    check=_name_is_key,
)

#: the two baselines
BASELINES = ("joint", "unimodal")
#: methods assembled from parts chosen by options; their defaults repeat a named method (``modulate``'s is ``ogm``)
ASSEMBLED = ("modulate",)


def balancing_methods() -> list[str]:
    """The methods that balance modalities, in the order reports list them: every registered one but the
    baselines and the assembled ones (``bench --methods all`` runs these)."""
    return [name for name in METHODS if name not in BASELINES and name not in ASSEMBLED]


def make_method(spec: str, options: dict[str, Any] | None = None) -> Method:
    """Build a method from its registered name (``unimodal:<modality>`` for the unimodal baseline), or
    several joined by ``+`` (``ogm_ge+modality_dropout``: :class:`poise.methods.compose.Combined`; then
    ``options`` maps each part's name to its options)."""
    if "+" in spec:
        from poise.methods.compose import Combined

        parts = [part.strip() for part in spec.split("+")]
        by_part = dict(options or {})
        for key in by_part:
            if key not in [p.partition(":")[0] for p in parts]:
                raise ConfigError(f"options for '{key}' given to '{spec}', which combines {', '.join(parts)}")
        return Combined([make_method(part, by_part.get(part.partition(":")[0])) for part in parts])
    name, _, arg = spec.partition(":")
    cls = METHODS[name]
    options = dict(options or {})
    valid = [f.alias or k for k, f in cls.Params.model_fields.items()]
    for key in options:
        if key not in valid and key not in cls.Params.model_fields:
            hint = closest(key, valid).replace(" (did you mean '", f" (did you mean 'method.{name}.") if valid else " (it takes none)"
            raise ConfigError(f"unknown option 'method.{name}.{key}'{hint}")
    if name == "unimodal":
        given = options.get("modality")
        if arg and given not in (None, "", arg):
            raise ConfigError(f"'{spec}' names modality '{arg}' but method.unimodal.modality is '{given}'; give one of them")
        if not (arg or given):
            raise ConfigError("the unimodal baseline needs a modality: 'unimodal:<modality>' or "
                              "--set method.unimodal.modality=<modality>")
        options["modality"] = arg or given
    elif arg:
        raise ConfigError(f"method '{name}' takes no ':' argument (got '{spec}')")
    try:
        return cls(options)
    except ConfigError:
        raise
    except Exception as err:  # pydantic.ValidationError
        from poise.config import describe_validation_error

        raise ConfigError(describe_validation_error(err, prefix=f"method.{name}")) from None


__all__ = ["ASSEMBLED", "BASELINES", "METHODS", "balancing_methods", "closest", "make_method"]
