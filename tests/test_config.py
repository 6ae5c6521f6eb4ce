import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest

from reled_hpc.cli import main
from reled_hpc.config import describe_config, field_docs, format_config_help, from_dict, load_yaml
from reled_hpc.errors import ConfigError, ReledError
from reled_hpc.experiment.config import TrainConfig
from reled_hpc.launch.spec import SlurmSpec
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


# ---- field docstrings and `train --help-config` ----------------------------------------------------


def _config_classes(cls: type) -> list[type]:
    """`cls` and every dataclass section nested in it."""
    out = [cls]
    for tp in typing.get_type_hints(cls).values():
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += _config_classes(tp)
    return out


@pytest.mark.parametrize("cls", _config_classes(TrainConfig), ids=lambda c: c.__name__)
def test_every_config_field_has_a_one_line_docstring(cls):
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        doc = docs.get(f.name, "")
        assert doc.strip(), f"{cls.__name__}.{f.name} has no docstring (a string literal on the line under it)"
        assert "\n" not in doc, f"{cls.__name__}.{f.name}: the docstring should be one line"


def test_describe_config_lists_nested_keys_with_defaults():
    rows = {r.key: r for r in describe_config(TrainConfig)}
    assert rows["ppo.lr"].default == 0.0003 and rows["ppo.lr"].type == "float"
    assert "learning rate" in rows["ppo.lr"].doc
    assert rows["sed.tau_R"].default == 750.0 and "RVI" in rows["sed.tau_R"].doc
    assert rows["env.traffic"].type == "'none' | 'light' | 'medium' | 'heavy'"
    assert "env" not in rows and "name" in rows  # sections are walked into, top-level keys stay bare
    assert rows["slurm"].default == {} and rows["slurm"].type == "dict[str, Any]"
    with_slurm = {r.key: r for r in describe_config(TrainConfig, sections={"slurm": SlurmSpec})}
    assert "slurm" not in with_slurm and with_slurm["slurm.nodes"].default == 1
    assert with_slurm["slurm.ntasks_per_node"].doc == "MPI ranks per node"  # SlurmSpec's trailing comment
    # every key describe_config lists is one from_dict accepts
    for key in rows:
        node: dict = {}
        *parents, leaf = key.split(".")
        cur = node
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[leaf] = rows[key].default
        from_dict(TrainConfig, node)


@dataclass
class _Documented:
    rate: float = 0.5
    """How fast."""
    sub: Inner = field(default_factory=lambda: Inner(rate=2.0))
    """A section whose factory sets its own default."""
    legacy: int = 3  # only a comment
    bare: str = ""


def test_field_docs_and_describe_config_on_a_small_class():
    assert field_docs(_Documented) == {"rate": "How fast.", "sub": "A section whose factory sets its own default."}
    rows = describe_config(_Documented, prefix="x.")
    assert [(r.key, r.default, r.doc) for r in rows] == [
        ("x.rate", 0.5, "How fast."),
        ("x.sub.rate", 2.0, ""),  # the factory's object decides the nested default
        ("x.legacy", 3, "only a comment"),
        ("x.bare", "", ""),
    ]
    lines = format_config_help(_Documented)
    assert lines[0] == "top level:" and any(line.startswith("  legacy: int = 3") for line in lines)


def test_field_docs_fails_loudly_without_source():
    ns: dict = {"__name__": "reled_hpc_no_such_module"}
    exec("from dataclasses import dataclass\n@dataclass\nclass Ghost:\n    speed: int = 1\n", ns)
    with pytest.raises(ReledError, match=r"Ghost's fields \(speed\).*source is unavailable"):
        field_docs(ns["Ghost"])
    with pytest.raises(TypeError, match="needs a dataclass"):
        field_docs(int)


def test_cli_train_help_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("  env.n_agents: int = 20 ") and "agents" in line for line in lines)
    assert any(line.startswith("  hpo.kappa: float = 5.0 ") for line in lines)
    assert any(line.startswith("  slurm.time_min: int = 60 ") for line in lines)
    assert "ppo: PPO hyper-parameters" in out and "sed.tau_R: float = 750.0" in out
    assert max(map(len, lines)) <= 120
    assert not list(tmp_path.iterdir())  # nothing trained, no run folder
