"""JobSpec (a job file), and what every config file shares: typed, loaded once from YAML, validated with
path-precise errors. The cluster side (ClusterConfig) is orchestrator/cluster_config.py.

Every default lives here (orchestrator side) or in trainer/config.py (the recipe). A problem is
reported as ONE sentence `FILE: KEY.PATH: what is wrong; what to do`, raised as ConfigError,
before anything is created on disk or submitted.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.sweep import MAX_SEEDS, TARGET_VAL_LOSS

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(Exception):
    """One clear sentence naming the file, the key and the fix. The CLI exits 2 on it."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- job


class DataSpec(Strict):
    source: str = Field(description="directory, http(s)://, hf://datasets/..., s3://..., or synthetic://...")
    train_shards: int | None = Field(None, ge=1, description="how many train shards to stage; None = all")
    val_shards: int = Field(1, ge=0)
    dir: str | None = Field(None, description="node-local directory for shards; default: the cluster's data_dir")

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else "file"
        if scheme not in ("file", "http", "https", "hf", "s3", "synthetic"):
            raise ValueError(f"unknown source scheme {scheme!r}; use a directory, http(s)://, hf://, s3:// or synthetic://")
        return v


class CheckpointSpec(Strict):
    every: int = Field(0, ge=0, description="save every K steps (0: only the final one)")
    final: bool = True
    keep_last: int = Field(2, ge=1, description="checkpoints kept in the store per seed")


class OfflineSpec(Strict):
    """What the script fetches from the internet at run time, pre-fetched on the launching machine
    (`speedrun prefetch JOB`) and restored on nodes that have no internet."""

    hf_kernels: list[str] = Field(default_factory=list,
                                  description="Hugging Face hub repos the script loads with kernels.get_kernel: "
                                  "owner/name (its main revision) or owner/name@REV (a branch or tag: @v1 for "
                                  "get_kernel(..., version=1))")
    hf_variants: list[str] = Field(default_factory=list, description="only these build/<variant>/ folders of the hub "
                                   "repos (the nodes' torch/CUDA, e.g. torch211-cxx11-cu130-x86_64-linux); empty: all")
    tiktoken: list[str] = Field(default_factory=list, description="tiktoken encodings the script loads, e.g. gpt2")
    cache: str = Field("~/.cache/speedrun/offline",
                       description="launcher-side folder holding them: hf/ (an HF_HOME) and tiktoken/")

    @field_validator("hf_kernels")
    @classmethod
    def _repo_ids(cls, v: list[str]) -> list[str]:
        for repo in v:
            if not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?", repo):
                raise ValueError(f"{repo!r} is not a hub repo id; write it as owner/name, e.g. kernels-community/flash-attn3, "
                                 "or owner/name@v1 for a script's get_kernel(..., version=1)")
        return v


class JobSpec(Strict):
    name: str
    seeds: int = Field(1, ge=1, le=MAX_SEEDS)
    seed_base: int = Field(0, ge=0, description="seeds run as seed_base .. seed_base+seeds-1")
    data: DataSpec
    trainer: dict[str, Any] = Field(default_factory=dict, description="overrides of trainer.config.TrainConfig")
    script: str | None = Field(None, description="an external modded-nanogpt style train_gpt.py instead of our "
                               "trainer; inside workdir when one is given, else the one file shipped")
    workdir: str | None = Field(None, description="a folder shipped whole (honouring .gitignore) as the script's "
                                "working directory")
    # a record folder is a few scripts; 100 MB of it is a stray dataset or checkpoint
    workdir_max_mb: float = Field(100.0, gt=0, description="refuse a workdir that ships more than this")
    script_dirs: list[str] = Field(["logs/final"], description="folders made in the script's working directory "
                                   "before it starts (records write logs/final/<uuid>.txt)")
    offline: OfflineSpec | None = None
    script_args: list[str] = Field(default_factory=list)
    target_loss: float = Field(TARGET_VAL_LOSS, description="val loss that stats/report/compare test against")
    retries: int = Field(0, ge=0, description="re-submit a failed seed this many times")
    seed_time_limit_min: float | None = Field(
        None, gt=0, description="stop a seed's trainer or script after this many minutes (SIGTERM, SIGKILL 30 s "
        "later); the seed is failed, not retried, and the sweep goes on with the next")
    store: str | None = Field(None, description="object store URL; default: the cluster's store")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    env: dict[str, str] = Field(default_factory=dict)
    log_sync_seconds: float = Field(30.0, gt=0, description="upload the growing train.log this often")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be lower-case letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit")
        return v

    @field_validator("script_dirs")
    @classmethod
    def _relative_dirs(cls, v: list[str]) -> list[str]:
        for d in v:
            if Path(d).is_absolute() or ".." in Path(d).parts or not d.strip():
                raise ValueError(f"{d!r} must be a folder inside the script's working directory, e.g. logs/final")
        return v


# -------------------------------------------------------------------------------------- loading


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a {what} file; give the YAML file's path")
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file; check the path")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); give the {what} YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e}); check that it is a readable file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, not a {type(data).__name__}")
    return data


def _fields_of(model: type[BaseModel], loc: tuple) -> list[str]:
    """The key names allowed at `loc` inside `model`, for 'did you mean' hints."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        f = cur.model_fields.get(part)
        if f is None:
            return []
        ann = f.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
        cur = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def override_source(overrides: list[str], key: list[str] | tuple, prefix: tuple[str, ...] = ()) -> str | None:
    """`--set K=V` when an override set this key (or a section above it, or a key inside it), else None."""
    key = tuple(str(k) for k in key)
    for o in reversed(overrides):   # the last --set of a key wins, so it is the one to blame
        parts = tuple(parse_override(o)[0])
        if parts[:len(prefix)] != prefix:
            continue
        parts = parts[len(prefix):]
        n = min(len(parts), len(key))
        if n and parts[:n] == key[:n]:
            return f"--set {o}"
    return None


def explain_error(e: ValidationError, path: Path, model: type[BaseModel], source: Any = None) -> ConfigError:
    """One sentence for pydantic's first error; `source(loc)` names a --set that gave the key, if any."""
    err = e.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    given = source(loc) if source else None
    if given:   # the value came from the command line: blame it, not the file
        path = f"{given} (on {path})"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_of(model, loc), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; remove it"
        return ConfigError(f"{path}: {key}: unknown key{hint}")
    if err["type"] == "missing":
        return ConfigError(f"{path}: {key}: required key is missing; add it")
    msg = err["msg"].removeprefix("Value error, ")
    for words, sign in (("greater than or equal to", ">="), ("less than or equal to", "<="), ("greater than", ">"),
                        ("less than", "<")):
        msg = msg.replace(f"Input should be {words}", f"must be {sign}")
    msg = msg.replace("Input should be", "must be")
    return ConfigError(f"{path}: {key}: {msg} (got {err.get('input')!r})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.steps=50` -> (['trainer', 'steps'], 50); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY.PATH=VALUE, e.g. --set trainer.steps=50")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text}: empty key; use KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def validate_trainer_overrides(overrides: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check `trainer:` keys against trainer.config.TrainConfig (names and scalar types)."""
    from trainer.config import TrainConfig  # pure dataclass: importing it does not import torch

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see trainer/config.py for the keys"
            raise ConfigError(f"{path}: trainer.{k}: unknown key{hint}")
        want = hints[k]
        base = [a for a in typing.get_args(want) if a is not type(None)] or [want]
        ok = any(
            (t is float and isinstance(v, (int, float)) and not isinstance(v, bool))
            or (t is int and isinstance(v, int) and not isinstance(v, bool))
            or (t is bool and isinstance(v, bool))
            or (t is str and isinstance(v, (str, int)) and not isinstance(v, bool))   # `--set ...layers=7` reads as 7
            or (typing.get_origin(t) in (tuple, list) and isinstance(v, (list, tuple)))
            for t in base
        ) or (v is None and type(None) in typing.get_args(want))
        if not ok:
            names = "/".join(getattr(t, "__name__", str(t)) for t in base)
            raise ConfigError(f"{path}: trainer.{k}: must be {names} (got {v!r})")
        out[k] = float(v) if base[0] is float and isinstance(v, int) else str(v) if base[0] is str else v
    merged = TrainConfig(**out)
    try:
        merged.validate()
    except ValueError as e:
        raise ConfigError(f"{path}: trainer.{e}") from None
    return out


def _check_job_key(o: str, first: str) -> None:
    """A --set whose first key is not a job key: a cluster key missing its `cluster.`, or a typo."""
    if first in JobSpec.model_fields:
        return
    from orchestrator.cluster_config import ClusterConfig   # it imports this module

    if first in ClusterConfig.model_fields:
        raise ConfigError(f"--set {o}: {first} is a cluster key, not a job key; write --set cluster.{o.strip()}")
    close = difflib.get_close_matches(first, [*JobSpec.model_fields, "cluster"], n=1)
    hint = f"did you mean '{close[0]}'?" if close else "job keys are listed in jobs/*.yaml, cluster keys take 'cluster.'"
    raise ConfigError(f"--set {o}: {first} is neither a job key nor cluster.<key>; {hint}")


def load_job(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    path = Path(path)
    data = read_yaml(path, "job")
    overrides = list(overrides)
    for o in overrides:
        parts, value = parse_override(o)
        if parts[0] == "cluster":
            continue  # applied to the cluster config
        _check_job_key(o, parts[0])
        apply_override(data, parts, value)
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as e:
        raise explain_error(e, path, JobSpec, lambda loc: override_source(overrides, loc)) from None
    try:
        job.trainer = validate_trainer_overrides(job.trainer, path)
    except ConfigError as e:
        rest = str(e).removeprefix(f"{path}: ")   # `trainer.KEY: what is wrong`
        given = override_source(overrides, rest.split(":", 1)[0].split("."))
        if given:
            raise ConfigError(f"{given} (on {path}): {rest}") from None
        raise
    resolve_job_paths(job, path)
    return job


def _against(base: Path, p: str) -> str:
    """p as an absolute path, a relative one read from base (the job file's folder); ~ and $VARS expanded."""
    q = expand(p)
    return os.path.normpath(q if q.is_absolute() else base / q)


def resolve_job_paths(job: JobSpec, path: Path) -> None:
    """Every path of a job file, once: relative ones are read from the job file's folder, whoever launches
    from wherever; `script:` is read from `workdir:` when the job has one. Checks the files exist."""
    base = path.parent.absolute()
    if "://" not in job.data.source:
        job.data.source = _against(base, job.data.source)
    if job.data.dir is not None:
        job.data.dir = _against(base, job.data.dir)
    if job.offline is not None:
        job.offline.cache = _against(base, job.offline.cache)
    if job.trainer.get("vocab_file"):   # the trainer's one path: the GPT-2 vocabulary of the prefix-token loss
        job.trainer["vocab_file"] = _against(base, str(job.trainer["vocab_file"]))
        if not Path(job.trainer["vocab_file"]).exists():
            raise ConfigError(f"{path}: trainer.vocab_file: {job.trainer['vocab_file']} does not exist; give an "
                              "r50k_base.tiktoken or a folder with vocab.bpe and encoder.json (relative paths are "
                              "read from the job file's folder)")
    if job.workdir is not None:
        if job.script is None:
            raise ConfigError(f"{path}: workdir: needs script: the entry script inside it, e.g. script: train_gpt.py")
        job.workdir = _against(base, job.workdir)
        if not Path(job.workdir).is_dir():
            raise ConfigError(f"{path}: workdir: {job.workdir} is not a folder; give the folder of your train_gpt.py")
        entry = Path(job.script)
        inside = (Path(job.workdir) / entry).resolve()
        if entry.is_absolute() or not inside.is_relative_to(Path(job.workdir).resolve()):
            raise ConfigError(f"{path}: script: {job.script} is not inside workdir {job.workdir}; give the entry "
                              "script's path relative to the workdir, e.g. script: train_gpt.py")
        if not inside.is_file():
            raise ConfigError(f"{path}: script: {inside} does not exist; give the entry script's path inside the workdir")
        job.script = entry.as_posix()
    elif job.script is not None:
        job.script = _against(base, job.script)
        if not Path(job.script).is_file():
            raise ConfigError(f"{path}: script: {job.script} does not exist; give a path to a train_gpt.py "
                              "(relative paths are read from the job file's folder)")


# ------------------------------------------------------------------------------ side-effect checks


def expand(p: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(p)))


def check_writable_dir(p: Path, what: str, key: str) -> None:
    """Would creating/writing p succeed? Checked on the nearest existing ancestor; creates nothing."""
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}: {p} is a file, not a directory; point {what} at a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {p} is not writable; choose a {what} you can write to")
        return
    anc = p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot create {p} ({anc} is not writable); choose a {what} you can write to")


def check_store_url(url: str, key: str = "store") -> str:
    """Reject store URLs that escape their root; for a local store, check it can be written."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", url
    if scheme not in ("file", "s3"):
        raise ConfigError(f"{key}: unknown store scheme {scheme!r} in {url!r}; use a directory, file:// or s3://bucket/prefix")
    segments = rest.replace("\\", "/").split("/")
    if ".." in segments:
        raise ConfigError(f"{key}: {url!r} escapes its root with '..'; give the store directory or prefix without '..'")
    if any(ord(c) < 32 for c in url):
        raise ConfigError(f"{key}: {url!r} contains control characters; remove them")
    if scheme == "file":
        check_writable_dir(expand(rest).absolute(), "store", key)
    elif not rest.split("/", 1)[0]:
        raise ConfigError(f"{key}: {url!r} names no bucket; use s3://bucket/prefix")
    return url
