"""The decoder (Flax NNX): RMSNorm, GQA projections, SwiGLU, stacked layers.

Modules hold parameters and the per-token math. How tokens attend to each other is not
decided here: `apply_layer` takes a `mix` function that turns (q, k, v) into attention
outputs, so full attention and the segment operator share every other line of the layer.

Parameters leave this file as a plain nested dict of arrays (`init_params`), and come
back as a module with `bind`, so the public functions stay pure.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding
from jaxtyping import Array, Float, Int

from ..config import Config, ConfigError
from . import numerics
from .sharding import constrain, spec

# Named remat policies for the layer body (`model.remat`).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # save only layer inputs
    "dots": jax.checkpoint_policies.checkpoint_dots,  # save every matmul output
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projections, not attention
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),  # the attention output
}


def _param(init, rngs: nnx.Rngs, shape, dtype, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(nnx.initializers.ones, rngs, (dim,), param_dtype, ("embed",))
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        return rms_norm(x, self.scale[...], self.eps)


def rms_norm(x: Float[Array, "... D"], scale: Float[Array, "D"], eps: float) -> Float[Array, "... D"]:
    """x / rms(x) * scale, computed in float32 (or wider), returned in x's dtype."""
    work = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(work)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(work)).astype(x.dtype)


class Block(nnx.Module):
    """One decoder layer's parameters: pre-norm attention projections and a SwiGLU MLP."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        m = cfg.model
        d, H, G, Dh, F = m.d_model, m.n_heads, m.n_kv_heads, m.dim_head, m.d_ff
        pd = jnp.dtype(m.param_dtype)
        init = nnx.initializers.normal(m.init_std)
        out_init = nnx.initializers.normal(m.init_std / (2 * m.n_layers) ** 0.5)
        self.attn_norm = RMSNorm(d, m.norm_eps, pd, rngs)
        self.wq = _param(init, rngs, (d, H, Dh), pd, ("embed", "q_heads", "head_dim"))
        self.wk = _param(init, rngs, (d, G, Dh), pd, ("embed", "kv_heads", "head_dim"))
        self.wv = _param(init, rngs, (d, G, Dh), pd, ("embed", "kv_heads", "head_dim"))
        self.wo = _param(out_init, rngs, (H, Dh, d), pd, ("q_heads", "head_dim", "embed"))
        if m.qkv_bias:
            zeros = nnx.initializers.zeros
            self.bq = _param(zeros, rngs, (H, Dh), pd, ("q_heads", "head_dim"))
            self.bk = _param(zeros, rngs, (G, Dh), pd, ("kv_heads", "head_dim"))
            self.bv = _param(zeros, rngs, (G, Dh), pd, ("kv_heads", "head_dim"))
        else:
            self.bq = self.bk = self.bv = None
        self.mlp_norm = RMSNorm(d, m.norm_eps, pd, rngs)
        self.w_gate = _param(init, rngs, (d, F), pd, ("embed", "mlp"))
        self.w_up = _param(init, rngs, (d, F), pd, ("embed", "mlp"))
        self.w_down = _param(out_init, rngs, (F, d), pd, ("mlp", "embed"))
        self.dtype = jnp.dtype(m.dtype)

    def _w(self, p: nnx.Param) -> Array:
        return p[...].astype(self.dtype)

    def qkv(self, x: Float[Array, "B T d"]):
        """Pre-RoPE queries [B T H D], keys and values [B T G D]."""
        q = numerics.einsum("btd,dhk->bthk", x, self._w(self.wq))
        k = numerics.einsum("btd,dgk->btgk", x, self._w(self.wk))
        v = numerics.einsum("btd,dgk->btgk", x, self._w(self.wv))
        if self.bq is not None:
            q, k, v = q + self._w(self.bq), k + self._w(self.bk), v + self._w(self.bv)
        return q, k, v

    def attn_out(self, o: Float[Array, "B T H D"]) -> Float[Array, "B T d"]:
        return numerics.einsum("bthk,hkd->btd", o, self._w(self.wo))

    def mlp(self, x: Float[Array, "B T d"]) -> Float[Array, "B T d"]:
        gate = numerics.einsum("btd,df->btf", x, self._w(self.w_gate))
        up = numerics.einsum("btd,df->btf", x, self._w(self.w_up))
        return numerics.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self._w(self.w_down))


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        m = cfg.model
        pd = jnp.dtype(m.param_dtype)
        self.embed = _param(nnx.initializers.normal(m.init_std), rngs, (m.vocab_size, m.d_model), pd,
                            ("vocab", "embed"))

        @nnx.split_rngs(splits=m.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)  # every parameter has a leading layer axis
        self.final_norm = RMSNorm(m.d_model, m.norm_eps, pd, rngs)
        if m.tie_embeddings:
            self.unembed = None
        else:
            self.unembed = _param(nnx.initializers.normal(m.init_std), rngs, (m.d_model, m.vocab_size),
                                  pd, ("embed", "vocab"))
        self.dtype = jnp.dtype(m.dtype)

    def embed_tokens(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T d"]:
        table = constrain(self.embed[...], ("vocab", None))  # FSDP: gather the table, not the tokens
        return constrain(jnp.take(table, tokens, axis=0).astype(self.dtype), ACTIVATION)

    def logits(self, x: Float[Array, "B T d"]) -> Float[Array, "B T V"]:
        """Final norm and unembedding, accumulated in float32 (or wider)."""
        return self.head()(self.head_params(), x)

    def head(self) -> Head:
        """The final norm and unembedding as a pure function of `head_params()` and x."""
        return Head(self.final_norm.eps, self.unembed is None, self.dtype.name)

    def head_params(self) -> dict:
        table = self.embed if self.unembed is None else self.unembed
        return dict(scale=self.final_norm.scale[...], table=table[...])


@dataclasses.dataclass(frozen=True)
class Head:
    """`Transformer.logits` as a pure function: `Head(...)(head_params, x)` -> [B T V] logits
    in float32 (or wider). `tied`: the table is the embedding [V d], else the unembedding [d V]."""

    eps: float
    tied: bool
    dtype: str

    def __call__(self, params: dict, x: Float[Array, "B T d"]) -> Float[Array, "B T V"]:
        h = rms_norm(x, params["scale"], self.eps)
        subscripts = "btd,vd->btv" if self.tied else "btd,dv->btv"
        return unembed_product(subscripts, h, params["table"].astype(self.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def unembed_product(spec: str, h: Array, w: Array) -> Array:
    """`einsum(spec, h, w)` accumulated and returned in float32 (or wider), whose derivative
    runs in the operands' dtype: the backward pass casts the logits' cotangent to bf16 once
    and takes the two [T, V] products in bf16, as a plain bf16 model does, instead of
    upcasting both operands to float32 (two float32 products over the vocabulary, with
    twice the bytes). Exactly the plain product for float32 (or wider) operands."""
    return numerics.einsum(spec, h, w, preferred_element_type=jnp.promote_types(h.dtype, jnp.float32))


@unembed_product.defjvp
def _unembed_product_jvp(spec: str, primals, tangents):
    (h, w), (dh, dw) = primals, tangents
    out = unembed_product(spec, h, w)
    return out, (numerics.einsum(spec, dh, w) + numerics.einsum(spec, h, dw)).astype(out.dtype)


# --------------------------------------------------------------------------- pure boundary


def _check_dtypes(cfg: Config) -> None:
    for key in ("dtype", "param_dtype"):
        if getattr(cfg.model, key) == "float64" and not jax.config.jax_enable_x64:
            raise ConfigError(f"config key 'model.{key}': float64 needs jax_enable_x64 "
                              "(JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', True))")


@functools.lru_cache(maxsize=32)
def _abstract(cfg: Config):
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def init_params(cfg: Config, seed: int = 0) -> dict:
    """Random parameters as a nested dict of arrays (blocks stacked on a leading layer axis)."""
    _check_dtypes(cfg)
    model = Transformer(cfg, nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model))


def bind(cfg: Config, params: dict) -> Transformer:
    """A module view of `params` (no copy); works under jit and other transforms."""
    _check_dtypes(cfg)
    graphdef, abstract_state = _abstract(cfg)
    check_params(params, nnx.to_pure_dict(abstract_state))
    state = jax.tree.map(lambda a: a, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def check_params(params: Any, expected: dict) -> None:
    def flat(tree):
        return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    got, want = flat(params), flat(expected)
    if got.keys() != want.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise ValueError(f"parameters do not match the config's model: missing {missing or 'none'}, "
                         f"unexpected {extra or 'none'}")
    for key, leaf in got.items():
        if tuple(jnp.shape(leaf)) != want[key].shape:
            raise ValueError(f"parameters do not match the config's model: {key} has shape "
                             f"{tuple(jnp.shape(leaf))}, the config needs {want[key].shape}")


def param_shapes(cfg: Config) -> dict:
    return jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(_abstract(cfg)[1]))


def logical_axes(cfg: Config) -> dict:
    """Logical axis names of every parameter (stacked block parameters lead with 'layers')."""
    _, state = _abstract(cfg)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        axes = tuple(var.get_metadata().get("logical_axes", ()))
        if path[0] == "blocks":
            axes = ("layers",) + axes
        flat[path] = axes
    out: dict = {}
    for path, axes in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = axes
    return out


def compute_params(cfg: Config, params: dict) -> dict:
    """`params` as the layers read them: every weight is cast to `model.dtype` at its use, so
    casting it once here is exact (and halves what FSDP gathers in bf16); the norms' scales,
    read in float32, stay as they are."""
    dtype = jnp.dtype(cfg.model.dtype)
    keep = lambda path: getattr(path[-1], "key", None) == "scale"
    return jax.tree_util.tree_map_with_path(lambda path, p: p if keep(path) else p.astype(dtype), params)


def count_params(params: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def apply_layer(block: Block, x: Float[Array, "B T d"], mix: Callable):
    """x + attention(norm(x)) + mlp(norm(...)); `mix(q, k, v) -> (o, aux)` does the attending."""
    q, k, v = block.qkv(block.attn_norm(x))
    o, aux = mix(q, k, v)
    o = checkpoint_name(o, "attn_out")
    x = x + block.attn_out(o)
    x = x + block.mlp(block.mlp_norm(x))
    return x, aux


ACTIVATION = ("batch", "act_seq", "act_embed")  # the layout of a layer's input and output


def remat_policy(cfg: Config, setting: str) -> str:
    """`model.remat` or `segment.remat` made concrete: "auto" is "full" wherever attention
    runs unfused (its scores would be kept for the backward pass), "none" with a fused kernel."""
    if setting != "auto":
        return setting
    from .attention import resolve_backend

    fused = resolve_backend(cfg.attention.backend, cfg.model.dtype) in ("cudnn", "splash")
    return "none" if fused else "full"


def scan_layers(model: Transformer, x, per_layer, layer_fn: Callable, remat: str = "none"):
    """Scan `layer_fn(block, x, per_layer_slice) -> (x, ys)` over the stacked blocks.

    `per_layer` is a pytree whose leaves have a leading layer axis; the layer body is
    rematerialised with the named policy (`REMAT_POLICIES`).
    """
    graphdef, blocks_state = nnx.split(model.blocks)

    def pin(carry):  # the hidden state: the carry, or its first element (where caches ride along)
        if isinstance(carry, tuple):
            return (constrain(carry[0], ACTIVATION),) + carry[1:]
        return constrain(carry, ACTIVATION)

    def body(x, layer):
        block_state, extra = layer
        x, ys = layer_fn(nnx.merge(graphdef, block_state), pin(x), extra)
        return pin(x), ys

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x, (blocks_state, per_layer))


def param_shardings(cfg: Config, params, mesh: jax.sharding.Mesh):
    """A NamedSharding per parameter: its logical axes (`logical_axes`) mapped onto the mesh."""
    return jax.tree.map(lambda a, p: NamedSharding(mesh, spec(a, np.shape(p), mesh)), logical_axes(cfg), params,
                        is_leaf=lambda x: isinstance(x, tuple))
