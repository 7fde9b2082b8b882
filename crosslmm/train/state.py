"""Training checkpoints: written atomically, read without unpickling anything.

A checkpoint holds what an exact resume needs and nothing else: the trainable
parameters (frozen ones never change, the base checkpoint has them), the optimizer and
scheduler state, every random generator and the data position. Tensors go to
safetensors, everything else to JSON; nothing is ever read with pickle, so a checkpoint
from elsewhere cannot execute code.

Under FSDP (`distributed.strategy: fsdp`) every process writes its own shard of the
trainable parameters and of the optimizer state (`trainable-rank{r}.safetensors`,
`optimizer-rank{r}.*`): nothing is gathered, so a 7B checkpoint costs each process only
its 1/N. Resuming needs the same number of processes, which the trainer requires anyway
(the data position is counted in the same global layout). `sharding.json` says which
layout a folder holds. torch.distributed.checkpoint would also reshard, but its metadata
file is a pickle, and resuming must never unpickle.

Atomicity: a checkpoint is written into a temporary sibling folder, flushed, then renamed
into place; `latest` is a one-line file replaced atomically after the rename. A crash at
any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2), or the tensor itself, on the CPU."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.detach().contiguous().cpu()


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars, sharded = {}, {}, []
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = _local(value)
                if hasattr(value, "to_local"):
                    sharded.append(f"{index}.{name}")
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "sharded": sharded}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, params: list[torch.Tensor]) -> dict:
    """The optimizer state dict; shards saved from DTensors become DTensors laid out like
    their parameter again (`params` in the optimizer's order)."""
    from_shard = set(meta.get("sharded", ()))
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        if key in from_shard:
            param = params[int(index)]
            value = type(param).from_local(value.to(param.device), param.device_mesh, param.placements,
                                           run_check=False, shape=param.shape, stride=param.stride())
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, python_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), python_gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = meta["python"]
    random.setstate((version, tuple(internal), python_gauss))


def save_checkpoint(
    folder: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    progress: dict,
    recipe_yaml: str,
    rank: int = 0,
    is_main: bool = True,
    barrier=lambda: None,
    world_size: int = 1,
    sharded: bool = False,
) -> None:
    """Write a checkpoint folder atomically. Every rank writes its own random state (and,
    `sharded`, its shards of the weights and optimizer); the main process writes the rest
    and renames."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, tmp / f"rng-rank{rank}.safetensors")
    _write_json(tmp / f"rng-rank{rank}.json", rng_meta)
    if sharded or is_main:
        suffix = f"-rank{rank}" if sharded else ""
        save_file({k: _local(v) for k, v in trainable.items()}, tmp / f"trainable{suffix}.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / f"optimizer{suffix}.safetensors")
        _write_json(tmp / f"optimizer{suffix}.json", opt_meta)
    if is_main:
        _write_json(tmp / "sharding.json", {"sharded": sharded, "world_size": world_size})
        _write_json(tmp / "scheduler.json", {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"})
        _write_json(tmp / "progress.json", progress)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
    barrier()
    if is_main:
        for path in tmp.iterdir():
            _fsync(path)
        # Re-saving a step (after resuming from an older checkpoint): move the old folder
        # aside first, so a crash leaves one complete copy under one of the two names.
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
        write_atomically(folder.parent / LATEST, folder.name + "\n")
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer, scheduler, rank: int = 0,
                    world_size: int = 1, sharded: bool = False) -> dict:
    """Restore a checkpoint written by `save_checkpoint`; returns its progress dict."""
    folder = Path(folder)
    layout_file = folder / "sharding.json"
    layout = json.loads(layout_file.read_text()) if layout_file.is_file() else {"sharded": False}
    if layout["sharded"] != sharded or (sharded and layout["world_size"] != world_size):
        saved = f"sharded over {layout['world_size']} processes" if layout["sharded"] else "unsharded"
        wanted = f"sharded over {world_size}" if sharded else "unsharded"
        raise ValueError(f"{folder} holds a {saved} checkpoint; this run is {wanted} (distributed.strategy and the "
                         "process count must match the run that wrote it)")
    suffix = f"-rank{rank}" if sharded else ""
    trainable = load_file(folder / f"trainable{suffix}.safetensors")
    params = dict(model.named_parameters())
    unknown = [k for k in trainable if k not in params]
    if unknown:
        raise ValueError(f"{folder} holds parameters this model does not have: {unknown[:5]}")
    absent = [k for k, p in params.items() if p.requires_grad and k not in trainable]
    if absent:
        raise ValueError(f"{folder} lacks trainable parameters of this recipe: {absent[:5]}")
    with torch.no_grad():
        for name, value in trainable.items():
            param = params[name]
            target = param.to_local() if hasattr(param, "to_local") else param
            if target.shape != value.shape:
                raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, this process expects "
                                 f"{tuple(target.shape)}")
            target.copy_(value)
    meta = json.loads((folder / f"optimizer{suffix}.json").read_text())
    tensors = load_file(folder / f"optimizer{suffix}.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta, _optimizer_params(optimizer)))
    scheduler_state = json.loads((folder / "scheduler.json").read_text())
    scheduler.load_state_dict({**scheduler.state_dict(), **scheduler_state})
    rng_file = folder / f"rng-rank{rank}.safetensors"
    if not rng_file.exists():
        raise ValueError(f"{rng_file} is missing: the checkpoint was written by fewer processes than this run has")
    _set_rng_state(load_file(rng_file), json.loads((folder / f"rng-rank{rank}.json").read_text()))
    return json.loads((folder / "progress.json").read_text())


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint folder `checkpoints/latest` names, or None before the first one."""
    pointer = Path(checkpoints) / LATEST
    return Path(checkpoints) / pointer.read_text().strip() if pointer.is_file() else None


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """`latest` -> the folder the `latest` file names; anything else is a folder path."""
    checkpoints = Path(output_dir) / "checkpoints"
    if resume == LATEST:
        folder = latest_checkpoint(checkpoints)
        if folder is None:
            raise FileNotFoundError(f"resume=latest but {checkpoints / LATEST} does not exist: no checkpoint was "
                                    "written yet")
        return folder
    folder = Path(resume)
    if not (folder / "progress.json").is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no progress.json)")
    return folder


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints, and always the one `latest` names."""
    latest_file = checkpoints / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    folders = sorted(p for p in checkpoints.glob("step-???????") if p.is_dir())
    for old in folders[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader, or a run killed while writing, sees the
    old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
