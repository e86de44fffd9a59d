"""A phase kind written outside the package (like stagewise_pl/callbacks/promote.py for rules): it is named in a
plan by dotted path (``phase_plugins:AnswerOnly``), or registered by name when this module is imported."""
from stagewise_pl.phases import PHASES, SFTRunner


@PHASES.register("answer_only")
class AnswerOnly(SFTRunner):
    """Supervised: SFT on the final answer line alone (``#### <answer>``), not on a worked solution. Its traits
    are SFTRunner's (supervised, trains), so it takes an epoch count and replay like the built-in sft."""

    kind = "answer_only"

    def targets(self, problems):
        return [(p.prompt, f"#### {p.answer}") for p in problems]
