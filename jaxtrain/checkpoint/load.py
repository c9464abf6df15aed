"""Load a trained model from a jaxtrain checkpoint folder: its config, parameters and tokenizer.

Used by generation, evaluation, export and ``load_path``. Only the parameters are read (the
optimizer state is skipped), into host memory or the given shardings. Given the model they are
for (``like``), the checkpoint's parameter names and shapes are checked against it before any
array is read: a difference is a ``ParameterMismatch`` naming the parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxtrain.checkpoint import checksums
from jaxtrain.checkpoint.frozen import RECORD_KEY, read_frozen
from jaxtrain.checkpoint.orbax_reads import CODE_DEFECTS, read_only_manager, restore_state
from jaxtrain.checkpoint.remote import fetch_checkpoint, is_remote
from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.config.schema import ModelConfig
from jaxtrain.data.tokenizer import TOKENIZER_FILE
from jaxtrain.layers import lora, quant



@dataclasses.dataclass
class LoadedModel:
    model_cfg: ModelConfig
    params: Any  # nnx.State of the model's parameters
    step: int
    tokenizer_path: str | None
    meta: dict
    averaged: bool = False  # the run kept a moving average of its weights (algorithms.ema): these are it

    def module(self) -> nnx.Module:
        """The NNX module holding these parameters."""
        from jaxtrain.train.state import abstract_model

        graphdef, _ = abstract_model(self.model_cfg)
        return nnx.merge(graphdef, self.params)

    def merged(self) -> LoadedModel:
        """These weights with their LoRA adapters merged in, for the model without adapters (one
        product per layer instead of three, as generation and evaluation want); itself without,
        and itself with quantized frozen weights (``quantize_frozen``), which merging would turn
        back into the float model generation may have no room for."""
        if self.model_cfg.peft_config is None or self.model_cfg.quantize_frozen is not None:
            return self
        return dataclasses.replace(self, model_cfg=lora.without_adapters(self.model_cfg),
                                   params=lora.merge_adapters(self.params, self.model_cfg))

    def tokenizer(self):
        """The ``jaxtrain.data.Tokenizer`` saved beside the checkpoint (``ConfigError`` if none is)."""
        from jaxtrain.data.tokenizer import tokenizer_from_file

        if self.tokenizer_path is None:
            raise ConfigError("no tokenizer.json beside the checkpoint; read one with "
                              "jaxtrain.data.tokenizer.load_tokenizer")
        return tokenizer_from_file(self.tokenizer_path, what="the checkpoint's tokenizer")


class ParameterMismatch(ConfigError):
    """The checkpoint's parameters are not the model's: ``missing`` (the model's, not in the
    checkpoint), ``extra`` (the checkpoint's, not the model's) and ``shapes`` ({name: (checkpoint
    shape, model shape)}); ``model_cfg`` is the checkpoint's model config."""

    def __init__(self, where: str, model_cfg: ModelConfig, missing: list[str], extra: list[str],
                 shapes: dict[str, tuple[tuple, tuple]]):
        self.model_cfg, self.missing, self.extra, self.shapes = model_cfg, missing, extra, shapes
        super().__init__(f"{where}: {self.detail()}; make the model section match the checkpoint's")

    def detail(self) -> str:
        """What differs, in one clause: the parameters missing, extra and of another shape."""
        parts = []
        if self.missing:
            parts.append(f"the model has {few(self.missing)}, which the checkpoint lacks")
        if self.extra:
            parts.append(f"the checkpoint has {few(self.extra)}, which the model lacks")
        if self.shapes:
            shown = [f"{name} is {theirs} there, {ours} in the model"
                     for name, (theirs, ours) in self.shapes.items()]
            parts.append(few(shown, 2))
        return "its parameters differ from the model's: " + "; ".join(parts)


def few(items: list[str], limit: int = 3) -> str:
    """``a, b, c`` or ``a, b, c and 4 more``."""
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def param_names(tree: Any) -> dict[str, Any]:
    """{dotted parameter name (``blocks.attn.Wqkv.kernel``): leaf} of a parameter tree."""
    return dict(zip(checksums.leaf_names(tree), jax.tree.leaves(tree)))


def _check_parameters(where: str, model_cfg: ModelConfig, theirs: Any, ours: Any, *, shapes: bool) -> None:
    """Raise ``ParameterMismatch`` unless ``theirs`` and ``ours`` hold the same parameter names (and,
    with ``shapes``, of the same shapes)."""
    theirs, ours = param_names(theirs), param_names(ours)
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    different = {}
    for name in sorted(set(ours) & set(theirs)) if shapes else ():
        if tuple(ours[name].shape) != tuple(theirs[name].shape):
            different[name] = (tuple(theirs[name].shape), tuple(ours[name].shape))
    if missing or extra or different:
        raise ParameterMismatch(where, model_cfg, missing, extra, different)


def _is_step_folder(folder: str) -> bool:
    """Whether ``folder`` is one step of a checkpoint (``<save_folder>/<step>`` with its items)."""
    name = os.path.basename(os.path.abspath(folder))
    return name.isdigit() and any(os.path.isdir(os.path.join(folder, item)) for item in ("state", "meta"))


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def _no_checkpoint_error(folder: str) -> ConfigError:
    """Why ``folder`` (local, existing) holds no step of a jaxtrain checkpoint, and what to do."""
    if "://" not in folder:
        names = set(os.listdir(folder))
        if "config.json" in names or any(name.endswith(".safetensors") for name in names):
            return ConfigError(f"{folder}: a Hugging Face model folder, not a jaxtrain checkpoint; convert it "
                               f"first: jaxtrain convert {folder} NEW_FOLDER, then pass NEW_FOLDER")
        if {"state", "meta"} & names:  # a step folder renamed (e.g. moved aside as unreadable)
            return ConfigError(f"{folder}: one checkpoint step's folder, not named by its step number; pass the "
                               f"checkpoint folder that holds it under its step number")
    return ConfigError(f"{folder}: no complete jaxtrain checkpoint found (expected numbered step folders)")


def load_checkpoint(folder: str, step: int | None = None, *, shardings: Any = None, like: Any = None,
                    frozen_weights: bool = True, adapters_beside: bool = False,
                    merge_adapters: bool = False) -> LoadedModel:
    """Read the model config, parameters and tokenizer path of ``folder`` (newest step by default).

    A missing folder or step and an incomplete or damaged step raise ``ConfigError`` naming the
    folder and step and listing the steps there.

    ``shardings``: a tree of shardings like the checkpoint's parameters to read them into (default
    the first local device). ``like``: the parameters of the model they are for (arrays or
    ``ShapeDtypeStruct``s with shardings): read into its shardings and dtypes, after checking that
    names and shapes agree. A tree that does not fit raises ``ParameterMismatch`` before anything is read.

    A LoRA checkpoint saved without its frozen weights (``jaxtrain.checkpoint.frozen``) reads them
    from where its run read them; with ``frozen_weights=False`` the parameters are its adapters alone.

    ``adapters_beside``: ``like`` lacks the LoRA adapters the checkpoint may hold (it is the frozen
    part of another LoRA model): they are read beside it, replicated on ``like``'s devices, so
    that nothing is read whole onto one device; the parameters returned hold them.

    ``merge_adapters``: ``like`` is a model without adapters (a full fine-tune going on from a LoRA
    checkpoint). The checkpoint's parameters are read in their own dtypes (quantized kernels as
    they are) onto ``like``'s devices, each sharded as ``like``'s parameter of the same name where
    that fits its shape (replicated otherwise); the adapters are merged into the weights
    (``lora.merge_adapters``) by one program that writes ``like``'s shardings and dtypes. The model
    config returned is the one without adapters. A checkpoint whose merged model is not ``like``
    raises ``ParameterMismatch`` naming the parameters.
    """
    from jaxtrain.train.state import abstract_model

    if "://" not in folder and os.path.isfile(folder):
        raise ConfigError(f"{folder}: a file, not a checkpoint folder; give the folder a run saved its checkpoints "
                          f"in (its save_folder), or one of its step folders")
    if "://" not in folder and not os.path.isdir(folder):
        raise ConfigError(f"{folder}: checkpoint folder not found")
    if "://" not in folder and _is_step_folder(folder):  # one step's folder: that step of the folder above
        parent, number = os.path.split(os.path.abspath(folder))
        if step is not None and step != int(number):
            raise ConfigError(f"{folder}: the folder of step {number}, but step {step} was asked for; pass the "
                              f"checkpoint folder above it ({parent}) to read another step")
        folder, step = parent, int(number)
    if is_remote(folder):  # staged locally: Orbax reads the downloaded step
        root = fetch_checkpoint(folder, step)
    else:
        root = os.path.abspath(folder) if "://" not in folder else folder
    manager = read_only_manager(root)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise _no_checkpoint_error(folder)
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ConfigError(f"{folder}: no checkpoint step {step} there; pass --step with one of the steps "
                              f"there: {_steps_text(steps)}")
        step_folder = os.path.join(folder, str(step))

        def damaged(what: str) -> ConfigError:
            others = [s for s in steps if s != step]
            if is_remote(folder):
                todo = "read another step saved there (--step, or its folder as the path)"
            elif others:
                todo = (f"read another step instead: {_steps_text(others)} (its folder, e.g. "
                        f"{os.path.join(folder, str(others[-1]))}, or --step {others[-1]})")
            else:
                todo = "it is the only step there: save or convert the checkpoint again"
            return ConfigError(f"{step_folder}: checkpoint step {step} is incomplete or damaged ({what}); {todo}")

        local_step = os.path.join(root, str(step))
        for item in ("meta", "state"):
            if "://" not in local_step and not os.path.isdir(os.path.join(local_step, item)):
                raise damaged(f"its {item} folder is missing")
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except CODE_DEFECTS:
            raise
        except Exception as error:  # noqa: BLE001 - Orbax documents no error types for an unreadable item
            raise damaged("its meta item cannot be read") from error
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise damaged("its meta item holds no model config")
        try:
            run_cfg = load_config_dict(meta["config"])
        except ConfigError as error:
            raise damaged(f"the config in its meta item is invalid: {error}") from None
        model_cfg = run_cfg.model
        # a run with a moving average of its weights is evaluated and exported with the average,
        # as Composer's checkpoints hold it as the model's weights
        averaged = run_cfg.algorithms.ema is not None and not meta.get("weights_only")
        _, abstract_params = abstract_model(model_cfg)
        merge_into = None
        if merge_adapters and like is not None:
            _, merged_params = abstract_model(lora.without_adapters(model_cfg))
            _check_parameters(step_folder, model_cfg, merged_params, like, shapes=True)
            merge_into, shardings, like = like, _fitted_shardings(abstract_params, like), None
        if adapters_beside and like is not None and lora.has_adapters(abstract_params):
            like = lora.merge_trainable(_replicated_like(lora.split_trainable(abstract_params)[0], like), like)
        quantize_into = None
        if like is not None and quant.is_quantized(like) and not quant.is_quantized(abstract_params):
            quantize_into, like = like, quant.float_like(like)  # float weights for quantized frozen weights
        if like is not None:
            _check_parameters(step_folder, model_cfg, abstract_params, like, shapes=True)
            shardings = jax.tree.map(lambda x: x.sharding, like)
            # read in the dtypes of ``like`` (a LoRA model's frozen weights are kept in the compute dtype)
            abstract_params = jax.tree.map(lambda x, l: jax.ShapeDtypeStruct(x.shape, l.dtype), abstract_params, like)
        elif shardings is not None:
            _check_parameters(step_folder, model_cfg, abstract_params, shardings, shapes=False)
        if shardings is None:
            device = jax.local_devices()[0]
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract_params)
        item = "ema" if averaged else "params"
        placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params,
                              shardings)
        target = {item: placed}
        frozen_record = meta.get(RECORD_KEY)
        if frozen_record is not None:  # adapters only: the frozen weights are read from where the run read them
            target = {item: lora.split_trainable(placed)[0]}
        elif averaged and lora.has_adapters(placed):  # the average is the adapters'; the frozen weights are read too
            target = {"params": placed, "ema": lora.split_trainable(placed)[0]}
        quantize_kernel = None
        if quantize_into is not None and frozen_record is None:
            # quantized as they are read: the others first, then each kernel alone, read into host
            # memory and quantized on the devices one layer at a time (never the float model whole)
            kernel_paths = {path + ("kernel",) for path in quant.quantized_layers(quantize_into)}
            weights = "params" if "params" in target else item  # where the frozen weights are read from
            flat = dict(nnx.to_flat_state(target[weights]))
            target[weights] = nnx.from_flat_state([(path, v) for path, v in flat.items() if path not in kernel_paths])

            def quantize_kernel(path: tuple, kernel: Any, scale: Any) -> tuple[jax.Array, jax.Array]:
                float_kernel = flat[path].get_value()
                with contextlib.closing(read_only_manager(root)) as kernels:
                    one = restore_state(kernels, step, {weights: nnx.from_flat_state([(path, flat[path])])}, damaged,
                                         to_host=True)
                host = dict(nnx.to_flat_state(one[weights]))[path].get_value()  # as saved (bf16 or float32)
                try:
                    checksums.verify_host(checksums.leaf_names(one)[0], host, meta.get(checksums.META_KEY),
                                          step_folder)
                except checksums.ChecksumMismatch as err:
                    raise damaged(str(err).removeprefix(f"{step_folder}: ")) from None
                dtype = float_kernel.dtype
                if host.ndim == 3:  # stacked layers
                    return quant.quantize_by_layer(lambda row: lambda index: host[row][index].astype(dtype),
                                                   float_kernel, kernel, scale)
                value = jax.make_array_from_callback(host.shape, float_kernel.sharding,
                                                     lambda index: host[index].astype(dtype))
                return quant.quantize_array(value, kernel, scale)
        # Only the parameters are read; the optimizer state stays on disk.
        restored = restore_state(manager, step, target, damaged)
        try:
            checksums.verify(restored, meta.get(checksums.META_KEY), step_folder)
        except checksums.ChecksumMismatch as err:
            raise damaged(str(err).removeprefix(f"{step_folder}: ")) from None
    finally:
        manager.close()
    params = restored[item]
    if frozen_record is not None and frozen_weights:
        # read where its run read them, into the frozen part of the parameters wanted: quantized as
        # they are read (one layer at a time) when those are quantized
        into = placed if quantize_into is None else quantize_into
        frozen = read_frozen(frozen_record, lora.split_trainable(into)[1], scan_layers=model_cfg.scan_layers,
                             where=step_folder)
        quantize_into = None  # the frozen weights came quantized; the adapters are as read
        params = lora.merge_trainable(params, frozen)
    elif "params" in target and "ema" in target:
        params = lora.merge_trainable(restored["ema"], lora.split_trainable(restored["params"])[1])
    if quantize_into is not None:
        params = quant.quantize_like(params, quantize_into, quantize_kernel=quantize_kernel)
    if merge_into is not None:
        params = _merge_into(params, model_cfg, merge_into)
        model_cfg = lora.without_adapters(model_cfg)
    tokenizer_path = os.path.join(root, TOKENIZER_FILE)
    return LoadedModel(
        model_cfg=model_cfg,
        params=params,
        step=step,
        tokenizer_path=tokenizer_path if os.path.exists(tokenizer_path) else None,
        meta=dict(meta),
        averaged=averaged,
    )


def _fitted_shardings(tree: Any, like: Any) -> Any:
    """A sharding for each leaf of ``tree`` (``ShapeDtypeStruct``s) on ``like``'s devices: that of
    ``like``'s leaf of the same name and rank (a quantized kernel's scales: its kernel's), each mesh
    axis kept where it divides the dimension (a quantized kernel's packed rows); replicated where
    ``like`` has no such leaf."""
    ours, replicated = param_names(like), _replicated_on(like)

    def fitted(name: str, leaf: Any) -> Any:
        if name.rsplit(".", 1)[-1] == quant.SCALE:
            name = name[:-len(quant.SCALE)] + "kernel"
        mine = ours.get(name)
        if mine is None or len(mine.shape) != len(leaf.shape):
            return replicated
        if not isinstance(mine.sharding, jax.sharding.NamedSharding):
            return mine.sharding
        mesh, spec = mine.sharding.mesh, tuple(mine.sharding.spec)
        kept = []
        for size, axes in zip(leaf.shape, spec + (None,) * (len(leaf.shape) - len(spec))):
            named = (axes,) if isinstance(axes, str) else tuple(axes or ())
            kept.append(axes if size % int(np.prod([mesh.shape[axis] for axis in named])) == 0 else None)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*kept))

    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [fitted(name, leaf) for name, leaf in zip(param_names(tree), leaves)])


def _merge_into(params: Any, model_cfg: ModelConfig, like: Any) -> Any:
    """``params`` (with adapters) merged (``lora.merge_adapters``) into ``like``'s shardings and
    dtypes by one program, so that each device computes only its part of each merged kernel."""
    shardings = jax.tree.map(lambda x: x.sharding, like)

    def merge(params):
        return jax.tree.map(lambda value, target: value.astype(target.dtype), lora.merge_adapters(params, model_cfg),
                            like)

    return jax.jit(merge, out_shardings=shardings)(params)


def _replicated_on(like: Any) -> Any:
    """The sharding that replicates an array on the devices of ``like``'s first leaf (its mesh, or
    its one device)."""
    sharding = jax.tree.leaves(like)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def _replicated_like(tree: Any, like: Any) -> Any:
    """``tree``'s shapes and dtypes as ``ShapeDtypeStruct``s replicated on ``like``'s devices."""
    sharding = _replicated_on(like)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def load_hf_weights(folder: str, *, like: Any, scan_layers: bool = True) -> LoadedModel:
    """The weights of the Hugging Face MPT folder ``folder`` (``config.json`` and safetensors), read
    into the shardings and dtypes of ``like`` after checking that names and shapes agree (else
    ``ParameterMismatch``), as ``load_checkpoint`` reads a jaxtrain checkpoint. Each process reads
    only the parts of each tensor its devices hold, straight into the target dtype."""
    from jaxtrain.convert.hf_mpt import hf_model_config
    from jaxtrain.convert.hf_parts import read_hf_sharded
    from jaxtrain.train.state import abstract_model

    # names and shapes are checked from config.json, before any tensor is read
    described = hf_model_config(folder, scan_layers=scan_layers)
    _, abstract_params = abstract_model(described)
    quantized = quant.is_quantized(like)  # quantized frozen weights: each kernel quantized as it is read, by layer
    target = quant.float_like(like) if quantized else like
    _check_parameters(folder, described, abstract_params, target, shapes=True)
    model_cfg, arrays, dtypes = read_hf_sharded(folder, nnx.to_pure_dict(target), scan_layers=scan_layers,
                                                quantize_into=nnx.to_pure_dict(like) if quantized else None)
    params = jax.tree.map(lambda x: x, like)
    nnx.replace_by_pure_dict(params, arrays)
    tokenizer_path = os.path.join(folder, TOKENIZER_FILE)
    source = {"format": "hf_mpt", "path": os.path.abspath(folder), "dtype": "/".join(sorted(dtypes))}
    return LoadedModel(model_cfg=model_cfg, params=params, step=0,
                       tokenizer_path=tokenizer_path if os.path.exists(tokenizer_path) else None, meta={"source": source})
