"""Find each tensor's init rule by replaying its init function on a meta twin.

The model's own ``_init_weights``, PEFT's ``reset_lora_parameters`` or a module's
``reset_parameters`` is run on a twin of the module whose tensors live on the meta device (no
memory, no values, the full shapes), while a ``TorchDispatchMode`` records every write that
reaches a tensor: ``normal_``, ``uniform_`` (with the bound torch computed for Kaiming or Xavier
from the real fan-in), ``fill_``/``zero_``; anything else (``copy_`` of a computed value, an
in-place op) makes the rule unknown. The init functions whose meta versions do nothing
(``trunc_normal_``, ``orthogonal_``, ...) are recognised by name, through a patch of every
module-level reference to them for the duration of the replay. The rule a tensor ends with
is the last one applied, as in the real init.

The twin shares everything but tensors with the original (config, PEFT settings), so nothing
the replay does reaches the real model; ``_is_hf_initialized`` flags are left behind, so
transformers' guarded init functions do not skip loaded tensors in the twin.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from smpcheck.expect.fresh.init_rules import InitRule, fmt
from smpcheck.shards.tensors import clean_name

#: torch.nn.init functions seen by name during a replay.
_INIT_NAMES = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
               "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
               "kaiming_normal_", "orthogonal_", "sparse_")
#: Those whose recorded write already says all (no ``via`` needed).
_PLAIN = {"uniform_", "normal_", "constant_", "ones_", "zeros_"}
#: Those judged from their arguments, since their writes on meta are nothing or uninformative.
_BY_ARGS = {"trunc_normal_", "orthogonal_", "sparse_", "eye_", "dirac_"}

_ACTIVE: list[_Recorder] = []


def meta_twin(module: nn.Module, shapes: Mapping[str, Sequence[int]] | None = None) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors of full size.

    Submodules are new objects sharing the originals' attributes (config, adapters' settings),
    tied tensors stay tied, DTensors become their global shape, ``_is_hf_initialized`` flags
    are dropped, and a PEFT base layer's TP mesh is hidden so no replay starts a collective.

    Args:
        module: the module to twin (plain, FSDP1/FSDP2/TP-wrapped, or already on meta).
        shapes: full shapes by clean tensor name, for tensors whose local shape is not the
            full one (FSDP1 views of a flat shard; the rule depends on the fan-in). Named
            tensors the module does not register (FSDP1 with ``use_orig_params=False``) are
            re-created in the twin: ``smpcheck.shards.pieces.flat_full_shapes`` gives them all.
    """
    shapes = shapes or {}
    tensors: dict[int, torch.Tensor] = {}
    modules: dict[int, nn.Module] = {}

    def twin_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in tensors:
            meta = torch.empty(tuple(shapes.get(clean_name(name), tensor.shape)),
                               dtype=tensor.dtype, device="meta")
            if isinstance(tensor, nn.Parameter):
                meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
            tensors[id(tensor)] = meta
        return tensors[id(tensor)]

    def twin(prefix: str, original: nn.Module) -> nn.Module:
        if id(original) in modules:
            return modules[id(original)]
        copy = object.__new__(type(original))
        modules[id(original)] = copy
        copy.__dict__.update(original.__dict__)
        copy.__dict__.pop("_is_hf_initialized", None)
        if copy.__dict__.get("_hf_device_mesh") is not None:
            copy.__dict__["_hf_device_mesh"] = None
        for table in ("_parameters", "_buffers"):
            copy.__dict__[table] = {
                key: None if t is None else twin_tensor(prefix + key, t)
                for key, t in original.__dict__[table].items()}
        copy.__dict__["_modules"] = {
            key: None if child is None else twin(f"{prefix}{key}.", child)
            for key, child in original._modules.items()}
        return copy

    copy = twin("", module)
    _restore_unregistered(copy, shapes)
    return copy


def _restore_unregistered(twin: nn.Module, shapes: Mapping[str, Sequence[int]]) -> None:
    """Register a meta parameter for each name in ``shapes`` the twin lacks, on the innermost
    module of that clean name (FSDP1 keeps only plain views of its flat shard there)."""
    present = {clean_name(n) for n, _ in twin.named_parameters(remove_duplicate=False)}
    modules = {clean_name(name): m for name, m in twin.named_modules(remove_duplicate=False)}
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        if name in present or owner not in modules:
            continue
        module = modules[owner]
        module.__dict__.pop(attr, None)
        module._parameters[attr] = nn.Parameter(torch.empty(tuple(shape), device="meta"))


def _storage_key(tensor: torch.Tensor) -> int | None:
    """What all views of one tensor share (``None`` for tensors without storage)."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: float) -> object:
    return args[index] if len(args) > index else kwargs.get(name, default)


class _Recorder(TorchDispatchMode):
    """Records, per twin tensor, the last init rule written to it."""

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        self.twin = twin
        self.numel: dict[int, int] = {}  # storage key -> elements, of every tracked tensor
        for tensor in self.tensors():
            self.track(tensor)
        self.rules: dict[int, InitRule] = {}
        self.sources: list[str] = []
        self.frames: list[tuple[str, str]] = []  # (init function, its arguments as text)
        self.muted = 0

    def tensors(self, named: bool = False) -> list:
        pairs = [*self.twin.named_parameters(remove_duplicate=False),
                 *self.twin.named_buffers(remove_duplicate=False)]
        return pairs if named else [tensor for _, tensor in pairs]

    def track(self, tensor: torch.Tensor) -> None:
        """Record writes to ``tensor`` (a twin tensor, or one an init put in the twin)."""
        self.numel[_storage_key(tensor)] = tensor.numel()

    def how(self) -> dict[str, str]:
        via = ""
        if self.frames and self.frames[0][0] not in _PLAIN:
            via = self.frames[0][1]
        return {"source": self.sources[-1] if self.sources else "", "via": via}

    def write(self, tensor: torch.Tensor, rule: InitRule) -> None:
        """Apply ``rule`` to the twin tensor ``tensor`` is (a view of), if it is one."""
        key = _storage_key(tensor)
        if key not in self.numel:
            return
        if tensor.numel() == self.numel[key]:
            self.rules[key] = rule
            return
        old = self.rules.get(key)
        if old is None:  # a later write of the whole would decide
            self.rules[key] = InitRule.unknown(
                f"only {tensor.numel()} of its {self.numel[key]} elements written, by "
                f"{rule.describe()}", **self.how())
        elif rule.kind == "constant" and rule.value == 0 and old.kind in (
                "normal", "uniform", "trunc_normal"):
            self.rules[key] = old.with_(zeroed=old.zeroed + tensor.numel())
        elif not (old.kind == rule.kind == "constant" and old.value == rule.value):
            self.rules[key] = InitRule.unknown(
                f"{tensor.numel()} of its {self.numel[key]} elements rewritten by "
                f"{rule.describe()} after {old.distribution()}", **self.how())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.muted:
            return out
        for index, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            target = args[index] if index < len(args) else kwargs.get(argument.name)
            if isinstance(target, torch.Tensor):
                self.write(target, self._rule(func, args, kwargs))
        return out

    def _rule(self, func, args: tuple, kwargs: dict) -> InitRule:
        op, how = func.overloadpacket, self.how()
        aten = torch.ops.aten
        if op is aten.normal_:
            return InitRule.normal(_arg(args, kwargs, 1, "mean", 0.0),
                                   _arg(args, kwargs, 2, "std", 1.0), **how)
        if op is aten.uniform_:
            return InitRule.uniform(_arg(args, kwargs, 1, "from", 0.0),
                                    _arg(args, kwargs, 2, "to", 1.0), **how)
        if op is aten.zero_:
            return InitRule.constant(0.0, **how)
        value = _arg(args, kwargs, 1, "value", None)
        if op is aten.fill_ and isinstance(value, (int, float, bool)):
            return InitRule.constant(float(value), **how)
        if op is aten.copy_:
            return InitRule.unknown("copied from a computed value", **how)
        return InitRule.unknown(f"written by {func} (no init rule)", **how)

    @contextmanager
    def frame(self, name: str, function: Callable, tensor: torch.Tensor, args: tuple,
              kwargs: dict) -> Iterator[None]:
        """Inside one call of a torch.nn.init function: label its writes, or judge it from
        its arguments when its writes say nothing on meta."""
        signature = inspect.signature(function)
        bound = signature.bind(tensor, *args, **kwargs)
        shown = ", ".join(
            f"{key}={fmt(value) if isinstance(value, float) else value}"
            for key, value in list(bound.arguments.items())[1:]
            if isinstance(value, (int, float, str)) and value != signature.parameters[key].default)
        self.frames.append((name, f"{name}({shown})"))
        by_args = name in _BY_ARGS
        if by_args and not self.muted:
            bound.apply_defaults()
            given = bound.arguments
            self.write(tensor, InitRule.trunc_normal(given["mean"], given["std"], given["a"],
                                                     given["b"], **self.how())
                       if name == "trunc_normal_" else
                       InitRule.unknown(f"{name} is not judged statistically", **self.how()))
        self.muted += by_args
        try:
            yield
        finally:
            self.muted -= by_args
            self.frames.pop()

    def result(self) -> dict[str, InitRule]:
        """Each tensor the twin holds now (after any re-tying), under each of its names."""
        untouched = InitRule.unknown("no replayed init wrote it")
        replaced = InitRule.unknown("replaced by a new tensor during init")
        return {clean_name(name): self.rules.get(key, untouched if key in self.numel
                                                 else replaced)
                for name, tensor in self.tensors(named=True) if "_flat_param" not in name
                for key in [_storage_key(tensor)]}


def _recorder() -> _Recorder:
    if not _ACTIVE:
        raise RuntimeError("only inside replay_init")
    return _ACTIVE[-1]


@contextmanager
def source(label: str) -> Iterator[None]:
    """Name who applies the rules written inside, e.g. ``"LoraLayer.reset_lora_parameters"``
    (an init passed to :func:`replay_init` may use it to name its parts)."""
    recorder = _recorder()
    recorder.sources.append(label)
    try:
        yield
    finally:
        recorder.sources.pop()


def mark_unknown(tensor: torch.Tensor, reason: str) -> None:
    """Record that no statistic can judge ``tensor`` (a twin tensor), and why: for inits
    that derive values from data or from other weights (PiSSA, OLoRA, LoftQ, EVA)."""
    recorder = _recorder()
    recorder.write(tensor, InitRule.unknown(reason, **recorder.how()))


@contextmanager
def _init_functions_named(recorder: _Recorder) -> Iterator[None]:
    """Patch every module-level reference to a torch.nn.init function (and transformers'
    table of them) with one that opens a frame on ``recorder``."""
    originals = {id(getattr(torch.nn.init, n)): n for n in _INIT_NAMES}

    def wrap(name: str, function: Callable) -> Callable:
        def framed(tensor, *args, **kwargs):
            with recorder.frame(name, function, tensor, args, kwargs):
                return function(tensor, *args, **kwargs)
        return framed

    tables = [t for m in list(sys.modules.values()) if isinstance(t := getattr(m, "__dict__",
                                                                              None), dict)]
    hf = sys.modules.get("transformers.initialization")
    tables += [hf.TORCH_INIT_FUNCTIONS] if hasattr(hf, "TORCH_INIT_FUNCTIONS") else []
    patched = [(table, key, value) for table in tables for key, value in list(table.items())
               if callable(value) and id(value) in originals]
    try:
        for table, key, value in patched:
            table[key] = wrap(originals[id(value)], value)
        yield
    finally:
        for table, key, value in patched:
            table[key] = value


Init = Callable[[nn.Module], object] | tuple[str, Callable[[nn.Module], object]]


def replay_init(module: nn.Module, *inits: Init,
                shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, InitRule]:
    """Each tensor's init rule, found by running ``inits`` in order on a meta twin.

    Args:
        module: the module whose tensors' rules are wanted (the real one is not touched).
        inits: callables taking the twin, e.g. :func:`hf_init`, :func:`peft_init`,
            :func:`reset_init`, or ``(label, callable)`` pairs such as
            ``("Linear.reset_parameters", lambda m: m.reset_parameters())``; the label (else
            the callable's name) is the rules' source unless the init names finer ones.
        shapes: full shapes by clean name where the module holds a local view (see
            :func:`meta_twin`).

    Returns:
        ``{clean tensor name: InitRule}`` for every parameter and buffer, under each name a
        tied tensor has; a tensor no init wrote is ``unknown``.

    Example:
        >>> rules = replay_init(model, hf_init)
        >>> rules["score.weight"].describe()
        'normal(0, 0.02) from LlamaForSequenceClassification._init_weights'
    """
    twin = meta_twin(module, shapes)
    recorder = _Recorder(twin)
    _ACTIVE.append(recorder)
    try:
        with _init_functions_named(recorder), recorder, torch.no_grad():
            for init in inits:
                label, run = init if isinstance(init, tuple) else (init.__qualname__, init)
                with source(label):
                    run(twin)
    finally:
        _ACTIVE.pop()
    return recorder.result()


def reset_init(twin: nn.Module) -> None:
    """torch's construction-time init: ``reset_parameters()`` of every submodule."""
    for module in twin.modules():
        if callable(getattr(module, "reset_parameters", None)):
            with source(f"{type(module).__name__}.reset_parameters"):
                module.reset_parameters()


def hf_init(twin: nn.Module) -> None:
    """transformers' init of every (outermost) ``PreTrainedModel`` in the twin, as its
    ``init_weights`` runs it: ``initialize_weights()`` (4.52 on) on untied weights, each
    sub-model's ``_init_weights`` named as the source of what it writes, then ``tie_weights()``,
    so a tied ``lm_head`` ends with its embedding's rule (padding row zeroed included)."""
    from transformers import PreTrainedModel

    def outermost(module: nn.Module) -> Iterator[PreTrainedModel]:
        if isinstance(module, PreTrainedModel):
            yield module
        else:
            for child in module.children():
                yield from outermost(child)

    for model in twin.modules():
        if isinstance(model, PreTrainedModel):
            model._init_weights = _named(model._init_weights,
                                         f"{_class_name(model)}._init_weights")
    for model in outermost(twin):
        _untie(model)  # as built: tied tensors are initialised apart, then tied
        if hasattr(model, "initialize_weights"):
            model.initialize_weights()
        else:  # transformers before 4.52: what its init_weights() applies
            _apply_plain(model, model._init_weights)
        model.tie_weights()


def _apply_plain(module: nn.Module, fn: Callable[[nn.Module], object]) -> None:
    """``nn.Module.apply`` (children first) without a wrapper's override of it: FSDP1's
    ``apply`` gathers full parameters, a collective that only ranks with fresh tensors run."""
    for child in module.children():
        _apply_plain(child, fn)
    fn(module)


def _untie(model: nn.Module) -> None:
    """Give every parameter registered under a second name its own twin tensor."""
    seen: set[int] = set()
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None and id(param) in seen:
                param = nn.Parameter(torch.empty_like(param, device="meta"),
                                     requires_grad=param.requires_grad)
                module._parameters[attr] = param
                _recorder().track(param)
            seen.add(id(param))


def _class_name(module: nn.Module) -> str:
    """The model's own class name, not FSDP2's ``FSDP<Name>`` subclass of it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__


def _named(function: Callable, label: str) -> Callable:
    def named(*args, **kwargs):
        with source(label):
            return function(*args, **kwargs)
    return named


def peft_init(twin: nn.Module) -> None:
    """PEFT's LoRA init of every adapter in the twin: construction (``nn.Linear`` defaults),
    then ``reset_lora_parameters(adapter, init_lora_weights)`` for ``True``/``"gaussian"``;
    ``False`` keeps the construction values. Other ``init_lora_weights`` (PiSSA, OLoRA,
    LoftQ, EVA, CorDA, orthogonal, ...) and DoRA magnitudes derive from the base weight or
    from data, and other PEFT tuners' layers (IA3, LoHa, ...) are not replayed: unknown."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    configs = next((m.peft_config for m in twin.modules()
                    if isinstance(getattr(m, "peft_config", None), dict)), {})
    for layer in twin.modules():
        if isinstance(layer, LoraLayer):
            for adapter in [*layer.lora_A.keys(), *layer.lora_embedding_A.keys()]:
                how = getattr(configs.get(adapter), "init_lora_weights", True)
                _lora_adapter_init(layer, adapter, how)
        elif isinstance(layer, BaseTunerLayer):
            base = {id(t) for t in layer.get_base_layer().parameters()}
            for tensor in layer.parameters():
                if id(tensor) not in base:
                    tuner = f"{type(layer).__module__.split('.')[-2]}.{type(layer).__name__}"
                    mark_unknown(tensor, f"PEFT's {tuner} init is not replayed")


def _lora_adapter_init(layer: nn.Module, adapter: str, how: object) -> None:
    modules = [table[adapter] for table in (layer.lora_A, layer.lora_B) if adapter in table]
    embedding = [t for t in (layer.lora_embedding_A.get(adapter),
                             layer.lora_embedding_B.get(adapter)) if t is not None]
    with source("LoraLayer.update_layer"):
        if how is True or how is False or (isinstance(how, str) and how.lower() == "gaussian"):
            for module in modules:
                with source(f"{type(module).__name__}.reset_parameters"):
                    module.reset_parameters()
            for tensor in embedding:
                mark_unknown(tensor, "a LoRA embedding adapter keeps its construction values")
            with source("LoraLayer.reset_lora_parameters"):
                layer.reset_lora_parameters(adapter, how)
        else:
            for tensor in [*embedding, *(t for m in modules for t in m.parameters())]:
                mark_unknown(tensor, f"init_lora_weights={how!r} derives the adapter from the "
                                     "base weight or from data")
        if getattr(layer, "use_dora", {}).get(adapter):
            for tensor in layer.lora_magnitude_vector[adapter].parameters():
                mark_unknown(tensor, "a DoRA magnitude is the base weight's norm")


def fresh_init_rules(model: nn.Module,
                     shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, InitRule]:
    """The init rule of every tensor of a Hugging Face model, PEFT-wrapped or not: what
    ``from_pretrained`` gives a tensor the checkpoint lacks (a new head), then what PEFT
    gives its adapters. Modules outside any ``PreTrainedModel`` get torch's defaults."""
    from transformers import PreTrainedModel

    has_hf = any(isinstance(m, PreTrainedModel) for m in model.modules())
    inits = [hf_init] if has_hf else [reset_init]
    return replay_init(model, *inits, peft_init, shapes=shapes)
