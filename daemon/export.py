"""``everlearn export``: a checkpoint's model as a ``save_pretrained`` directory other tools load.

Full fine-tuning writes the model; a LoRA checkpoint writes the peft adapter
directory (``PeftModel.from_pretrained(base, DIR)`` loads it), or with
``--merged`` the base with the adapter merged in, a plain model directory.
The tokenizer is saved beside it and ``everlearn.json`` says where it came
from (checkpoint, step, manifest sha256, base). The directory appears whole
or not at all: it is written beside the target, then renamed.
"""

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from everlearn.daemon.config import Config
from everlearn.errors import CheckpointError, ConfigError
from everlearn.learners import CheckpointRef, CheckpointStore, Models, build_tokenizer
from everlearn.learners.checkpoints import step_name
from everlearn.learners.weights import is_lora

SERVED = "SERVED.json"


def resolve(cfg: Config, which: str) -> tuple[CheckpointRef, dict[str, Any]]:
    """The checkpoint ``which`` names: a step number, ``latest`` (newest verified) or ``served`` (SERVED.json's)."""
    store = CheckpointStore(cfg.checkpoint_url, cfg.checkpoint.storage_options)
    if which == "served":
        try:
            record = json.loads(store.read_root(SERVED))
        except FileNotFoundError as e:
            raise CheckpointError(f"no {SERVED} in {store.url}: nothing was served yet; export a step instead") from e
        if not record.get("uri"):
            raise CheckpointError("the served version is the untrained initial model, which has no checkpoint; export a step instead")
        return CheckpointRef.from_dict(record), {"version": record.get("version")}
    if which == "latest":
        ref = store.latest()
        if ref is None:
            raise CheckpointError(f"no checkpoint in {store.url} verifies")
        return ref, {}
    try:
        step = int(which)
    except ValueError as e:
        raise ConfigError(f"STEP must be a step number, latest or served; got {which!r}") from e
    try:
        return store.ref(step_name(step)), {}
    except CheckpointError as e:
        steps = [r.step for r in store.list()]
        raise CheckpointError(f"no committed checkpoint of step {step} in {store.url}; committed steps: {steps[-20:]}") from e


def export(cfg: Config, which: str, out: Path, merged: bool = False, force: bool = False) -> dict[str, Any]:
    """Write checkpoint ``which``'s model (and tokenizer) into ``out``; returns what was written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; choose a new directory or pass --force to replace it")
    ref, extra = resolve(cfg, which)
    tokenizer = build_tokenizer(cfg.model)
    models = Models(cfg.model, tokenizer)
    model = models.load(CheckpointStore(ref.store_url, cfg.checkpoint.storage_options), ref)
    kind = "full"
    if is_lora(model):
        if merged:
            model = copy.deepcopy(model).merge_and_unload()  # a copy: the adapter model shares the base's tensors
            kind = "merged"
        else:
            kind = "adapter"
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.hf.save_pretrained(tmp)
    info = {"kind": kind, "checkpoint": ref.uri, "step": ref.step, "manifest_sha256": ref.manifest_sha256, **extra,
            "base": models.identity if kind != "full" else None}
    (tmp / "everlearn.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {**info, "directory": str(out)}
