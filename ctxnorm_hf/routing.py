"""How context ids travel from a model call to its converted layers.

The model's forward signature does not change. :func:`install_router` puts a
forward pre-hook (``with_kwargs``) on the root module that takes
``context_ids`` out of the call and stores it in a :class:`ContextRouter`
shared with every converted layer::

    logits = model(x, context_ids=ids)                   # timm
    out = model(pixel_values=x, context_ids=ids)         # transformers
    with use_contexts(model, ids):                       # any caller
        out = model(x)

The ids stay in the router until the next call of the model, so gradient
checkpointing recomputes its segments with the ids of the forward pass that
backward is differentiating (call backward before the next forward, as usual).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

ROUTER_ATTRIBUTE = "ctxnorm_router"
CONTEXT_IDS_KWARG = "context_ids"

IdsLike = Union[torch.Tensor, Sequence[int]]


class ContextRouter:
    """Context ids of the current call of one converted model; shared by its converted layers."""

    def __init__(self) -> None:
        self.context_ids: Optional[torch.Tensor] = None
        self.scoped = 0

    def set(self, context_ids: Optional[IdsLike]) -> None:
        self.context_ids = None if context_ids is None else as_id_tensor(context_ids)

    def ids_for(self, batch_size: int) -> Optional[torch.Tensor]:
        """Ids for a layer input whose leading dim is ``batch_size``.

        A leading dim that is a multiple of the number of ids (batch x tokens
        flattened, batch-major, as in LeViT's BatchNorm1d) gets every id
        repeated once per token.
        """
        ids = self.context_ids
        if ids is None or ids.dim() != 1 or ids.shape[0] in (0, batch_size):
            return ids
        if batch_size % ids.shape[0] == 0:
            return ids.repeat_interleave(batch_size // ids.shape[0])
        raise ValueError(
            f"context_ids has {ids.shape[0]} ids but a converted layer sees a leading dim of {batch_size}, "
            "which is not a multiple of it. Pass one id per sample of the model's input batch."
        )

    def __deepcopy__(self, memo: Dict[int, Any]) -> "ContextRouter":
        # The copy routes the copied model's calls: it starts empty and gets its hook from the copied module.
        return ContextRouter()


def as_id_tensor(context_ids: IdsLike) -> torch.Tensor:
    """Tensors pass through untouched (the layers validate them); sequences become int64 tensors."""
    if isinstance(context_ids, torch.Tensor):
        return context_ids
    return torch.as_tensor(context_ids)


def _route_context_ids(
    module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    router: ContextRouter = getattr(module, ROUTER_ATTRIBUTE)
    if CONTEXT_IDS_KWARG in kwargs:
        router.set(kwargs.pop(CONTEXT_IDS_KWARG))
    elif not router.scoped:
        # A call without ids must not reuse the previous call's ids.
        router.set(None)
    return args, kwargs


def install_router(model: nn.Module) -> ContextRouter:
    """Attach a router and its pre-hook to the root module; returns the router."""
    router = ContextRouter()
    setattr(model, ROUTER_ATTRIBUTE, router)
    model.register_forward_pre_hook(_route_context_ids, with_kwargs=True)
    return router


def uninstall_router(model: nn.Module) -> None:
    """Remove the router and its pre-hook (found by identity, so this works on copies too)."""
    for handle_id, hook in list(model._forward_pre_hooks.items()):
        if hook is _route_context_ids:
            del model._forward_pre_hooks[handle_id]
            model._forward_pre_hooks_with_kwargs.pop(handle_id, None)
    if hasattr(model, ROUTER_ATTRIBUTE):
        delattr(model, ROUTER_ATTRIBUTE)


def get_router(model: nn.Module) -> ContextRouter:
    router = getattr(model, ROUTER_ATTRIBUTE, None)
    if router is None:
        raise ValueError(
            f"{type(model).__name__} has no context routing: convert it first with "
            "ctxnorm_hf.convert_norms(model, strategy, num_contexts)."
        )
    return router


@contextlib.contextmanager
def use_contexts(model: nn.Module, context_ids: IdsLike) -> Iterator[nn.Module]:
    """Route ``context_ids`` (N,) to the converted layers of ``model`` for calls inside the block."""
    router = get_router(model)
    previous = router.context_ids
    router.set(context_ids)
    router.scoped += 1
    try:
        yield model
    finally:
        router.scoped -= 1
        router.context_ids = previous
