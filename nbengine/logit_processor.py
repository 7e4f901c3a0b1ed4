"""Custom logit processors (SGLang's ``custom_logit_processor``), behind ``enable_custom_logit_processor``.

A processor is a subclass of :class:`CustomLogitProcessor`; the user sends ``proc.to_str()``
(the class pickled by value with cloudpickle, so it can travel over HTTP too) with ``generate(...,
custom_logit_processor=...)`` and per-request ``sampling_params["custom_params"]``. Each step the
engine calls it once per distinct processor on the logits rows of the requests using it:
``processor(logits [k, vocab], [params dict per row])``; each dict holds that request's
``custom_params`` and ``"__req__"`` (its sequence: ``prompt_ids``, ``output_ids``, ``rid``). It
returns the (possibly in-place) modified logits. Loading a processor runs code the caller sent:
this is why the engine flag is off by default.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .sequence import Sequence


class CustomLogitProcessor:
    """Subclass and implement ``__call__(self, logits, custom_param_list) -> logits``."""

    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def to_str(cls) -> str:
        import cloudpickle

        return json.dumps({"callable": cloudpickle.dumps(cls).hex()})

    @staticmethod
    def from_str(text: str) -> "CustomLogitProcessor":
        """The processor ``to_str`` serialised; ``ValueError`` when ``text`` is not one."""
        import cloudpickle

        try:
            obj = cloudpickle.loads(bytes.fromhex(json.loads(text)["callable"]))
        except Exception as e:  # noqa: BLE001 - anything the caller sent that does not load
            raise ValueError(f"custom_logit_processor could not be loaded ({type(e).__name__}: {e}); pass "
                             "YourProcessor.to_str() of a CustomLogitProcessor subclass.") from None
        proc = obj() if isinstance(obj, type) else obj
        if not callable(proc):
            raise ValueError("custom_logit_processor must load to a callable (a CustomLogitProcessor subclass).")
        return proc


def apply_processors(logits: torch.Tensor, seqs: list["Sequence"]) -> None:
    """Run each request's processor on its rows of ``logits`` (in place), one call per distinct processor."""
    groups: dict[int, list[int]] = {}
    procs: dict[int, Any] = {}
    for i, seq in enumerate(seqs):
        if seq.logit_processor is not None:
            groups.setdefault(id(seq.logit_processor), []).append(i)
            procs[id(seq.logit_processor)] = seq.logit_processor
    for key, rows in groups.items():
        params = [{**(seqs[i].params.custom_params or {}), "__req__": seqs[i]} for i in rows]
        index = torch.tensor(rows, device=logits.device)
        out = procs[key](logits.index_select(0, index), params)
        logits.index_copy_(0, index, out.to(logits.dtype))
