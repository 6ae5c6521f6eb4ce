"""Hugging Face-format model folders made offline from the registry's GGUF files, for vLLM.

vLLM wants a folder with config.json, weights and a tokenizer; our models ship as GGUF inside pip
packages (models.py) and nothing may be downloaded. transformers reads a GGUF (weights dequantized,
tokenizer and chat template from its metadata) and `save_pretrained` writes such a folder: done once
per model into `$RELED_HPC_CACHE/models/hf/<name>/` by scripts/setup_vllm.sh.

The conversion runs in the vLLM environment (.venv-vllm: transformers, gguf and torch come with
vLLM), as a script given paths, so this module imports nothing of reled_hpc at module level:

    .venv-vllm/bin/python reled_hpc/llm/hf_model.py convert MODEL.gguf OUT_DIR
    .venv-vllm/bin/python reled_hpc/llm/hf_model.py check OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

STAMP = "reled-converted.json"  # written last: a folder without it is incomplete
PROBE = "def plan(api):\n    return {}  # routes: é ✓"  # non-ASCII: byte-level BPE must round-trip it


def hf_model_dir(name: str, cache: Path | None = None) -> Path:
    """The converted folder of registry model `name` (it may not exist yet)."""
    from .models import cache_root  # lazy: the convert script runs outside the package

    return (cache if cache is not None else cache_root()) / "hf" / name


def is_converted(folder: Path) -> bool:
    return (folder / STAMP).is_file() and (folder / "config.json").is_file()


def convert(gguf: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Write the HF folder of `gguf` at `out` (atomically: a temp folder renamed at the end)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True: plain dense weights (transformers 5 otherwise keeps GGUF blocks, which it
        # refuses to save); then the model is an ordinary one and loses its quantizer
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(dequantize=True),
        )
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        st = gguf.stat()
        info = {"gguf": str(gguf), "gguf_size": st.st_size, "dtype": dtype, "seconds": round(time.monotonic() - t0, 1)}
        (tmp / STAMP).write_text(json.dumps(info, indent=2))
        check(tmp)
        if out.exists():  # a stale or incomplete folder
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check(folder: Path) -> dict[str, object]:
    """Raise unless `folder` is a usable HF model folder: config, weights, a chat template and a
    tokenizer that round-trips text. Reads no weights into memory."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        raise RuntimeError(f"{folder}: no *.safetensors weights")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok.encode(PROBE, add_special_tokens=False)
    back = tok.decode(ids)
    if back != PROBE:
        raise RuntimeError(f"{folder}: the tokenizer does not round-trip: {PROBE!r} -> {ids} -> {back!r}")
    if not tok.chat_template:
        raise RuntimeError(f"{folder}: the tokenizer has no chat template (vLLM's /v1/chat/completions needs one)")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    return {
        "model_type": cfg.model_type,
        "vocab": len(tok),
        "weights_bytes": sum(w.stat().st_size for w in weights),
        "chat_prompt_chars": len(chat),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hf_model.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="GGUF -> HF folder (no download)")
    c.add_argument("gguf", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--dtype", default="bfloat16")
    k = sub.add_parser("check", help="check a converted folder")
    k.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    # offline, whatever the environment says: every file is local
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.cmd == "convert":
        out = convert(args.gguf, args.out, args.dtype)
        print(json.dumps({"folder": str(out), **check(out)}))
    else:
        if not (args.folder / STAMP).is_file():
            print(f"error: {args.folder} has no {STAMP} (not converted, or not to the end)", file=sys.stderr)
            return 1
        print(json.dumps({"folder": str(args.folder), **check(args.folder)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
