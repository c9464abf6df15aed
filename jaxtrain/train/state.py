"""The train state: a plain pytree of (step, params, opt_state, rng), and its sharded creation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.models import build_model
from jaxtrain.parallel.layout import check_param_shardings
from jaxtrain.parallel.mesh import logical_shardings


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
) -> tuple[TrainState, ModelDef, Any]:
    """Initialise parameters directly into their shardings and the optimizer state beside them.

    Returns (state, model_def, state_shardings).
    """
    graphdef, abstract_params = abstract_model(model_cfg)
    logical_specs = nnx.get_partition_spec(abstract_params)
    param_shardings = logical_shardings(logical_specs, mesh, rules)
    check_param_shardings(abstract_params, param_shardings, mesh)
    init_key, dropout_key = jax.random.split(jax.random.key(seed))

    def init_params(key: jax.Array) -> Any:
        return nnx.split(build_model(model_cfg, rngs=nnx.Rngs(params=key)), nnx.Param)[1]

    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.jit(init_params, out_shardings=param_shardings)(init_key)
    # Optimizer moments live beside their parameters; counters and scalars are replicated.
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(dropout_key), replicated),
        loss_window=jax.device_put(jnp.zeros((spike_window,), jnp.float32), replicated),
        window_count=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        lr_scale=jax.device_put(jnp.ones((), jnp.float32), replicated),
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return state, ModelDef(graphdef, param_shardings, logical_specs, mesh, tuple(rules)), shardings


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
