"""The train state: a plain pytree of (step, params, opt_state, rng), and its sharded creation."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.algorithms.ema import init_ema
from jaxtrain.layers import lora
from jaxtrain.layers.linear import frozen_kernels_in, loaded_placeholders
from jaxtrain.models import build_model
from jaxtrain.parallel.layout import check_param_shardings
from jaxtrain.parallel.mesh import logical_shardings
from jaxtrain.parallel.platform import llvm_options


@struct.dataclass
class TrainState:
    """Everything that changes during training, as arrays.

    The model's structure (its NNX graph definition) stays outside, so the train step is a pure
    function of (state, batch).
    """

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of the model's parameters (float32)
    opt_state: Any  # optax state
    rng: jax.Array  # PRNG key for dropout; folded with the step each batch
    loss_window: jax.Array  # float32[spike_window]: losses of recent applied steps (spike rule)
    window_count: jax.Array  # int32 scalar: losses recorded in loss_window so far
    lr_scale: jax.Array  # float32 scalar: multiplies every update (cut after a rollback)
    ema: Any = None  # algorithms.ema: the moving average of the parameters (float32), else None


def checkpoint_items(state: TrainState) -> dict[str, Any]:
    """The state as checkpoints hold it: its fields by name, leaving out those it does not keep
    (``ema`` None), so a checkpoint of a run without them has the same items whichever jaxtrain
    version wrote it."""
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
            if getattr(state, field.name) is not None}


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of the model: its NNX graph definition and parameter shardings."""

    graphdef: Any
    param_shardings: Any
    param_logical_specs: Any
    mesh: Mesh | None = None
    rules: Any = None

    def merge(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    def apply(self, params: Any, *args: Any, method: str | None = None, **kwargs: Any) -> Any:
        """Call the model (or its ``method``) with ``params`` inside the mesh and logical-axis
        rules, so activation sharding constraints take effect when traced."""
        model = self.merge(params)
        call = model if method is None else getattr(model, method)
        if self.mesh is None:
            return call(*args, **kwargs)
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
            return call(*args, **kwargs)


def abstract_model(model_cfg: Any) -> tuple[Any, Any]:
    """(graphdef, abstract parameter state) without allocating any parameter."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def create_train_state(
    model_cfg: Any,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    mesh: Mesh,
    rules: Any,
    spike_window: int = 100,
    ema: bool = False,
    frozen_dtype: Any = jnp.float32,
    weights_loaded: bool = False,
) -> tuple[TrainState, ModelDef, Any]:
    """Initialise parameters directly into their shardings and the optimizer state beside them
    (and, with ``ema``, the moving average of the parameters: a copy of them). A model with LoRA
    adapters keeps its frozen weights in ``frozen_dtype`` (the run's compute dtype: they are only
    ever read in it), its adapters in float32. ``weights_loaded``: the weights are loaded right
    after (``load_path``; a LoRA model's adapters may start fresh), so its linear layers and
    embeddings start as zeros rather than drawn (drawing a 7B model's holds about 4 GiB of float
    temporaries, a layer's draws at a time, and takes most of the building's time on a CPU).

    Returns (state, model_def, state_shardings).
    """
    init_state, state_shardings, model_def = _state_plan(model_cfg, tx, mesh, rules, spike_window, ema, frozen_dtype,
                                                         weights_loaded)
    # One program builds the whole state (parameters, optimizer state, counters) in place on its
    # devices: each separately jitted piece would be one more XLA compile before the first step.
    options = llvm_options(mesh.devices.flat[0].platform) or None
    init = jax.jit(init_state, out_shardings=state_shardings, compiler_options=options)
    state = init(jax.random.key(seed))
    return state, model_def, jax.tree.map(lambda x: x.sharding, state)


def abstract_train_state(
    model_cfg: Any, tx: optax.GradientTransformation, *, mesh: Mesh, rules: Any, spike_window: int = 100,
    ema: bool = False, frozen_dtype: Any = jnp.float32,
) -> tuple[TrainState, ModelDef, Any]:
    """``create_train_state`` without allocating anything: the state as sharded
    ``jax.ShapeDtypeStruct``s, for compiling ahead of time (e.g. for devices this process lacks)."""
    init_state, state_shardings, model_def = _state_plan(model_cfg, tx, mesh, rules, spike_window, ema, frozen_dtype)
    shapes = jax.eval_shape(init_state, jax.random.key(0))
    state = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                         shapes, state_shardings)  # fmt: skip
    return state, model_def, state_shardings


def _state_plan(model_cfg, tx, mesh, rules, spike_window, ema=False, frozen_dtype=jnp.float32, weights_loaded=False):
    """(init_state(key) -> TrainState, the state's shardings, the ModelDef)."""
    graphdef, abstract_params = abstract_model(model_cfg)
    logical_specs = nnx.get_partition_spec(abstract_params)
    param_shardings = logical_shardings(logical_specs, mesh, rules)
    check_param_shardings(abstract_params, param_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # With LoRA adapters only they train: the optimizer's state covers them alone
    opt_shardings = _opt_state_shardings(tx, trainable_params(abstract_params), trainable_params(param_shardings),
                                         replicated)

    def init_state(key: jax.Array) -> TrainState:
        init_key, dropout_key = jax.random.split(key)
        adapted = getattr(model_cfg, "peft_config", None) is not None  # frozen weights in frozen_dtype
        if weights_loaded:
            building = loaded_placeholders(frozen_dtype if adapted else None)
        else:
            building = frozen_kernels_in(frozen_dtype) if adapted else contextlib.nullcontext()
        with building:
            params = nnx.split(build_model(model_cfg, rngs=nnx.Rngs(params=init_key)), nnx.Param)[1]
        if lora.has_adapters(params):
            params = lora.cast_frozen(params, frozen_dtype)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(trainable_params(params)),
            rng=jax.random.key_data(dropout_key),
            loss_window=jnp.zeros((spike_window,), jnp.float32),
            window_count=jnp.zeros((), jnp.int32),
            lr_scale=jnp.ones((), jnp.float32),
            ema=init_ema(trainable_params(params)) if ema else None,  # the average of what trains
        )

    state_shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
        loss_window=replicated, window_count=replicated, lr_scale=replicated,
        ema=trainable_params(param_shardings) if ema else None,
    )  # fmt: skip
    return init_state, state_shardings, ModelDef(graphdef, param_shardings, logical_specs, mesh, tuple(rules))


def _opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                         replicated: NamedSharding) -> Any:
    """Optimizer moments live beside their parameters; counters and scalars are replicated.

    Worked out while tracing, so that the optimizer's ``init`` (which evaluates the schedule's
    first value) runs no eager operations, each of which would compile a small program."""
    found = []

    def trace(params):
        found.append(optax.tree_map_params(tx, lambda _, sharding: sharding, tx.init(params), param_shardings,
                                           transform_non_params=lambda _: replicated))
        return jnp.zeros(())

    jax.eval_shape(trace, abstract_params)
    return found[0]


def trainable_params(params: Any) -> Any:
    """The parameters training updates: all of them, or with LoRA adapters (``jaxtrain.layers.lora``)
    the adapters alone."""
    return lora.split_trainable(params)[0] if lora.has_adapters(params) else params


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
