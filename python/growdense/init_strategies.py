"""How new hidden neurons are initialised: see :mod:`growdense.policies`.

Kept as an alias: the growth policies now live beside the keep policies of a shrink.
"""

from .policies import GROW_INITS, check_init, grow_neurons_

__all__ = ["GROW_INITS", "check_init", "grow_neurons_"]
