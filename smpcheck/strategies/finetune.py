"""Fine-tuning setups from the command line: a task head (``--model-class``, ``--num-labels``,
``--config KEY=VALUE``) and PEFT adapters (``--lora SPEC``, ``--peft DIR``).

Parsing and validation run in the launching process, before any rank starts, so a typo is
one sentence (exit 2) rather than N rank tracebacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smpcheck.checkpoint.source import UsageError

_LORA_KEYS = {"r": "rank (int)", "alpha": "lora_alpha (number)", "dropout": "lora_dropout",
              "targets": "target_modules", "modules_to_save": "modules_to_save"}
_LORA_EXAMPLE = "r=8,alpha=16,targets=q_proj,v_proj[,modules_to_save=score]"


@dataclass(frozen=True)
class LoraSpec:
    """A new LoRA adapter as ``--lora`` states it."""

    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` (PEFT's defaults for everything not stated)."""
        from peft import LoraConfig

        targets = self.targets[0] if self.targets == ("all-linear",) else list(self.targets)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets,
                          modules_to_save=list(self.modules_to_save) or None)


def parse_lora(text: str) -> LoraSpec:
    """``r=8,alpha=16,targets=q_proj,v_proj,modules_to_save=score``: a bare item continues the
    list of the key before it.

    Raises:
        UsageError: an unknown key, a bad number, no ``r`` or no ``targets``.
    """
    values: dict[str, list[str]] = {}
    key = None
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in _LORA_KEYS:
                raise UsageError(f"--lora: unknown key {key!r}; use {', '.join(_LORA_KEYS)} "
                                 f"(e.g. {_LORA_EXAMPLE})")
            values[key] = [value] if value else []
        elif key in ("targets", "modules_to_save"):
            values[key].append(item)
        else:
            raise UsageError(f"--lora: {item!r} has no key; write key=value (e.g. {_LORA_EXAMPLE})")
    missing = [k for k in ("r", "targets") if not values.get(k)]
    if missing:
        raise UsageError(f"--lora needs {' and '.join(missing)} (e.g. {_LORA_EXAMPLE})")
    r = _number(values["r"], "r", int)
    if r < 1:
        raise UsageError(f"--lora: r must be a positive integer, got {r}")
    return LoraSpec(r=r, alpha=_number(values.get("alpha", [str(r)]), "alpha", float),
                    targets=tuple(values["targets"]),
                    dropout=_number(values.get("dropout", ["0"]), "dropout", float),
                    modules_to_save=tuple(values.get("modules_to_save", ())))


def _number(items: list[str], key: str, kind: type) -> Any:
    try:
        (value,) = items
        return kind(value)
    except ValueError:
        raise UsageError(f"--lora: {key} must be one {kind.__name__}, got "
                         f"{','.join(items)!r}") from None


def parse_config_overrides(pairs: list[str], num_labels: int | None) -> dict[str, Any]:
    """``--config KEY=VALUE`` (VALUE as JSON where it parses: 3, 1e-5, true, {"0": "neg"};
    else a string) and ``--num-labels N``, as ``from_pretrained`` keywords."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--config {pair!r}: write KEY=VALUE (e.g. --config "
                             "problem_type=single_label_classification)")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    if num_labels is not None:
        if num_labels < 1:
            raise UsageError(f"--num-labels must be at least 1, got {num_labels}")
        overrides["num_labels"] = num_labels
    return overrides


def check_adapter_dir(path: str) -> Path:
    """A directory PEFT saved (``adapter_config.json``), or one sentence saying why not."""
    adapter = Path(path).expanduser()
    if not (adapter / "adapter_config.json").exists():
        raise UsageError(f"--peft {path}: no adapter_config.json there; pass a directory "
                         "written by PeftModel.save_pretrained")
    return adapter


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("--lora and --peft need PEFT: pip install 'smpcheck[peft]'") from None


def check_targets(model: Any, spec: LoraSpec) -> None:
    """Every LoRA target and ``modules_to_save`` name matches a module of ``model`` (a meta
    model is enough), by PEFT's rule for a list of names: the name or a ``.name`` suffix."""
    names = [name for name, _ in model.named_modules()]
    for flag, wanted in (("targets", spec.targets), ("modules_to_save", spec.modules_to_save)):
        for target in wanted:
            if target == "all-linear" and flag == "targets":
                continue
            if not any(n == target or n.endswith("." + target) for n in names):
                raise UsageError(f"--lora {flag}={target}: {type(model).__name__} has no module "
                                 f"of that name (its layers have e.g. "
                                 f"{', '.join(_leaf_names(model))})")


def _leaf_names(model: Any) -> list[str]:
    """A few distinct leaf-module names, for the error message."""
    seen: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if next(module.children(), None) is None and not leaf.isdigit() and leaf not in seen:
            seen.append(leaf)
    return seen[:8]


def fine_tuning_options(path: Path, strategy: Any, tp: int, *, model_class: str | None,
                        num_labels: int | None, config: list[str], lora: str | None,
                        peft: str | None) -> dict[str, Any]:
    """Parse and validate the fine-tuning flags against the checkpoint and the strategy;
    ``RunOptions`` fields, or a :class:`UsageError` naming the flag and the fix."""
    from reference_impl.loading import build_meta_model, split_from_pretrained_kwargs

    if lora and peft:
        raise UsageError("--lora adds a new adapter and --peft loads a trained one: pass one")
    overrides = parse_config_overrides(config, num_labels)
    spec = parse_lora(lora) if lora else None
    adapter_dir = check_adapter_dir(peft) if peft else None
    fields = {"model_class": model_class, "config_overrides": overrides, "lora": spec,
              "adapter_dir": adapter_dir}
    if not (model_class or overrides or lora or peft):
        return fields
    _check_strategy(strategy, tp, adapters=bool(lora or peft))
    if lora or peft:
        require_peft()
    try:
        load = split_from_pretrained_kwargs(path, model_class, **overrides)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{_flags(model_class, overrides)}: {exc}") from exc
    if load.loading_kwargs:
        unknown = ", ".join(sorted(load.loading_kwargs))
        raise UsageError(f"--config {unknown}: not an attribute of {type(load.config).__name__}; "
                         "--config sets config attributes only (num_labels, id2label, ...)")
    try:  # as every rank but 0 will build it: a config the model's own code rejects is input
        meta = build_meta_model(load.config, load.dtype, load.model_class)
    except Exception as exc:  # noqa: BLE001 - any error the model's constructor raises
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"{_flags(model_class, overrides)}: transformers cannot build "
                         f"{load.model_class.__name__} with this config ({type(exc).__name__}: "
                         f"{first}); check the overridden values") from exc
    if spec is not None:
        check_targets(meta, spec)
    return fields


def _check_strategy(strategy: Any, tp: int, adapters: bool) -> None:
    """The combinations ``strategy`` (a strategy class) cannot run, each as one sentence."""
    if not strategy.fine_tuning:
        raise UsageError(f"--strategy {strategy.name} loads the checkpoint's own model only; "
                         "use --strategy smp or fsdp2 for --model-class, --num-labels, --config, "
                         "--lora and --peft")
    if adapters and not strategy.adapters:
        raise UsageError(f"--strategy {strategy.name} runs a recipe that smpcheck does not "
                         "extend with PEFT adapters; use --strategy smp for --lora or --peft")
    if adapters and tp > 1 and not strategy.adapters_under_tp:
        raise UsageError("--lora and --peft cannot be combined with --tp: our tensor-parallel "
                         "plan does not shard LoRA layers; drop --tp (FSDP alone shards them) "
                         "or use --strategy tp_plan")


def _flags(model_class: str | None, overrides: dict[str, Any]) -> str:
    parts = [f"--model-class {model_class}"] if model_class else []
    parts += [f"{key}={value!r}" for key, value in overrides.items()]
    return ", ".join(parts)
