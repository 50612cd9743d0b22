"""One typed config, built from ``params.yaml``.

This module is the config engine: the top-level keys (``Config``), the typed build (``build``:
unknown keys and values of the wrong type raise, then each dataclass's ``check``), the coercion
and the checks the schemas share (``positive``, ``one_of``, ...), all with a message naming the key
(``deepcluster.k: must be > 0, got 0``). Bad input fails *before any work starts*: the check stage,
first in the DAG, types every section and every method block.

Each section's schema lives beside the code that reads it (``SECTIONS``: ``voc`` in
``selfsup/detection/config.py``, ``linear`` in ``selfsup/eval/config.py``, ...) and is typed when
first read (``cfg.voc``), as a method block is.

Method blocks (``deepcluster:``, ``supervised:``, ...) are parsed with the config
class of the method file of the same name (``selfsup/methods/<name>.py``, imported by
name only when its block is parsed: this module imports no method, so a stage's import
closure, hence its DVC code deps, holds only the methods it runs). Adding a method
touches its own file, its params block and the ``methods`` list only.

``python -m selfsup.config [params.yaml]`` (``selfsup/config.py``) checks a params file without running anything.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re

import yaml


class ConfigError(ValueError):
    """A bad key or value in params.yaml (the message names the key)."""


# LibYAML's parser when PyYAML has it: parsing params.yaml and dvc.yaml in pure Python is a visible
# part of each stage's start (benchmarks/stage_overhead.py); the same documents, the same safe constructors
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ParamsLoader(SAFE_LOADER):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader, reading numbers in YAML 1.2 spellings too.

    PyYAML implements YAML 1.1, whose float pattern needs a dot (``1.0e-6``), so ``1e-6``, ``1e-06``
    and ``1E+12`` load as strings. DVC writes params with ruamel.yaml (YAML 1.2): ``dvc exp run -S
    moco.weight_decay=1e-6`` leaves ``1e-06`` in params.yaml. This resolver adds the YAML 1.2 core
    schema's exponent forms (with or without a dot); integers stay integers."""


_FLOAT_12 = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """Parse params-like YAML (params.yaml, a preset, a ``--set`` value) with ``ParamsLoader``."""
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 (a safe loader's subclass)


def unknown_key(key: str, name: str, known: typing.Iterable[str], extra: str = "",
                also: typing.Iterable[str] = ()) -> ConfigError:
    """The error for an unknown key ``name`` (full dotted ``key``): the closest of ``known`` and ``also``
    first when one is close (``checkpoint_minute`` -> ``checkpoint_minutes``), then every known key."""
    known = sorted(known)
    close = difflib.get_close_matches(name, [*known, *also], n=1, cutoff=0.75)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{key}: unknown key; {hint}known keys here: {', '.join(known)}{extra}")


NO_UPSTREAM = "data/dataset"  # the value of ``methods.<m>`` for a method that reads no upstream encoder


PRECISIONS = ("fp32", "bf16", "fp16")

# Each section of params.yaml -> its schema, "module:class", beside the code that reads it. A section
# is typed the first time it is read (``Config.section``), as a method block is parsed with its
# method's class: this module imports none of them, so a stage's import closure (its DVC code deps)
# holds the schemas of the sections it reads, which ``python -m selfsup.dag`` adds from the stage's
# params. The order is params.yaml's.
SECTIONS = {
    "dataset": "selfsup.data.config:DatasetCfg",
    "model": "selfsup.models.config:ModelCfg",
    "extract": "selfsup.models.config:ExtractCfg",
    "whiten": "selfsup.cluster.config:WhitenCfg",
    "cluster": "selfsup.cluster.config:ClusterCfg",
    "knn": "selfsup.eval.config:KnnCfg",
    "linear": "selfsup.eval.config:LinearCfg",
    "svm": "selfsup.eval.config:SvmCfg",
    "probe": "selfsup.eval.config:ProbeCfg",
    "finetune": "selfsup.eval.config:FinetuneCfg",
    "tokenizer": "selfsup.models.config:TokenizerCfg",
    "mlflow": "selfsup.core.tracking:MlflowCfg",
    "instdisc_table1": "selfsup.eval.config:InstDiscTable1Cfg",
    "voc": "selfsup.detection.config:VocCfg",
    "dist": "selfsup.core.launch:DistCfg",
    "report": "selfsup.report.config:ReportCfg",
}


def section_class(name: str) -> type:
    """The schema class of section ``name``, imported by name."""
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def section_file(name: str) -> str:
    """The repository-relative file that holds section ``name``'s schema."""
    return SECTIONS[name].split(":")[0].replace(".", "/") + ".py"


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # DataLoader workers decoding images: -1 = the cores available to this process for image
    # files, in-process (0) for memory-mapped arrays (a batch is one slice, cheaper than the
    # inter-process copy of worker processes). Results do not depend on it: every random
    # draw is seeded by (run seed, epoch, position), not by worker.
    workers: int = -1
    # the engine (selfsup/engine/loop.py): autocast precision (losses, softmax / log-sum-exp, Sinkhorn and
    # k-means stay fp32; fp16 adds a gradient scaler), channels_last memory format, torch.compile
    # of the backbone; logs are synced to the host every log_every optimiser steps (and the NaN
    # check runs there); a checkpoint every checkpoint_minutes (0: at every log sync) and at
    # every epoch end
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    log_every: int = 50
    checkpoint_minutes: float = 20.0
    # method name -> its upstream input, in report order. The value is a DVC dependency
    # of the pretrain stage (dvc.yaml, selfsup/dag.py): NO_UPSTREAM for none, else a
    # backbone file (another method's data/models/<m>.pt, or a local weights file) that
    # the method reads (MLCD clusters its features). A list means no upstream for all.
    methods: dict[str, str] = field(default_factory=dict)
    # section key -> its raw mapping from params.yaml until first read, then its typed object
    # (``section``); ``SECTIONS`` names each section's schema class
    sections: dict[str, Any] = field(default_factory=dict)
    # method name -> that method's config object (class registered by the method)
    method_cfgs: dict[str, Any] = field(default_factory=dict)

    def check(self, p: str = "") -> None:
        if not self.methods:
            raise ConfigError("methods: list at least one method")
        for m, up in self.methods.items():
            if not up:
                raise ConfigError(f"methods.{m}: empty upstream; use {NO_UPSTREAM} for none")
        self.training_order()  # an upstream cycle fails here, before any work
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.workers < -1:
            raise ConfigError(f"workers: -1 (auto) or >= 0, got {self.workers}")
        one_of("", "precision", self.precision, PRECISIONS)
        positive("", self, "log_every")
        non_negative("", self, "checkpoint_minutes")

    def upstream(self, name: str) -> str | None:
        """The upstream file method ``name`` reads, or None."""
        up = self.methods.get(name, NO_UPSTREAM)
        return None if up == NO_UPSTREAM else up

    def trained_upstream(self, name: str) -> str | None:
        """The method whose final encoder method ``name`` reads (``data/models/<u>.pt`` with ``u`` in
        ``methods``: its ``pretrain-<u>`` stage, a DVC dependency, runs first), or None."""
        up = self.upstream(name)
        for u in self.methods:
            if up is not None and Path(up) == Path("data/models") / f"{u}.pt":
                return u
        return None

    def training_order(self) -> list[str]:
        """The methods in the order ``stages/pretrain.py`` trains those it is given (DVC: one per stage): ``methods``' order, except that a
        method comes after the method whose encoder it reads (MLCD after DeepCluster)."""
        order: list[str] = []
        visiting: list[str] = []

        def visit(m: str) -> None:
            if m in order:
                return
            if m in visiting:
                cycle = " -> ".join([*visiting[visiting.index(m):], m])
                raise ConfigError(f"methods: the upstream encoders form a cycle ({cycle})")
            visiting.append(m)
            u = self.trained_upstream(m)
            if u is not None:
                visit(u)
            visiting.pop()
            order.append(m)

        for m in self.methods:
            visit(m)
        return order

    def table1_rows(self) -> dict[str, Any]:
        """The rows of InstDisc's Table 1 that the ``table1`` stage runs: none while the sweep is off
        (``selfsup.eval.config.table1_active``)."""
        return self.instdisc_table1.active_rows(self.methods)

    def method(self, name: str) -> Any:
        if name not in self.method_cfgs:
            raise ConfigError(f"methods: {name!r} has no params block")
        return self.method_cfgs[name]

    def __post_init__(self) -> None:
        self.sections = dict(self.sections)  # a copy (dataclasses.replace): parsing one leaves the other

    def __getattr__(self, name: str) -> Any:
        # only reached for names that are not attributes: the sections (cfg.voc, cfg.linear, ...)
        if name in SECTIONS and "sections" in self.__dict__:
            return self.section(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SECTIONS:  # cfg.voc = VocCfg(...): a typed section, kept as given
            self.__dict__.setdefault("sections", {})[name] = value
        else:
            super().__setattr__(name, value)

    def section(self, name: str) -> Any:
        """Section ``name`` typed: built from its raw mapping with its schema class the first time it is
        read (a bad key fails then, naming it), then kept. A schema may check itself against the
        whole config (``check_with``: e.g. ``finetune.head_layers`` against ``methods``)."""
        obj = self.sections.get(name)
        if not dataclasses.is_dataclass(obj):  # raw: a mapping, or None for an empty or absent block
            obj = build(section_class(name), obj, name)
            if hasattr(obj, "check_with"):
                obj.check_with(name, self)
            self.sections[name] = obj
        return obj

    def parse_sections(self) -> Config:
        """Every section typed now (the check stage, ``python -m selfsup.config``)."""
        for name in SECTIONS:
            self.section(name)
        return self

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` (top-level keys or whole sections)."""
        top = {k: v for k, v in changes.items() if k not in SECTIONS}
        new = dataclasses.replace(self, **top)
        for k, v in changes.items():
            if k in SECTIONS:
                setattr(new, k, v)
        return new

    def to_dict(self) -> dict[str, Any]:
        """Every key, the sections typed (defaults filled in), in params.yaml's order."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
             if f.name not in ("sections", "method_cfgs")}
        for name in SECTIONS:
            d[name] = dataclasses.asdict(self.section(name))
        for name, mcfg in self.method_cfgs.items():  # a block not parsed stays its raw mapping
            d[name] = dataclasses.asdict(mcfg) if dataclasses.is_dataclass(mcfg) else copy.deepcopy(mcfg)
        return d


# --------------------------------------------------------------------------- checks
def _key(p: str, name: str) -> str:
    return f"{p}.{name}" if p else name


def positive(p: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise ConfigError(f"{_key(p, n)}: must be > 0, got {v}")


def non_negative(p: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v < 0:
            raise ConfigError(f"{_key(p, n)}: must be >= 0, got {v}")


def check_lr_steps(p: str, steps: list[int], factors: list[float], what: str) -> None:
    """A step schedule's milestones (increasing, > 0; ``what`` names their unit) and its absolute factors
    (one per milestone, > 0; empty: x0.1 per milestone), for the training and the probe schedules."""
    if any(not 0 < e for e in steps) or steps != sorted(steps):
        raise ConfigError(f"{p}.lr_steps: need increasing positive {what}, got {steps}")
    if factors and len(factors) != len(steps):
        raise ConfigError(f"{p}.lr_factors: one factor per lr_steps entry ({len(steps)}), got {factors}")
    if any(f <= 0 for f in factors):
        raise ConfigError(f"{p}.lr_factors: factors must be > 0, got {factors}")


def one_of(p: str, name: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{_key(p, name)}: unknown value {value!r}; choose one of {', '.join(allowed)}")


# --------------------------------------------------------------------------- parsing
def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(key, key_tp, k): _coerce(f"{key}.{k}", item_tp, v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in ("method_cfgs", "sections")}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise unknown_key(_key(prefix, unknown[0]), str(unknown[0]), names)
    kwargs = {k: _coerce(_key(prefix, k), hints[k], v) for k, v in data.items()}
    obj = cls(**kwargs)
    obj.check(prefix)
    return obj


def method_class(name: str) -> Any:
    """The class of method ``name``, imported by name (``selfsup/methods/<name>.py``): a dynamic
    import, so this module's import closure holds no method."""
    registry = importlib.import_module("selfsup.methods").REGISTRY
    return registry[name]


def method_names() -> list[str]:
    """Names of the method files (without importing them), and of methods registered in code
    when the registry is already loaded (tests register throwaway methods)."""
    names = {p.stem for p in (Path(__file__).resolve().parents[1] / "methods").glob("*.py")
             if p.stem not in ("__init__", "base")}
    loaded = sys.modules.get("selfsup.methods")
    if loaded is not None:
        names |= set(loaded.REGISTRY)
    return sorted(names)


def load_config(source: str | Path | dict = "params.yaml", parse_methods: bool | list[str] = True) -> Config:
    """Parse and validate params.yaml (or a dict of the same shape).

    ``parse_methods``: True parses every section and every method block (importing those methods);
    a list parses only the blocks of those methods (a training stage: its own); False parses none
    (the evaluation stages, which never read them, and skip importing torch). Unparsed blocks stay
    plain dicts; an unparsed section is typed when first read (``Config.section``). The first stage (download) parses everything, so a bad method key fails before
    any work; ``python -m selfsup.config`` does the same check alone.
    """
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: params file not found")
        raw = load_yaml(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    ms = raw.get("methods")
    if isinstance(ms, list):  # programmatic shorthand: no upstream for any method
        if len(set(map(str, ms))) != len(ms):
            raise ConfigError(f"methods: duplicate names in {ms}")
        raw["methods"] = {m: NO_UPSTREAM for m in ms}
    known = {f.name for f in dataclasses.fields(Config)} - {"method_cfgs", "sections"} | set(SECTIONS)
    names = set(method_names())
    for k in raw:
        if k not in known and k not in names:
            raise unknown_key(str(k), str(k), known,
                              f"; or a method block ({', '.join(sorted(names))})", also=names)
    for name in raw.get("methods", {}) or {}:
        if not isinstance(name, str) or name not in names:
            raise ConfigError(f"methods: unknown method {name!r}; known: {', '.join(sorted(names))}")
    if isinstance(raw.get("model"), dict) and "sobel" in raw["model"]:
        raise ConfigError("model.sobel: the Sobel front end is set per method now (<method>.sobel: DeepCluster's "
                          "code on, SeLa's off); move it into the method blocks")
    blocks = {k: raw.pop(k) for k in list(raw) if k not in known}
    sections = {k: raw.pop(k) for k in list(raw) if k in SECTIONS}
    cfg = build(Config, raw)
    cfg.sections.update(sections)  # typed when first read; all of them now when every block is parsed
    if parse_methods is True:
        cfg.parse_sections()
    if parse_methods is False:
        cfg.method_cfgs.update(blocks)
        return cfg
    todo = set(cfg.methods) | set(blocks) if parse_methods is True else set(parse_methods)
    for name in sorted(todo):
        if name not in names:
            raise ConfigError(f"methods: unknown method {name!r}; known: {', '.join(sorted(names))}")
        cls = method_class(name)
        up = cfg.methods.get(name, NO_UPSTREAM)
        if up != NO_UPSTREAM and not cls.uses_upstream:
            raise ConfigError(f"methods.{name}: {name} reads no upstream encoder; set it to {NO_UPSTREAM}")
        cfg.method_cfgs[name] = build(cls.Config, blocks.pop(name, {}), name)  # no block: the defaults
    cfg.method_cfgs.update(blocks)  # blocks not asked for stay plain dicts
    return cfg


def config_hash(obj: Any) -> str:
    """Stable short hash of a (nested) config / JSON-able value."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

