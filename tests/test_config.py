from dataclasses import dataclass, field
from typing import Literal

import pytest

from reled_hpc.config import from_dict, load_yaml
from reled_hpc.errors import ConfigError
from reled_hpc.sim.env import EnvConfig


@dataclass
class Inner:
    rate: float = 1.0


@dataclass
class Outer:
    name: str = "x"
    n: int = 1
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_valid_nested_config():
    cfg = from_dict(Outer, {"name": "y", "n": 3, "mode": "b", "inner": {"rate": 2}, "tags": ["t"]})
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float) and cfg.tags == ["t"]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"nme": "y"}, "'nme'"),
        ({"n": "3"}, "cfg.n"),
        ({"n": True}, "cfg.n"),
        ({"mode": "c"}, "cfg.mode"),
        ({"inner": {"rate": "fast"}}, "cfg.inner.rate"),
        ({"inner": {"speed": 1}}, "'speed'"),
        ({"tags": "t"}, "cfg.tags"),
    ],
)
def test_bad_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as exc:
        from_dict(Outer, data, "cfg")
    assert key in str(exc.value)


def test_env_config_impossible_values():
    with pytest.raises(ConfigError, match=r"env.n_agents"):
        from_dict(EnvConfig, {"n_agents": 0}, "env")
    with pytest.raises(ConfigError, match=r"env.traffic"):
        from_dict(EnvConfig, {"traffic": "jammed"}, "env")
    with pytest.raises(ConfigError, match=r"env.lookahead"):
        from_dict(EnvConfig, {"lookahead": 0}, "env")


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(lst)
