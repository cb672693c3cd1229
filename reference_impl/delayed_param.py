"""``DelayedParamIniter``: turn a meta-device model into real tensors, one module at a time.

The SMP v2 recipe builds the model on meta on every rank but 0 and lets FSDP materialise each
wrapped unit through ``param_init_fn``; ``sync_module_states=True`` then broadcasts rank 0's
weights. What goes wrong in practice (``shared/FAULTS.md``) and what this class does about it:

* Recursive ``to_empty``/``reset_parameters`` re-initialises children that FSDP already
  materialised: the init function touches only the module's *own* tensors (FSDP1 calls it for
  every module of a unit, root first).
* Modules without ``reset_parameters`` keep garbage: every new tensor is first filled with a
  sentinel (NaN, or the dtype's minimum for integers); the init methods run in turn (the user's
  ``init_method_using_config``, the model's own ``_init_weights``, the module's
  ``reset_parameters``, and last the value a fresh build gives a vector parameter: some
  releases' ``_init_weights`` skip norms) until no sentinel is left, and whatever keeps one
  is reported.
* Non-persistent buffers (rotary ``inv_freq``) are in no state dict: their expected values are
  computed once from the config (a skeleton built under ``init_empty_weights``, where buffers
  are real) and written back whenever a module is materialised, never left as ``to_empty``
  garbage.
* ``to_empty`` unties ``lm_head`` from ``embed_tokens``: a materialised parameter is
  remembered by the identity of its meta original, so every module that shared it gets the
  same new ``Parameter``.
* A PEFT model wraps the transformers model and renames its tensors: the model's own init and
  its buffers are found through ``get_base_model()`` and PEFT's names, and LoRA adapters are
  initialised by PEFT's own rule (``reset_lora_parameters``: ``lora_B`` zeros), never by the
  model's ``_init_weights``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from reference_impl.adapters import lora_init_rules, name_mapper, transformers_model_of
from reference_impl.loading import build_meta_model
from reference_impl.tensors import clean_name, local_view, named_tensors, tie_groups

logger = logging.getLogger(__name__)

InitMethod = Callable[[nn.Module], None]


class ParamInitError(RuntimeError):
    """Raised by the validator; the message names every tensor that was not initialised."""


def fill_sentinel(tensor: torch.Tensor) -> None:
    """Mark memory as not yet initialised: NaN for floats, the dtype's minimum otherwise."""
    with torch.no_grad():
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.fill_(float("nan"))
        elif tensor.dtype != torch.bool:
            tensor.fill_(torch.iinfo(tensor.dtype).min)


def has_sentinel(tensor: torch.Tensor) -> bool:
    """True while any element still holds the sentinel (the init method left it alone)."""
    local = local_view(tensor).detach()
    if local.is_floating_point() or local.is_complex():
        return bool(torch.isnan(local).any())
    if local.dtype == torch.bool:
        return False
    return bool((local == torch.iinfo(local.dtype).min).any())


@contextmanager
def swap_params_on_conversion() -> Iterator[None]:
    """While active, ``to_empty``/``to`` swap data into each existing Parameter object instead
    of registering a new one, so tied parameters stay one object (and FSDP2 keeps its refs)."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A concrete device: ``cuda`` becomes ``cuda:<current>``, None the default device."""
    if device is None:
        return _default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class DelayedParamIniter:
    """Materialise and initialise a meta-device model module by module (SMP v2 API).

    Args:
        model: the model, with some or all parameters on meta: a ``PreTrainedModel``, a PEFT
            model wrapping one, or any module. A transformers model is re-tied first
            (``init_empty_weights`` breaks the tie at construction).
        init_method_using_config: optional ``fn(module)`` tried first on every module that got
            new tensors (for custom layers the model's own init does not know).
        verbose: log which method initialised each module.
        device: where tensors are materialised; the current CUDA device if there is one,
            else CPU.

    Example:
        >>> initer = DelayedParamIniter(model) if rank else None  # doctest: +SKIP
        >>> with initer.validate_params_and_buffers_inited() if initer else nullcontext():
        ...     model = FSDP(model, sync_module_states=True,
        ...                  param_init_fn=initer.get_param_init_fn() if initer else None)
    """

    def __init__(
        self,
        model: nn.Module,
        init_method_using_config: InitMethod | None = None,
        verbose: bool = False,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.init_method_using_config = init_method_using_config
        self.verbose = verbose
        self.device = resolve_device(device)
        self._hf_model = transformers_model_of(model)
        if self._hf_model is not None:
            self._hf_model.tie_weights()
        self._lora_rules = lora_init_rules(model)
        # Modules keep their identity through FSDP wrapping; tensors do not.
        self._module_names = {
            id(m): clean_name(n) for n, m in model.named_modules(remove_duplicate=False)
        }
        self._tie_groups = tie_groups(model)
        self._expected_buffers, self._constructed = self._skeleton_values(model)
        self._materialized: dict[int, nn.Parameter] = {}
        self._meta_originals: list[nn.Parameter] = []  # keeps ids in _materialized unique
        self._left_uninitialised: dict[str, str] = {}

    def _skeleton_values(
        self, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Values a fresh build gives, by the model's names: buffers to restore (computed
        from the config for what the transformers model holds, found through PEFT's renames,
        else a snapshot of the buffers that are real now: PEFT's own), and the construction
        values of the transformers model's vector parameters (norm weights, biases), the last
        resort for a module no init method covers."""
        expected = {
            name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta
        }
        constructed: dict[str, torch.Tensor] = {}
        hf = self._hf_model
        if hf is not None:
            dtype = next((p.dtype for p in hf.parameters() if p.is_floating_point()), None)
            skeleton = build_meta_model(hf.config, dtype or torch.float32, type(hf),
                                        real_vectors=True)
            to_base = name_mapper(model)
            for found, names, table in (
                (expected, model.named_buffers(), dict(skeleton.named_buffers())),
                (constructed, model.named_parameters(), dict(skeleton.named_parameters())),
            ):
                for name, _ in names:
                    value = table.get(to_base(name))
                    if value is not None and not value.is_meta:
                        found[name] = value.detach().clone()
        return (
            {clean_name(name): value for name, value in expected.items()},
            {clean_name(name): value for name, value in constructed.items()},
        )

    def _full_name(self, module: nn.Module, attr: str) -> str:
        prefix = self._module_names.get(id(module), "")
        return f"{prefix}.{attr}" if prefix else attr

    # -- the init functions -----------------------------------------------------------------
    def get_param_init_fn(self) -> InitMethod:
        """``fn(module)`` for FSDP's ``param_init_fn``: materialise and initialise the module's
        own tensors, re-use tied parameters, restore buffers."""
        return self._init_module

    def get_post_param_init_fn(self) -> InitMethod:
        """``fn(module)`` to run once values are in place (after a state dict load, or after
        ``to_empty``): restores expected buffers and re-ties tie groups under ``module``."""
        return self._post_init

    def _init_module(self, module: nn.Module) -> None:
        fresh = self._materialize_own(module)
        if fresh:
            self._run_init(module, fresh)
        self._restore_buffers(module)

    def _materialize_own(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """Replace the module's own meta tensors by device tensors filled with the sentinel."""
        fresh: list[tuple[str, torch.Tensor]] = []
        for attr, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            new = self._materialized.get(id(param))
            if new is None:  # first owner of a (possibly tied) parameter
                new = nn.Parameter(
                    torch.empty_like(param, device=self.device), requires_grad=param.requires_grad
                )
                fill_sentinel(new)
                self._materialized[id(param)] = new
                self._meta_originals.append(param)
                fresh.append((self._full_name(module, attr), new))
            module._parameters[attr] = new
        for attr, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                new_buf = torch.empty_like(buf, device=self.device)
                fill_sentinel(new_buf)
                module._buffers[attr] = new_buf
                fresh.append((self._full_name(module, attr), new_buf))
        return fresh

    def _init_methods(self, module: nn.Module) -> Iterator[tuple[str, Callable[[], None]]]:
        user_fn = self.init_method_using_config
        if user_fn is not None:
            yield "init_method_using_config", lambda: user_fn(module)
        lora_rule = self._lora_rules.get(id(module))
        if lora_rule is not None:  # the model's own init knows nothing of adapters
            yield "LoraLayer.reset_lora_parameters", lora_rule
        elif self._hf_model is not None:
            model = self._hf_model
            yield f"{type(model).__name__}._init_weights", lambda: model._init_weights(module)
        if callable(getattr(module, "reset_parameters", None)):
            yield f"{type(module).__name__}.reset_parameters", module.reset_parameters
        yield f"{type(module).__name__}.__init__", lambda: self._construct(module)

    def _construct(self, module: nn.Module) -> None:
        """Give each of the module's own parameters that still holds the sentinel the value a
        fresh build of the model gives it, where the skeleton has one (vectors only)."""
        for attr, param in module._parameters.items():
            value = self._constructed.get(self._full_name(module, attr))
            if param is not None and value is not None and has_sentinel(param):
                param.copy_(value.to(param.device, param.dtype))

    @torch.no_grad()
    def _run_init(self, module: nn.Module, fresh: list[tuple[str, torch.Tensor]]) -> None:
        """Try each init method until none of the new tensors holds the sentinel."""
        for method_name, method in self._init_methods(module):
            method()
            self._restore_buffers(module)
            if not any(has_sentinel(t) for _, t in fresh):
                if self.verbose:
                    logger.info(
                        "rank %d: %s initialised by %s",
                        _rank(),
                        self._module_names.get(id(module), "?"),
                        method_name,
                    )
                return
        for name, tensor in fresh:
            if has_sentinel(tensor):
                self._left_uninitialised[name] = type(module).__name__

    @torch.no_grad()
    def _restore_buffers(self, module: nn.Module) -> None:
        """Write the expected value into every real buffer of the module that differs."""
        for attr, buf in list(module._buffers.items()):
            expected = self._expected_buffers.get(self._full_name(module, attr))
            if buf is None or expected is None or buf.is_meta:
                continue
            if buf.shape != expected.shape or buf.dtype != expected.dtype:
                module._buffers[attr] = expected.to(buf.device)
            elif not torch.equal(local_view(buf).cpu(), expected):
                buf.copy_(expected.to(buf.device))

    def _post_init(self, module: nn.Module) -> None:
        for sub in module.modules():
            self._restore_buffers(sub)
        for group in self._tie_groups:
            _, owner, attr = group[0]
            primary = owner._parameters.get(attr)
            for _, other, other_attr in group[1:]:
                if primary is not None and other._parameters.get(other_attr) is not primary:
                    other._parameters[other_attr] = primary

    # -- validation -------------------------------------------------------------------------
    @contextmanager
    def validate_params_and_buffers_inited(self, enabled: bool = True) -> Iterator[None]:
        """Run the wrapping inside; on exit, raise :class:`ParamInitError` naming every tensor
        that is still on meta, still holds uninitialised memory, is NaN/Inf, or is a buffer
        whose value differs from a fresh computation, and every tie group that came apart.

        Stricter than SMP's, which only counts parameters and checks the device.
        """
        yield
        if not enabled:
            return
        problems = self.find_problems()
        if problems:
            raise ParamInitError(
                f"rank {_rank()}: {len(problems)} problems in {type(self.model).__name__} after "
                "delayed parameter init:\n  " + "\n  ".join(problems)
            )

    def find_problems(self) -> list[str]:
        """Everything the validator would report, as sentences (empty when all is well)."""
        problems = [
            f"{name}: still uninitialised after every init method ({cls} has no "
            "reset_parameters and the model's _init_weights does not cover it); pass "
            "init_method_using_config=fn(module) that initialises it"
            for name, cls in sorted(self._left_uninitialised.items())
        ]
        for name, tensor in named_tensors(self.model):
            if name in self._left_uninitialised:
                continue
            if tensor.is_meta:
                problems.append(
                    f"{name}: still on the meta device (param_init_fn never reached "
                    "its module: ignored by FSDP, or outside every wrapped unit?)"
                )
                continue
            local = local_view(tensor).detach()
            if local.is_floating_point() and local.numel() and not torch.isfinite(local).all():
                problems.append(f"{name}: contains NaN or Inf")
            expected = self._expected_buffers.get(name)
            if (
                expected is not None
                and not isinstance(tensor, nn.Parameter)
                and (
                    local.shape != expected.shape
                    or not torch.equal(local.cpu().to(expected.dtype), expected)
                )
            ):
                problems.append(
                    f"{name}: buffer differs from its value computed from the "
                    "config (to_empty garbage?); recompute it, e.g. with "
                    "get_post_param_init_fn()(model)"
                )
        return problems + self._broken_ties()

    def _broken_ties(self) -> list[str]:
        broken = []
        for group in self._tie_groups:
            params = [owner._parameters.get(attr) for _, owner, attr in group]
            if any(p is None for p in params):  # flattened away by FSDP1: not observable here
                continue
            if any(p is not params[0] for p in params[1:]):
                names = ", ".join(name for name, _, _ in group)
                broken.append(
                    f"tie group [{names}] no longer shares one Parameter; re-tie it "
                    "(model.tie_weights() or get_post_param_init_fn()(model))"
                )
        return broken

    @staticmethod
    def count_num_params(module: nn.Module, *params: torch.Tensor) -> int:
        """Number of elements in ``module``'s parameters plus ``params``, each counted once
        (tied parameters and meta tensors included)."""
        seen: dict[int, torch.Tensor] = {id(p): p for p in module.parameters()}
        seen.update({id(p): p for p in params})
        return sum(p.numel() for p in seen.values())
