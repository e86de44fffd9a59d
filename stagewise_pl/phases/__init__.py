"""Phase kinds: what one step of each kind of phase does, its step count, its optimiser and its state.

Each kind is a :class:`PhaseRunner` subclass registered in :data:`PHASES` with its :class:`PhaseTraits`:

- ``profile``, ``eval`` -- :mod:`stagewise_pl.phases.profile`
- ``sft`` -- :mod:`stagewise_pl.phases.supervised`
- ``bridge_sft``, ``cft`` -- :mod:`stagewise_pl.phases.teaching`
- ``grpo`` -- :mod:`stagewise_pl.phases.grpo`
- ``hpt``, ``relift`` -- :mod:`stagewise_pl.phases.mixed` (peers of the method, reconstructed)
- ``luffy`` -- :mod:`stagewise_pl.phases.luffy` (a peer: the teacher's trace inside the GRPO group, reconstructed)
- ``hinted`` -- :mod:`stagewise_pl.phases.hinted` (GRPO with a prefix of the teacher's trace in the prompt,
  reconstructed; a rival of ``bridge_sft`` for the hard bucket)

A kind written outside the package registers itself the same way (``@PHASES.register("mine")``) or is named in
the plan by dotted path (``kind: package.module:MyRunner``). The phase manager
(:mod:`stagewise_pl.phases.manager`) runs the plan's phases in one Lightning fit; the driver
(:mod:`stagewise_pl.phases.driver`) holds the one LightningModule and runs a single phase on its own (the tiny
model's warm-up, benchmarks).
"""
from stagewise_pl.phases.base import PHASES, PhaseRunner, kind_traits, runner_class
from stagewise_pl.phases.context import PhaseContext, RolloutEngines, Teachers
from stagewise_pl.plan import PhaseTraits
# importing a kind's module registers it
from stagewise_pl.phases.profile import EvalRunner, ProfileRunner
from stagewise_pl.phases.supervised import SFTRunner, TaughtRunner
from stagewise_pl.phases.teaching import BridgeSFTRunner, CFTRunner
from stagewise_pl.phases.grpo import GRPORunner
from stagewise_pl.phases.grpo_batch import GRPOSettings
from stagewise_pl.phases.mixed import HPTRunner, ReLIFTRunner
from stagewise_pl.phases.luffy import LUFFYRunner
from stagewise_pl.phases.hinted import HintedRunner

__all__ = ["PHASES", "PhaseRunner", "PhaseTraits", "PhaseContext", "RolloutEngines", "Teachers", "kind_traits",
           "runner_class", "EvalRunner", "ProfileRunner", "SFTRunner", "TaughtRunner", "BridgeSFTRunner",
           "CFTRunner", "GRPORunner", "GRPOSettings", "HPTRunner", "ReLIFTRunner",
           "LUFFYRunner", "HintedRunner"]
