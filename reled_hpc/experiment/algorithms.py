"""The algorithm registry, in BenchMARL's manner: an algorithm names the config section that holds its
hyper-parameters and the learner class that section configures. Training builds learners, the
analysis tells which config keys matter, and the config validates names, all by asking here.
(The learner is named here rather than by the section's class because learn/config.py must stay
free of torch, and the learner modules import it: naming them there would be an import cycle.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..learn.base import Learner

LEARNER_SECTIONS = ("ppo", "qmix")  # config sections that configure a learner
EXPERT_KEYS = ("hpo.expert", "hpo.kappa", "hpo.dtw_radius", "hpo.oracle_policy")  # HPO's; not hpo.scenario_period


@dataclass(frozen=True)
class Algorithm:
    name: str
    section: str  # the config section with the learner's hyper-parameters
    learner: Callable[[], type[Any]]  # the learner class (imported when first asked: torch is heavy)
    uses_expert: bool  # trains with HPO on expert demonstrations (RELED)
    learner_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the learner
    description: str = ""

    def make_learner(self, cfg: Any, global_dim: int) -> Learner:
        """The learner of a TrainConfig `cfg`, built from its section."""
        section = getattr(cfg, self.section)
        return self.learner()(cfg.env.a_max, global_dim, section, seed=cfg.seed, **self.learner_options)

    def unused_keys(self, expert: str | None) -> tuple[str, ...]:
        """Config keys (or "section." prefixes) this algorithm never reads with HPO expert `expert`:
        a difference there makes no other experiment."""
        unused = [f"{s}." for s in LEARNER_SECTIONS if s != self.section]
        if not self.uses_expert:
            return (*unused, *EXPERT_KEYS, "sed.", "llm.")
        if expert != "llm":
            unused += ["sed.", "llm."]
            if expert == "none":
                unused += [k for k in EXPERT_KEYS if k != "hpo.expert"]
        else:
            unused.append("hpo.oracle_policy")
        return tuple(unused)


def _ppo() -> type[Any]:
    from ..learn.ppo import PPOLearner

    return PPOLearner


def _qmix() -> type[Any]:
    from ..learn.qmix import QMIXLearner

    return QMIXLearner


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ippo", "ppo", _ppo, False, {"central": False}, "independent PPO (local critic)"),
        Algorithm("mappo", "ppo", _ppo, False, {"central": True}, "PPO, centralised critic over the global state"),
        Algorithm("qmix", "qmix", _qmix, False, {}, "QMIX: monotonic mixing of per-agent Q values"),
        Algorithm("reled", "ppo", _ppo, True, {"central": False}, "PPO + HPO on expert demonstrations (oracle or SED)"),
    )
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r} (one of {', '.join(ALGORITHMS)})") from None
