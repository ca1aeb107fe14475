"""Model and tokenizer resolution: 'tiny-teacher' / 'tiny-student' -> a built local folder, a local path ->
itself, 'OWNER/NAME' -> a hub id that transformers or vLLM download on the cluster.

Tiny models are built on first use and cached under `models_home()`. Several processes may ask at once
(torchrun ranks, a test and the CLI): the build runs under an exclusive file lock, writes into a temporary
folder and moves it into place with one rename; the marker file holding RECIPE_VERSION is written last, so
a folder with the current marker is always complete.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
from pathlib import Path

from common import tiny_models
from common.errors import UserError

# 'Qwen/Qwen3-Coder-Next': an owner and a name, no path syntax.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_DTYPES = ("bfloat16", "float16", "float32")


def _is_current(folder: Path) -> bool:
    marker = folder / tiny_models.MARKER_FILE
    return marker.is_file() and marker.read_text().strip() == tiny_models.recipe_version(folder.name)


def _build_tiny(name: str, force: bool) -> Path:
    """The folder of tiny model `name`, (re)built under the lock if missing, stale or `force`d."""
    home = tiny_models.models_home()
    folder = home / name
    if _is_current(folder) and not force:
        return folder
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        # Another process may have finished the build while this one waited for the lock.
        if _is_current(folder) and not force:
            return folder
        staging = home / f".{name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        print(f"building {name} into {folder} (once; cached afterwards)", file=sys.stderr, flush=True)
        try:
            tiny_models.write_tiny_model(name, staging)
            (staging / tiny_models.MARKER_FILE).write_text(tiny_models.recipe_version(name) + "\n")
            if folder.exists():  # a stale or forced-out build: os.replace cannot overwrite a non-empty folder
                retired = home / f".{name}.retired-{os.getpid()}"
                os.replace(folder, retired)
                shutil.rmtree(retired)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve_model(name: str, revision: str | None = None) -> str:
    """A model reference as transformers / vLLM take it: a local folder (tiny models built if needed) or a hub id.

    'tiny-teacher' / 'tiny-student' -> their folder under models_home(); an existing local path -> itself
    (absolute); 'OWNER/NAME' -> returned unchanged (the caller passes `revision` to the loader). A revision
    for a local model is refused: it would silently mean nothing.
    """
    if name in tiny_models.TINY_NAMES or name in tiny_models.LAZY_NAMES:
        path = _build_tiny(name, force=False)
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser().resolve()
    elif _HUB_ID.fullmatch(name):
        return name
    else:
        tiny = ", ".join(tiny_models.TINY_NAMES + tiny_models.LAZY_NAMES)
        raise UserError(f"model '{name}': no such local path, and not a hub id (OWNER/NAME) or one of {tiny}")
    if revision is not None:
        raise UserError(f"model '{name}': revision '{revision}' given, but the model is local ({path})")
    return str(path)


def build_tiny_models(force: bool = False) -> dict[str, str]:
    """Build (or find cached) both tiny models; `force` rebuilds them. Returns name -> folder."""
    return {name: str(_build_tiny(name, force=force)) for name in tiny_models.TINY_NAMES}


_TOKENIZERS: dict[tuple, object] = {}
"""Tokenizers loaded by this process, by (source, revision, trust_remote_code, the folder's files and mtimes)."""


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer; it must carry a chat template (trajectories are rendered with it).

    Loaded once per process and source (about 1 s for the 151,936-id Qwen vocabulary, most of it in
    transformers' own parsing and copying; stage 1 and stage 2 each need it in several places). Each call
    returns a shallow copy: reassigning an attribute (`tok.chat_template = ...`) leaves the cached one alone;
    the Rust tokenizer underneath is shared and must not be changed (nothing here adds tokens). A local
    folder rewritten since (a rebuilt tiny model) is loaded again."""
    import copy

    from transformers import AutoTokenizer

    source = resolve_model(name, revision)
    folder = Path(source)
    files = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in folder.iterdir())) if folder.is_dir() else ()
    key = (source, revision, trust_remote_code, files)
    if key not in _TOKENIZERS:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as e:  # not on disk and no hub access, or not a model folder
            raise UserError(f"model '{name}': cannot load its tokenizer from {source}: {str(e).splitlines()[0]}") from e
        if not tokenizer.chat_template:
            raise UserError(f"model '{name}': its tokenizer ({source}) has no chat template")
        _TOKENIZERS[key] = tokenizer
    return copy.copy(_TOKENIZERS[key])


def load_causal_lm(
    name: str,
    dtype: str = "bfloat16",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
):
    """The model as an `AutoModelForCausalLM` in eval mode, on `device`, weights in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise UserError(f"model '{name}': dtype '{dtype}' is not one of {', '.join(_DTYPES)}")
    source = resolve_model(name, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise UserError(f"model '{name}': cannot load it from {source}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


def build_on_meta(name: str, dtype: str = "bfloat16", revision: str | None = None, trust_remote_code: bool = False):
    """The model's architecture on the meta device (shapes and dtypes, no storage), in eval mode; reads only
    its config, never the weight files. For ranks that receive the weights from another (stage 2's rank 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise UserError(f"model '{name}': dtype '{dtype}' is not one of {', '.join(_DTYPES)}")
    source = resolve_model(name, revision)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"model '{name}': cannot load its config from {source}: {str(e).splitlines()[0]}") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    return model.eval()
